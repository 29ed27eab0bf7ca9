"""Host-free pieces of the native Wan 2.2 nodes: the reference-token model wrapper, `<cls>` token placement
and size checks. Plain Python + torch (imported lazily); the ComfyUI glue is in `wan.py`, the LoRA key map is
`sdvgen_core.wan_lora`'s.
"""

from __future__ import annotations

from .core import sdvgen_core

# Wan 2.2 TI2V-5B: 48 latent channels, VAE 16x spatially and 4x in time, patch (1, 2, 2) -> sizes in steps of 32.
WAN22_LATENT_CHANNELS = 48
WAN22_SPATIAL_FACTOR = 16
WAN22_TEMPORAL_FACTOR = 4
WAN22_SIZE_STEP = 32
REFERENCE_TIMESTEPS = ["clean", "video"]  # the default first
# The transformers UMT5 tokenizer (google/umt5-xxl, as the Wan pipelines load it) is the sentencepiece vocabulary
# (256,000 pieces) plus 300 `<extra_id_*>` sentinels: its length, 256,300, is `<cls>`'s id by the spec rule.
# ComfyUI's UMT5 tokenizer is the bare sentencepiece model, so the sentinels are added here.
UMT5_SENTINEL_COUNT = 300


def wan22_video_size_problem(width: int, height: int, length: int) -> str | None:
    """Why `width` x `height` x `length` frames is not a Wan 2.2 video size, or None when it is one."""
    for name, value in (("width", width), ("height", height)):
        if value < WAN22_SIZE_STEP or value % WAN22_SIZE_STEP:
            return f"{name} must be a positive multiple of {WAN22_SIZE_STEP} for Wan 2.2 (got {value})"
    if length < 1 or (length - 1) % WAN22_TEMPORAL_FACTOR:
        return f"length must be 4k + 1 frames (1, 5, ..., 121) for Wan 2.2 (got {length})"
    return None


def wan22_latent_shape(batch_size: int, width: int, height: int, length: int) -> tuple[int, int, int, int, int]:
    """Shape `[B, 48, T, h, w]` of the latent of a `length`-frame video, as ComfyUI's Wan 2.2 nodes make it."""
    frames = (length - 1) // WAN22_TEMPORAL_FACTOR + 1
    return (batch_size, WAN22_LATENT_CHANNELS, frames, height // WAN22_SPATIAL_FACTOR, width // WAN22_SPATIAL_FACTOR)


class ReferenceTokensWrapper:
    """Diffusion-model wrapper: runs the model on `[reference ; video]` and returns the video frames only.

    Registered on `WanModel.forward` (ComfyUI's `WrappersMP.DIFFUSION_MODEL`), so it sees the model-space
    latents `x [B, C, T, h, w]` and the timesteps as the model gets them: `[B]`, or `[B, T]` per frame
    when a denoise mask is used. The reference latent `[1, C, 1, h, w]` (model space, kept on the CPU) is
    moved to `x`'s device and dtype at each call and put in front of every batch entry (cond and uncond
    alike: guidance stays over the text). The model's own RoPE then places the reference at frame 0 and
    the video at frames 1..T, its patch embedding turns it into tokens, self-attention is full, and the
    reference frame of the prediction is dropped. Per-frame timesteps: the reference gets the video's
    (the noisiest frame's, under a mask) or 0 with `clean=True`.
    """

    def __init__(self, reference, clean: bool) -> None:
        self.reference = reference
        self.clean = clean

    def reference_timesteps(self, timestep, frames: int):
        """Per-frame timesteps `[B, 1 + frames]` for `[reference ; video]` from the model's `[B]` or `[B, frames]`."""
        import torch

        video = timestep.reshape(-1, 1).expand(-1, frames) if timestep.ndim <= 1 else timestep
        if video.shape[1] != frames:
            raise sdvgen_core.SDVGenError(
                f"the model got timesteps for {video.shape[1]} frames but the latent has {frames}"
            )
        reference = torch.zeros_like(video[:, :1]) if self.clean else video.amax(dim=1, keepdim=True)
        return torch.cat([reference, video], dim=1)

    def check_latent_size(self, shape) -> None:
        """SDVGenError unless a latent of `shape` `[..., h, w]` has the reference's size."""
        if tuple(shape[-2:]) != tuple(self.reference.shape[-2:]):
            h, w = self.reference.shape[-2:]
            raise sdvgen_core.SDVGenError(
                f"the latent being sampled is {shape[-1] * WAN22_SPATIAL_FACTOR}x{shape[-2] * WAN22_SPATIAL_FACTOR} "
                f"but the subject reference was made for {w * WAN22_SPATIAL_FACTOR}x{h * WAN22_SPATIAL_FACTOR}; "
                f"sample the latent that SDV-Gen Wan Subject Reference outputs (or set its width/height to match)"
            )

    def prepare_sampling(self, executor, model, noise_shape, conds, model_options=None, **kwargs):
        """Sampling-preparation wrapper (`WrappersMP.PREPARE_SAMPLING`), before any step: checks the latent's
        size, and has ComfyUI estimate the model's memory for the latent plus the reference frame."""
        self.check_latent_size(noise_shape)
        if len(noise_shape) == 5:
            noise_shape = [*noise_shape[:2], noise_shape[2] + 1, *noise_shape[3:]]
        return executor(model, noise_shape, conds, model_options=model_options, **kwargs)

    def __call__(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={},
                 **kwargs):
        import torch

        self.check_latent_size(x.shape)
        reference = self.reference.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1, -1)
        timesteps = self.reference_timesteps(timestep, x.shape[2])
        output = executor(torch.cat([reference, x], dim=2), timesteps, context, clip_fea, time_dim_concat,
                          transformer_options, **kwargs)
        return output[:, :, 1:]


def insert_token_for_marker(token_batches: list[list[tuple]], marker: list[int], token_id: int, pad_token: int,
                            min_length: int | None) -> list[list[tuple]]:
    """Replace the first run of `marker` ids in ComfyUI token lists by the single id `token_id`.

    `token_batches` is one encoder's `tokenize_with_weights` output (batches of `(id, weight[, word id])`);
    the replacement keeps the first marker token's weight and word id, and the list is padded back to
    `min_length` with `pad_token` (what the tokenizer would have made had the marker been one token).
    """
    flat = [(batch, index) for batch, tokens in enumerate(token_batches) for index in range(len(tokens))]
    ids = [token_batches[batch][index][0] for batch, index in flat]
    for start in range(len(ids) - len(marker) + 1):
        if ids[start:start + len(marker)] == marker and flat[start][0] == flat[start + len(marker) - 1][0]:
            batch, index = flat[start]
            tokens = list(token_batches[batch])
            replacement = (token_id, *tokens[index][1:])
            tokens[index:index + len(marker)] = [replacement]
            if min_length is not None and len(tokens) < min_length:
                tokens += [(pad_token, 1.0, *tokens[-1][2:3])] * (min_length - len(tokens))
            return [*token_batches[:batch], tokens, *token_batches[batch + 1:]]
    raise sdvgen_core.SDVGenError(f"<cls> was not found in the tokenized prompt (marker ids {marker})")
