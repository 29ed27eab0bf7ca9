"""CogVideoX joint attention through diffusers' attention dispatcher (flash-attn, SageAttention, xformers, SDPA).

diffusers' `CogVideoXAttnProcessor2_0` calls `F.scaled_dot_product_attention` directly, so
`set_attention_backend` never reaches it. `DispatchCogVideoXAttnProcessor` does the same computation
(joint `[text ; reference ; video]` sequence, RoPE on everything after the text, i.e. on the reference and
video slices our transformer puts there) but hands the attention itself to `dispatch_attention_fn`. With
the `native` backend it is bit for bit the stock processor.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .errors import SDVGenError

# User-facing names -> diffusers backends. sdpa keeps diffusers' own processor (nothing changes).
ATTENTION_BACKENDS = {
    "sdpa": AttentionBackendName.NATIVE,
    "flash": AttentionBackendName.FLASH,
    "sage": AttentionBackendName.SAGE,
    "xformers": AttentionBackendName.XFORMERS,
}
INSTALL_HINTS = {"flash": "pip install flash-attn", "sage": "pip install sageattention", "xformers": "pip install xformers"}


class DispatchCogVideoXAttnProcessor:
    """`CogVideoXAttnProcessor2_0` with the attention call routed through diffusers' dispatcher to `backend`."""

    _parallel_config = None  # read by diffusers' `set_attention_backend`

    def __init__(self, backend: AttentionBackendName = AttentionBackendName.NATIVE) -> None:
        self._attention_backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Video stream `[B, N, D]` and text `[B, L, D]` -> (video `[B, N, D]`, text `[B, L, D]`)."""
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # The dispatcher takes [B, S, H, D]; norms and RoPE act on the [B, H, S, D] view of the same memory, so
        # every value and every stride below is the stock processor's.
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim) for x in (query, key, value))
        query_heads, key_heads = query.transpose(1, 2), key.transpose(1, 2)
        if attn.norm_q is not None:
            query_heads = attn.norm_q(query_heads)
        if attn.norm_k is not None:
            key_heads = attn.norm_k(key_heads)
        if image_rotary_emb is not None:
            query_heads[:, :, text_seq_length:] = apply_rotary_emb(query_heads[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key_heads[:, :, text_seq_length:] = apply_rotary_emb(key_heads[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = dispatch_attention_fn(
            query_heads.transpose(1, 2), key_heads.transpose(1, 2), value,
            attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
        )
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def check_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise `SDVGenError` naming the option unless attention backend `name` can run on `device` in `dtype`."""
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    if name not in ATTENTION_BACKENDS:
        raise SDVGenError(f"attention {name!r} is not one of {sorted(ATTENTION_BACKENDS)}")
    if name == "sdpa":
        return
    if device.type != "cuda":
        raise SDVGenError(f"attention {name!r} needs a CUDA GPU (device is {device}); choose attention 'sdpa'")
    if dtype not in (torch.bfloat16, torch.float16):
        raise SDVGenError(f"attention {name!r} computes in bf16/fp16 only; choose precision bf16 or fp16, or attention 'sdpa'")
    try:
        _check_attention_backend_requirements(ATTENTION_BACKENDS[name])
    except (RuntimeError, ImportError) as error:
        raise SDVGenError(
            f"attention {name!r} is not usable here ({error}); install it ({INSTALL_HINTS[name]}) or choose attention 'sdpa'"
        ) from None


def set_attention(transformer: torch.nn.Module, name: str) -> None:
    """Give every attention layer of `transformer` the processor for backend `name` (`sdpa`: diffusers' stock one).

    Wan's stock processor already calls the dispatcher, so there diffusers' own `set_attention_backend` is used.
    """
    if not isinstance(transformer, CogVideoXTransformer3DModel):
        if name == "sdpa":
            transformer.reset_attention_backend()
        else:
            transformer.set_attention_backend(ATTENTION_BACKENDS[name].value)
        return
    if name == "sdpa":
        transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
    else:
        transformer.set_attn_processor(DispatchCogVideoXAttnProcessor(ATTENTION_BACKENDS[name]))
