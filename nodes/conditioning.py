"""CLS Prompt and Subject Reference Encode: the text and the subject image, encoded once for the sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import validation
from .core import core_module, sdvgen_core
from .types import CATEGORY, CONDITIONING, FIT_MODES, MAX_SIZE, PIPE, REFERENCE, SIZE_STEP

# The reference latent is *sampled* from the VAE posterior (as in training); a fixed seed makes the same
# image always give the same reference, so ComfyUI's cache and the sampler's seed stay meaningful.
REFERENCE_SEED = 0


@dataclass(frozen=True)
class SDVGenConditioning:
    """What an SDVGEN_COND socket carries: T5 embeddings `[1, 226, D]` of the prompt and the negative prompt."""

    prompt: str  # as encoded, with <cls>
    negative_prompt: str
    prompt_embeds: object  # torch.Tensor, on the CPU
    negative_prompt_embeds: object
    model_dir: Path


@dataclass(frozen=True)
class SDVGenReference:
    """What an SDVGEN_REFERENCE socket carries: reference latents `[1, 1, C, h, w]` for a `width` x `height` video."""

    latents: object  # torch.Tensor, on the CPU
    width: int
    height: int
    model_dir: Path


class CLSPrompt:
    """Prompt with `<cls>` placed before the subject word, encoded by the model's T5."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (PIPE, {"tooltip": "From Load SDV LoRA: its T5 text encoder encodes the prompts."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "a toy robot walks through a snowy forest, cinematic lighting",
                    "tooltip": "What the subject does and where. <cls> is put before the subject word (or typed "
                               "yourself); prompts over 226 tokens are cut (the log quotes what was cut).",
                }),
                "subject": ("STRING", {
                    "default": "robot",
                    "tooltip": "A word of the prompt naming the subject (e.g. 'robot'); <cls> goes right before it. "
                               "Empty: <cls> goes at the start of the prompt.",
                }),
                "negative_prompt": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What to steer away from (used when cfg > 1). Empty, as the authors sample.",
                }),
            }
        }

    RETURN_TYPES = (CONDITIONING, "STRING")
    RETURN_NAMES = ("conditioning", "encoded_prompt")
    OUTPUT_TOOLTIPS = ("Prompt embeddings for the Dual-Task Sampler.", "The prompt exactly as encoded, with <cls>.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Encodes the prompt with the <cls> subject token and shows the final prompt text."

    @classmethod
    def VALIDATE_INPUTS(cls, prompt, subject):
        # One concern, where <cls> goes: an empty prompt or a subject word missing from it.
        if prompt is None or subject is None:  # fed by a link: known only when running
            return True
        if not prompt.strip():
            return "prompt is empty; describe what the subject does"
        try:
            sdvgen_core.insert_cls(prompt.strip(), subject)
        except sdvgen_core.SDVGenError as error:
            return str(error)
        return True

    def encode(self, model, prompt, subject, negative_prompt):
        if not prompt.strip():
            raise sdvgen_core.SDVGenError("prompt is empty; describe what the subject does")
        final_prompt = sdvgen_core.insert_cls(prompt.strip(), subject)
        pipeline = model.pipeline()
        try:
            prompt_embeds, negative_embeds = pipeline.encode_prompt(
                final_prompt, negative_prompt, do_classifier_free_guidance=True,
                device=pipeline._execution_device, dtype=pipeline.transformer.dtype,
            )
        finally:
            pipeline.maybe_free_model_hooks()
        conditioning = SDVGenConditioning(
            final_prompt, negative_prompt, prompt_embeds.cpu(), negative_embeds.cpu(), model.base.model_dir
        )
        return {"ui": {"text": [final_prompt]}, "result": (conditioning, final_prompt)}


def comfy_image_to_chw(image):
    """First image of a ComfyUI IMAGE batch `[B, H, W, C]` -> `[C, H, W]`."""
    if image.ndim != 4 or image.shape[0] < 1:
        raise sdvgen_core.SDVGenError(f"image must be a ComfyUI IMAGE [B, H, W, C]; got shape {tuple(image.shape)}")
    return image[0].permute(2, 0, 1)


def comfy_mask_to_subject_mask(mask, height: int, width: int):
    """ComfyUI MASK (1 = masked-out background, as Load Image makes it from alpha) -> subject mask `[1, 1, H, W]`, 1 = subject.

    Takes the first mask of a batch and resizes it to the image (Load Image gives a 64x64 empty mask for
    images without alpha, which means: keep everything).
    """
    import torch.nn.functional as F

    if mask.ndim == 3:
        mask = mask[:1]
    elif mask.ndim != 2:
        raise sdvgen_core.SDVGenError(f"mask must be a ComfyUI MASK [B, H, W] or [H, W]; got shape {tuple(mask.shape)}")
    mask = core_module("reference").unit_range(mask.reshape(1, 1, *mask.shape[-2:]), "mask")  # NaN refused, 0..255 rescaled
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
    return (1.0 - mask).clamp(0.0, 1.0)


class SubjectReferenceEncode:
    """Subject photo -> reference latents; sets the video size."""

    @classmethod
    def INPUT_TYPES(cls):
        size = {"min": SIZE_STEP, "max": MAX_SIZE, "step": SIZE_STEP}
        return {
            "required": {
                "model": (PIPE, {"tooltip": "From Load SDV LoRA: its VAE encodes the reference."}),
                "image": ("IMAGE", {
                    "tooltip": "Photo of the subject, any size (fitted to width x height). Of a batch, the first "
                               "image is used.",
                }),
                "width": ("INT", {"default": 720, **size, "tooltip": "Video width in pixels (multiple of 16; "
                                  "CogVideoX-5B is trained at 720)."}),
                "height": ("INT", {"default": 480, **size, "tooltip": "Video height in pixels (multiple of 16; "
                                   "CogVideoX-5B is trained at 480)."}),
                "fit": (FIT_MODES, {
                    "default": "crop",
                    "tooltip": "crop: cover the video size and cut the overflow. pad: fit inside and fill with white. "
                               "stretch: ignore the aspect ratio.",
                }),
            },
            "optional": {
                "mask": ("MASK", {
                    "tooltip": "Background mask as Load Image makes it from transparency: 1 (white) = background, "
                               "blanked to white; 0 = subject. Invert it if yours marks the subject.",
                }),
            },
        }

    RETURN_TYPES = (REFERENCE, "IMAGE")
    RETURN_NAMES = ("reference", "fitted_image")
    OUTPUT_TOOLTIPS = ("Reference latents (and the video size) for the Dual-Task Sampler.",
                       "The reference as the model sees it (fitted, background blanked), for checking.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "Fits the subject photo to the video size, blanks its background and encodes it with the VAE."

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        # The video size for the whole graph: the sampler takes it from this node's reference.
        return validation.result(validation.video_size(width, height))

    def encode(self, model, image, width, height, fit, mask=None):
        import torch

        pixels = comfy_image_to_chw(image)
        subject_mask = None if mask is None else comfy_mask_to_subject_mask(mask, *pixels.shape[-2:])
        fitted = sdvgen_core.prepare_reference_image(pixels, height, width, fit=fit, subject_mask=subject_mask)
        pipeline = model.pipeline()
        try:
            generator = torch.Generator().manual_seed(REFERENCE_SEED)
            latents = sdvgen_core.encode_reference(
                pipeline.vae, fitted, generator=generator, device=pipeline._execution_device
            )
        finally:
            pipeline.maybe_free_model_hooks()
        reference = SDVGenReference(latents.cpu(), width, height, model.base.model_dir)
        return (reference, fitted.permute(0, 2, 3, 1).contiguous())
