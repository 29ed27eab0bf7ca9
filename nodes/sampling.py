"""Dual-Task Sampler and SDV-Gen Decode: reference-token sampling with ComfyUI progress, previews and cancel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import host, validation
from .core import sdvgen_core
from .loader import PIPELINE_CACHE
from .preview import fit_latent_to_rgb, latent_preview
from .types import CATEGORY, CONDITIONING, LATENT, MAX_FRAMES, PIPE, REFERENCE, SCHEDULERS


@dataclass(frozen=True)
class SDVGenLatent:
    """What an SDVGEN_LATENT socket carries: final video latents `[1, T, C, h, w]`."""

    latents: object  # torch.Tensor, on the CPU
    model_dir: Path


def check_same_model(model, name: str, value) -> None:
    if value.model_dir != model.base.model_dir:
        raise sdvgen_core.SDVGenError(
            f"{name} was made with the model in {str(value.model_dir)!r} but this node has {str(model.base.model_dir)!r}; "
            f"connect the same Load SDV LoRA base model to both"
        )


class StepReporter:
    """Step callback: host cancel check, then the progress bar with a latent preview of the current estimate."""

    def __init__(self, total_steps: int) -> None:
        self.bar = host.progress_bar(total_steps)
        self.preview_size = host.preview_max_size() if self.bar is not None else None

    def __call__(self, step) -> None:
        host.throw_if_interrupted()
        if self.bar is None:
            return
        preview = None
        if self.preview_size:
            if PIPELINE_CACHE.preview_factors is None:  # loaded while previews were off
                pipeline = PIPELINE_CACHE.pipeline
                PIPELINE_CACHE.preview_factors = fit_latent_to_rgb(pipeline.vae, pipeline._execution_device)
            image = latent_preview(step.denoised, PIPELINE_CACHE.preview_factors, self.preview_size)
            preview = ("JPEG", image, self.preview_size)
        self.bar.update_absolute(step.step + 1, step.total_steps, preview)


class DualTaskSampler:
    """SDV-Gen sampling: the reference image enters every transformer block as extra tokens."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (PIPE, {"tooltip": "From Load SDV LoRA."}),
                "conditioning": (CONDITIONING, {"tooltip": "From CLS Prompt (same base model)."}),
                "reference": (REFERENCE, {
                    "tooltip": "From Subject Reference Encode; it also sets the video width and height.",
                }),
                "frames": ("INT", {
                    "default": MAX_FRAMES, "min": 1, "max": MAX_FRAMES, "step": 4,
                    "tooltip": "Video length, 4k+1 frames (1, 5, ..., 49). CogVideoX-5B is trained on 49.",
                }),
                "steps": ("INT", {
                    "default": 50, "min": 1, "max": 500,
                    "tooltip": "Denoising steps; 50 as the authors sample. Fewer is faster and rougher.",
                }),
                "cfg": ("FLOAT", {
                    "default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                    "tooltip": "Text guidance (classifier-free). 6 as released; 1 or less turns it off (one pass "
                               "per step instead of two).",
                }),
                "reference_guidance": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 10.0, "step": 0.1, "round": 0.01,
                    "tooltip": "Extra push towards the reference identity: s * (with ref - without ref), one more "
                               "model pass per step. 0 = off, as released; try 1-3 for a stronger likeness.",
                }),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                    "tooltip": "Noise seed; the same seed and settings give the same video.",
                }),
                "scheduler": (SCHEDULERS, {
                    "default": "ddim",
                    "tooltip": "ddim: CogVideoX DDIM, as released. dpm: CogVideoX DPM (pair it with dynamic_cfg).",
                }),
                "dynamic_cfg": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "CogVideoX's dynamic CFG: guidance rises from 1 to 1 + cfg over the steps.",
                }),
            }
        }

    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Video latents for SDV-Gen Decode.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates a video of the reference subject doing what the prompt says (CogVideoX-5B + SDV-Gen)."

    @classmethod
    def VALIDATE_INPUTS(cls, frames):
        # Only frames (see validation.py); the size comes with the reference, checked on Subject Reference
        # Encode. cfg and reference_guidance (NaN only via the API) are checked when the node starts.
        return validation.result(validation.frame_count(frames))

    def sample(self, model, conditioning, reference, frames, steps, cfg, reference_guidance, seed, scheduler,
               dynamic_cfg):
        import torch

        problem = validation.result(validation.finite("cfg", cfg), validation.finite("reference_guidance", reference_guidance))
        if problem is not True:
            raise sdvgen_core.SDVGenError(problem)
        check_same_model(model, "the conditioning", conditioning)
        check_same_model(model, "the reference", reference)
        pipeline = model.pipeline()
        pipeline.set_scheduler(scheduler)
        try:
            output = pipeline(
                prompt_embeds=conditioning.prompt_embeds,
                negative_prompt_embeds=conditioning.negative_prompt_embeds,
                reference_latents=reference.latents,
                height=reference.height,
                width=reference.width,
                num_frames=frames,
                num_inference_steps=steps,
                guidance_scale=cfg,
                use_dynamic_cfg=dynamic_cfg,
                reference_guidance_scale=reference_guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
                callback=StepReporter(steps),
            )
        except BaseException:
            # Cancel (the host's interrupt exception) or an error: the pipeline already dropped its step
            # tensors and offload hooks; hand the freed device memory back before ComfyUI goes on.
            host.free_host_memory()
            raise
        return (SDVGenLatent(output.latents.cpu(), model.base.model_dir),)


class SDVGenDecode:
    """Video latents -> ComfyUI IMAGE frames `[T, H, W, C]` in 0..1 (for Save Animated WEBP, Create Video, ...)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (PIPE, {"tooltip": "From Load SDV LoRA: its VAE decodes the latents."}),
                "latent": (LATENT, {"tooltip": "From the Dual-Task Sampler."}),
                "tiled": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Decode in overlapping tiles: much less GPU memory at 720x480, slightly slower.",
                }),
                "tile_height": ("INT", {
                    "default": 240, "min": 64, "max": 2048, "step": 8,
                    "tooltip": "Tile height in pixels (tiled decode only).",
                }),
                "tile_width": ("INT", {
                    "default": 360, "min": 64, "max": 2048, "step": 8,
                    "tooltip": "Tile width in pixels (tiled decode only).",
                }),
                "tile_overlap": ("FLOAT", {
                    "default": 0.2, "min": 0.0, "max": 0.5, "step": 0.05,
                    "tooltip": "Fraction of a tile that overlaps its neighbour (hides seams; tiled decode only).",
                }),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("Video frames as an IMAGE batch [frames, height, width, 3] in 0..1.",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Decodes SDV-Gen video latents to frames with the CogVideoX VAE."

    @classmethod
    def VALIDATE_INPUTS(cls, tile_overlap):
        # Tile sizes are INTs, kept in range by ComfyUI's min/max; a NaN overlap would pass those.
        return validation.result(validation.finite("tile_overlap", tile_overlap))

    def decode(self, model, latent, tiled, tile_height, tile_width, tile_overlap):
        check_same_model(model, "the latent", latent)
        host.throw_if_interrupted()  # a Cancel pressed as sampling ended stops before the long decode
        pipeline = model.pipeline()
        try:
            frames = pipeline.decode(
                latent.latents, tiled=tiled, tile_sample_min_height=tile_height, tile_sample_min_width=tile_width,
                tile_overlap_factor=tile_overlap,
            )
        finally:
            pipeline.maybe_free_model_hooks()
        return (frames[0].permute(0, 2, 3, 1).float().cpu().contiguous(),)
