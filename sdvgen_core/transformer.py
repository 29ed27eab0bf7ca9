"""CogVideoX transformer with subject reference tokens (spec: `shared/spec/reference-tokens.md`).

The reference image latent is patchified by the transformer's own `patch_embed.proj` and joins the
*video* stream in front of the video tokens, so every block sees `[text ; reference ; video]`. Because
`CogVideoXBlock` modulates, gates and adds residuals per token, a reference token placed in the video
stream is modulated with the video shift/scale, gated with the video gate, keeps its own residual
stream and shares the joint feed-forward: exactly the spec's layout, with stock blocks and the stock
attention processor. Positions come from a 3-D RoPE over `T + 1` latent frames: frame 0 rotates the
reference slice of q/k and frames `1..T` rotate the video. After the last block the reference tokens
are dropped, so only video tokens reach `norm_final`, `norm_out` and `proj_out`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from diffusers.utils import apply_lora_scale
from einops import rearrange

from .errors import ModelLoadError, SDVGenError

RotaryEmbedding = tuple[torch.Tensor, torch.Tensor]


class SDVGenTransformer3DModel(CogVideoXTransformer3DModel):
    """`CogVideoXTransformer3DModel` that also accepts reference latents `[B, R, C, h, w]`.

    Same config and weights as the stock model (it loads any CogVideoX 1.0 RoPE checkpoint); with no
    reference its output equals the stock model's.
    """

    _rope_cache: dict[tuple, RotaryEmbedding] | None = None
    _repeated_blocks = ["CogVideoXBlock"]  # regional torch.compile (`compile_repeated_blocks`)

    def check_supported(self) -> None:
        """Raise `ModelLoadError` unless this is a CogVideoX 1.0 model with 3-D RoPE (CogVideoX-5B family)."""
        if not self.config.use_rotary_positional_embeddings:
            raise ModelLoadError(
                "this transformer uses sin-cos position tables (CogVideoX-2B); SDV-Gen needs a RoPE model "
                "such as CogVideoX-5B (config `use_rotary_positional_embeddings: true`)"
            )
        if self.config.patch_size_t is not None or self.config.ofs_embed_dim:
            raise ModelLoadError(
                "this transformer is CogVideoX 1.5 (temporal patches / ofs embedding); SDV-Gen needs a "
                "CogVideoX 1.0 RoPE model such as CogVideoX-5B"
            )

    def rotary_embeddings(
        self, num_frames: int, height: int, width: int, device: torch.device | str
    ) -> RotaryEmbedding:
        """3-D RoPE `(cos, sin)`, each `[num_frames * (height/p) * (width/p), head_dim]`, for latent size `height x width`.

        Same grid and crop region as `CogVideoXPipeline._prepare_rotary_positional_embeddings`. Cached per size,
        so a sampling loop computes it once.
        """
        if self._rope_cache is None:
            self._rope_cache = {}
        key = (num_frames, height, width, str(device))
        if key not in self._rope_cache:
            p = self.config.patch_size
            grid_height, grid_width = height // p, width // p
            crops = get_resize_crop_region_for_grid(
                (grid_height, grid_width), self.config.sample_width // p, self.config.sample_height // p
            )
            self._rope_cache[key] = get_3d_rotary_pos_embed(
                embed_dim=self.config.attention_head_dim,
                crops_coords=crops,
                grid_size=(grid_height, grid_width),
                temporal_size=num_frames,
                device=device,
            )
        return self._rope_cache[key]

    def reference_rotary_embeddings(
        self,
        num_frames: int,
        height: int,
        width: int,
        device: torch.device | str,
        reference_keep_indices: torch.Tensor | None = None,
    ) -> RotaryEmbedding:
        """RoPE for the stream `[reference ; video]`: frame 0 for the (kept) reference tokens, frames `1..T` for video."""
        cos, sin = self.rotary_embeddings(num_frames + 1, height, width, device)
        if reference_keep_indices is None:
            return cos, sin
        tokens_per_frame = (height // self.config.patch_size) * (width // self.config.patch_size)
        keep = torch.cat(
            [
                reference_keep_indices.to(device),
                torch.arange(tokens_per_frame, cos.shape[0], device=device),
            ]
        )
        return cos[keep], sin[keep]

    def embed_reference(self, reference_latents: torch.Tensor) -> torch.Tensor:
        """Reference latents `[B, R, C, h, w]` -> tokens `[B, R * (h/p) * (w/p), D]` via `patch_embed.proj`, no position table."""
        batch_size = reference_latents.shape[0]
        tokens = self.patch_embed.proj(rearrange(reference_latents, "b r c h w -> (b r) c h w"))
        return rearrange(tokens, "(b r) d h w -> b (r h w) d", b=batch_size)

    def _check_inputs(
        self, hidden_states: torch.Tensor, reference_latents: torch.Tensor | None
    ) -> None:
        if hidden_states.ndim != 5:
            raise SDVGenError(f"latents must be [B, T, C, h, w]; got shape {tuple(hidden_states.shape)}")
        p = self.config.patch_size
        _, _, channels, height, width = hidden_states.shape
        if channels != self.config.in_channels or height % p or width % p:
            raise SDVGenError(
                f"latents {tuple(hidden_states.shape)} need {self.config.in_channels} channels and a latent size "
                f"divisible by the patch size {p} (image size a multiple of {8 * p})"
            )
        if reference_latents is None:
            return
        if reference_latents.ndim != 5 or reference_latents.shape[0] != hidden_states.shape[0]:
            raise SDVGenError(
                f"reference latents must be [B, R, C, h, w] with the latents' batch {hidden_states.shape[0]}; "
                f"got {tuple(reference_latents.shape)}"
            )
        if reference_latents.shape[2:] != hidden_states.shape[2:]:
            raise SDVGenError(
                f"reference latents {tuple(reference_latents.shape)} must match the video latents' channels and "
                f"size {tuple(hidden_states.shape[2:])}: encode the reference at the generation size"
            )
        if reference_latents.shape[1] != 1:
            raise SDVGenError(f"one reference frame is supported; got {reference_latents.shape[1]}")

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: int | float | torch.LongTensor,
        reference_latents: torch.Tensor | None = None,
        reference_keep_indices: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        ofs: int | float | torch.LongTensor | None = None,
        image_rotary_emb: RotaryEmbedding | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Predict `[B, T, C, h, w]` from noisy video latents `[B, T, C, h, w]` and text `[B, L, text_dim]`.

        Args:
            reference_latents: `[B, 1, C, h, w]` VAE latents of the subject image at the generation size, or None
                for plain text-to-video (then identical to `CogVideoXTransformer3DModel`).
            reference_keep_indices: `[K]` indices (into the `h/p * w/p` reference tokens) of the tokens to keep;
                the rest are dropped from the sequence (training's reference-token drop). None keeps all.
            image_rotary_emb: precomputed RoPE for the `[reference ; video]` stream; computed (and cached) when None.
        """
        self._check_inputs(hidden_states, reference_latents)
        batch_size, num_frames, _, height, width = hidden_states.shape

        emb = self.time_embedding(self.time_proj(timestep).to(dtype=hidden_states.dtype), timestep_cond)

        hidden_states = self.patch_embed(encoder_hidden_states, hidden_states)
        hidden_states = self.embedding_dropout(hidden_states)
        text_seq_length = encoder_hidden_states.shape[1]
        encoder_hidden_states = hidden_states[:, :text_seq_length]
        hidden_states = hidden_states[:, text_seq_length:]

        num_reference_tokens = 0
        if reference_latents is not None:
            reference_tokens = self.embed_reference(reference_latents.to(hidden_states.dtype))
            if reference_keep_indices is not None:
                reference_tokens = reference_tokens[:, reference_keep_indices.to(reference_tokens.device)]
            num_reference_tokens = reference_tokens.shape[1]
            hidden_states = torch.cat([reference_tokens, hidden_states], dim=1)
            if image_rotary_emb is None:
                image_rotary_emb = self.reference_rotary_embeddings(
                    num_frames, height, width, hidden_states.device, reference_keep_indices
                )
        elif image_rotary_emb is None:
            image_rotary_emb = self.rotary_embeddings(num_frames, height, width, hidden_states.device)

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states, encoder_hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, emb, image_rotary_emb, attention_kwargs
                )
            else:
                hidden_states, encoder_hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=emb,
                    image_rotary_emb=image_rotary_emb,
                    attention_kwargs=attention_kwargs,
                )

        hidden_states = hidden_states[:, num_reference_tokens:]
        hidden_states = self.norm_final(hidden_states)
        hidden_states = self.norm_out(hidden_states, temb=emb)
        hidden_states = self.proj_out(hidden_states)

        p = self.config.patch_size
        output = rearrange(
            hidden_states,
            "b (t h w) (c ph pw) -> b t c (h ph) (w pw)",
            t=num_frames,
            h=height // p,
            w=width // p,
            ph=p,
            pw=p,
        )
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
