"""Wan 2.2 transformer with a subject reference frame (the SDV-Gen layout transferred to Wan).

The reference image latent `[B, C, 1, h, w]` is placed as an extra latent frame *in front of* the video
`[B, C, T, h, w]` and patchified by the model's own `patch_embedding`, so self-attention runs over
`[reference ; video]` with 3-D RoPE frame 0 for the reference and frames `1..T` for the video; text enters
through the usual cross-attention. Reference tokens are dropped before the output head.

Wan 2.2 TI2V-5B modulates every token with its own timestep (`expand_timesteps`). The reference tokens get:

- `clean` (default): timestep 0, the value TI2V's pre-training gives a clean conditioning frame. The paper's
  reference is a clean image the video copies the subject from, never something to denoise; CogVideoX
  could only express that through the LoRA because it has one timestep per sample, while TI2V-5B already
  knows "timestep 0 = clean content", so `clean` states the paper's intent in the backbone's own terms.
- `video`: the video tokens' timestep, exactly as the CogVideoX method modulates its reference tokens.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from .errors import ModelLoadError, SDVGenError


class ReferenceTimestep(str, Enum):
    CLEAN = "clean"  # timestep 0 for reference tokens, as TI2V treats a conditioning frame
    VIDEO = "video"  # the video's timestep, as the CogVideoX method does


DEFAULT_REFERENCE_TIMESTEP = ReferenceTimestep.CLEAN


def parse_reference_timestep(value: ReferenceTimestep | str) -> ReferenceTimestep:
    try:
        return ReferenceTimestep(value)
    except ValueError:
        raise SDVGenError(
            f"reference_timestep {value!r} is not one of {[mode.value for mode in ReferenceTimestep]}"
        ) from None


class SDVGenWanTransformer3DModel(WanTransformer3DModel):
    """`WanTransformer3DModel` that also accepts reference latents `[B, C, 1, h, w]`.

    Same config and weights as the stock model; with no reference it *is* the stock forward.
    """

    def check_supported(self) -> None:
        """Raise `ModelLoadError` unless the patch is 1 latent frame deep (the reference is one frame)."""
        if self.config.patch_size[0] != 1:
            raise ModelLoadError(
                f"this Wan transformer patches {self.config.patch_size[0]} latent frames at a time "
                f"(patch_size {list(self.config.patch_size)}); SDV-Gen places the reference as one latent frame "
                f"and needs a temporal patch size of 1 (Wan 2.1 / 2.2 use [1, 2, 2])"
            )

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def reference_rotary_embeddings(
        self, latents_with_reference: torch.Tensor, reference_keep_indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE `(cos, sin)`, each `[1, S, 1, head_dim]`, for `[reference ; video]` latents `[B, C, 1 + T, h, w]`.

        Frame 0 rotates the (kept) reference tokens, frames `1..T` the video: the stock `rope` over `1 + T` frames.
        """
        cos, sin = self.rope(latents_with_reference)
        if reference_keep_indices is None:
            return cos, sin
        keep = self._kept_token_indices(latents_with_reference, reference_keep_indices)
        return cos[:, keep], sin[:, keep]

    def _kept_token_indices(
        self, latents_with_reference: torch.Tensor, reference_keep_indices: torch.Tensor
    ) -> torch.Tensor:
        frame_tokens = self.tokens_per_frame(*latents_with_reference.shape[-2:])
        total = frame_tokens * latents_with_reference.shape[2]
        device = latents_with_reference.device
        return torch.cat([reference_keep_indices.to(device), torch.arange(frame_tokens, total, device=device)])

    def reference_timesteps(
        self,
        timestep: torch.Tensor,
        num_video_tokens: int,
        num_reference_tokens: int,
        mode: ReferenceTimestep | str = DEFAULT_REFERENCE_TIMESTEP,
    ) -> torch.Tensor:
        """Timesteps for `[reference ; video]`: `[B]` stays `[B]` in `video` mode, otherwise `[B, R + S]` per token.

        `timestep` is `[B]` (one per sample) or `[B, S]` (per video token, Wan 2.2 TI2V). A reference in `video`
        mode takes each sample's video timestep (the largest per-token value: the noise level being removed).
        """
        mode = parse_reference_timestep(mode)
        if mode is ReferenceTimestep.VIDEO and timestep.ndim == 1:
            return timestep
        video = timestep if timestep.ndim == 2 else timestep[:, None].expand(-1, num_video_tokens)
        if mode is ReferenceTimestep.CLEAN:
            reference = video.new_zeros(video.shape[0], num_reference_tokens)
        else:
            reference = video.amax(dim=1, keepdim=True).expand(-1, num_reference_tokens)
        return torch.cat([reference, video], dim=1)

    def _check_inputs(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, reference_latents: torch.Tensor
    ) -> None:
        self.check_supported()
        if hidden_states.ndim != 5:
            raise SDVGenError(f"latents must be [B, C, T, h, w]; got shape {tuple(hidden_states.shape)}")
        batch, channels, frames, height, width = hidden_states.shape
        _, p_h, p_w = self.config.patch_size
        if channels != self.config.in_channels or height % p_h or width % p_w:
            raise SDVGenError(
                f"latents {tuple(hidden_states.shape)} need {self.config.in_channels} channels and a latent size "
                f"divisible by the patch size {p_h}x{p_w}"
            )
        expected = (batch, channels, 1, height, width)
        if tuple(reference_latents.shape) != expected:
            raise SDVGenError(
                f"reference latents must be one latent frame {expected} ([B, C, 1, h, w], encoded at the "
                f"generation size); got {tuple(reference_latents.shape)}"
            )
        video_tokens = frames * self.tokens_per_frame(height, width)
        if timestep.ndim == 2 and tuple(timestep.shape) != (batch, video_tokens):
            raise SDVGenError(
                f"per-token timesteps must be [B, {video_tokens}] for these latents; got {tuple(timestep.shape)}"
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        reference_latents: torch.Tensor | None = None,
        reference_keep_indices: torch.Tensor | None = None,
        reference_timestep: ReferenceTimestep | str = DEFAULT_REFERENCE_TIMESTEP,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Predict `[B, C, T, h, w]` from noisy video latents `[B, C, T, h, w]` and text `[B, L, text_dim]`.

        Args:
            timestep: `[B]`, or `[B, T * h/2 * w/2]` per video token (Wan 2.2 TI2V's `expand_timesteps`).
            reference_latents: `[B, C, 1, h, w]` normalised VAE latents of the subject image, or None for plain
                text-to-video (then this is exactly `WanTransformer3DModel.forward`).
            reference_keep_indices: `[K]` indices into the `h/2 * w/2` reference tokens to keep (training's
                reference-token drop); None keeps all.
            reference_timestep: `clean` (timestep 0 for reference tokens) or `video` (the video's timestep).
        """
        if reference_latents is None:
            return super().forward(
                hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                return_dict=return_dict, attention_kwargs=attention_kwargs,
            )
        return self._forward_with_reference(
            hidden_states, timestep, encoder_hidden_states, reference_latents, reference_keep_indices,
            parse_reference_timestep(reference_timestep), encoder_hidden_states_image, return_dict,
            attention_kwargs=attention_kwargs,
        )

    @apply_lora_scale("attention_kwargs")
    def _forward_with_reference(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        reference_latents: torch.Tensor,
        reference_keep_indices: torch.Tensor | None,
        reference_timestep: ReferenceTimestep,
        encoder_hidden_states_image: torch.Tensor | None,
        return_dict: bool,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        self._check_inputs(hidden_states, timestep, reference_latents)
        batch_size, _, num_frames, height, width = hidden_states.shape
        _, p_h, p_w = self.config.patch_size

        latents = torch.cat([reference_latents.to(hidden_states.dtype), hidden_states], dim=2)
        rotary_emb = self.reference_rotary_embeddings(latents, reference_keep_indices)
        tokens = self.patch_embedding(latents).flatten(2).transpose(1, 2)
        if reference_keep_indices is not None:
            tokens = tokens[:, self._kept_token_indices(latents, reference_keep_indices)]
        tokens = tokens.contiguous()
        num_video_tokens = num_frames * self.tokens_per_frame(height, width)
        num_reference_tokens = tokens.shape[1] - num_video_tokens

        timestep = self.reference_timesteps(timestep, num_video_tokens, num_reference_tokens, reference_timestep)
        per_token = timestep.ndim == 2
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep.flatten() if per_token else timestep, encoder_hidden_states, encoder_hidden_states_image,
            timestep_seq_len=timestep.shape[1] if per_token else None,
        )
        timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(
                    block, tokens, encoder_hidden_states, timestep_proj, rotary_emb
                )
            else:
                tokens = block(tokens, encoder_hidden_states, timestep_proj, rotary_emb)

        tokens = tokens[:, num_reference_tokens:]
        if per_token:
            temb = temb[:, num_reference_tokens:]
            shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(tokens.device), scale.to(tokens.device)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = self.proj_out(tokens)

        output = tokens.reshape(batch_size, num_frames, height // p_h, width // p_w, 1, p_h, p_w, -1)
        output = output.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
