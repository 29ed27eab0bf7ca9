"""Native Wan 2.2 TI2V-5B nodes: SDV-Gen on the core Wan graph (UNETLoader, CLIPLoader, VAELoader, KSampler).

The subject reference patches the core MODEL through ComfyUI's wrapper interface (a clone with a
`DIFFUSION_MODEL` wrapper, see `wan_patch.ReferenceTokensWrapper`); nothing in ComfyUI is edited, and
sampling, previews, cancel, CFG and memory management stay ComfyUI's own. The host modules are imported
when a node runs, never at import.
"""

from __future__ import annotations

from .core import core_module, sdvgen_core
from .host import LORA_FOLDER, comfy_module, lora_files, where
from .types import CATEGORY, MAX_SIZE
from .wan_patch import (
    REFERENCE_TIMESTEPS,
    UMT5_SENTINEL_COUNT,
    WAN22_LATENT_CHANNELS,
    WAN22_SIZE_STEP,
    ReferenceTokensWrapper,
    insert_token_for_marker,
    wan22_latent_shape,
    wan22_video_size_problem,
)

WRAPPER_KEY = "sdvgen_subject_reference"
MAX_LENGTH = 1025  # frames; Wan 2.2 TI2V-5B is trained on 121


def _host(name: str):
    module = comfy_module(name)
    if module is None:
        raise sdvgen_core.SDVGenError(f"this node needs ComfyUI (module {name!r} is not importable)")
    return module


def _require_wan22(model) -> None:
    wan = _host("comfy.ldm.wan.model")
    diffusion_model = getattr(model.model, "diffusion_model", None)
    channels = model.model.latent_format.latent_channels
    if not isinstance(diffusion_model, wan.WanModel) or channels != WAN22_LATENT_CHANNELS:
        raise sdvgen_core.SDVGenError(
            f"model must be Wan 2.2 TI2V-5B (wan2.2_ti2v_5B_fp16.safetensors in UNETLoader); got "
            f"{type(diffusion_model).__name__} with {channels} latent channels"
        )


class WanSubjectReference:
    """Subject photo -> the core Wan 2.2 MODEL patched to see it as reference tokens, and the empty video latent."""

    @classmethod
    def INPUT_TYPES(cls):
        size = {"min": WAN22_SIZE_STEP, "max": MAX_SIZE, "step": WAN22_SIZE_STEP}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Wan 2.2 TI2V-5B from UNETLoader (with the SDV-Gen Wan LoRA applied)."}),
                "vae": ("VAE", {"tooltip": "The Wan 2.2 VAE (wan2.2_vae) from VAELoader; encodes the subject photo."}),
                "image": ("IMAGE", {"tooltip": "Photo of the subject, any size; centre-cropped to width x height. "
                                               "Of a batch, the first image is used."}),
                "width": ("INT", {"default": 1280, **size, "tooltip": "Video width in pixels (multiple of 32; "
                                  "Wan 2.2 TI2V-5B is trained at 1280x704 / 704x1280)."}),
                "height": ("INT", {"default": 704, **size, "tooltip": "Video height in pixels (multiple of 32)."}),
                "length": ("INT", {"default": 121, "min": 1, "max": MAX_LENGTH, "step": 4,
                                   "tooltip": "Frames, 4k + 1 (121 = 5 s at Wan 2.2's 24 fps)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Videos sampled at once."}),
                "reference_timestep": (REFERENCE_TIMESTEPS, {
                    "default": "clean",
                    "tooltip": "Timestep of the reference tokens. clean (default): 0, as Wan 2.2 TI2V treats a clean "
                               "conditioning frame; video: the video's, as on CogVideoX. Use the LoRA's training mode.",
                }),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Background mask as Load Image makes it from transparency: 1 = background, "
                                             "blanked to white; 0 = subject."}),
            },
        }

    RETURN_TYPES = ("MODEL", "LATENT", "IMAGE")
    RETURN_NAMES = ("model", "latent", "reference_image")
    OUTPUT_TOOLTIPS = (
        "The model, patched: every sampling step sees the subject as an extra latent frame in front of the video.",
        "Empty video latent of this size for KSampler (as Wan22ImageToVideoLatent makes it).",
        "The reference as the model sees it (cropped, background blanked), for checking.",
    )
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("SDV-Gen on Wan 2.2: encodes the subject photo with the Wan VAE and patches the model so every "
                   "sampling call runs on [reference frame ; video] and returns the video frames.")

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, length=None, batch_size=None):
        # ComfyUI passes only widget values: an input fed by a link arrives as None and is checked when the node runs.
        problem = None
        if None not in (width, height, length):
            problem = wan22_video_size_problem(width, height, length)
        if problem is None and batch_size is not None and not 1 <= batch_size <= 64:
            problem = f"batch_size must be 1..64 (got {batch_size})"
        return problem or True

    def apply(self, model, vae, image, width, height, length, batch_size, reference_timestep, mask=None):
        import torch

        problem = self.VALIDATE_INPUTS(width, height, length, batch_size)
        if problem is not True:
            raise sdvgen_core.SDVGenError(problem)
        if reference_timestep not in REFERENCE_TIMESTEPS:
            raise sdvgen_core.SDVGenError(f"reference_timestep must be one of {REFERENCE_TIMESTEPS}, got {reference_timestep!r}")
        if image.ndim != 4 or image.shape[0] < 1 or image.shape[-1] < 3:
            raise sdvgen_core.SDVGenError(f"image must be a ComfyUI IMAGE [B, H, W, C]; got shape {tuple(image.shape)}")
        _require_wan22(model)
        utils, management = _host("comfy.utils"), _host("comfy.model_management")

        pixels = utils.common_upscale(image[:1, :, :, :3].movedim(-1, 1), width, height, "bilinear", "center")
        if mask is not None:
            background = mask.reshape(-1, 1, *mask.shape[-2:])[:1].to(pixels)
            background = utils.common_upscale(background, width, height, "bilinear", "center").clamp(0.0, 1.0)
            pixels = pixels * (1.0 - background) + background
        pixels = pixels.movedim(1, -1)
        # The VAE gives latents in its own scale; the model samples normalised ones (KSampler applies the same
        # process_latent_in to the latent it is given).
        reference = model.model.process_latent_in(vae.encode(pixels)).to(management.intermediate_device(), torch.float32)
        if tuple(reference.shape[1:3]) != (WAN22_LATENT_CHANNELS, 1):
            raise sdvgen_core.SDVGenError(
                f"vae must be the Wan 2.2 VAE (wan2.2_vae.safetensors); its latent of the photo has shape "
                f"{tuple(reference.shape)}, expected [1, {WAN22_LATENT_CHANNELS}, 1, h, w]"
            )

        patched = model.clone()
        wrappers = _host("comfy.patcher_extension").WrappersMP
        for kind in (wrappers.DIFFUSION_MODEL, wrappers.PREPARE_SAMPLING):  # a second reference replaces ours only
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        wrapper = ReferenceTokensWrapper(reference, reference_timestep == "clean")
        patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
        patched.add_wrapper_with_key(wrappers.PREPARE_SAMPLING, WRAPPER_KEY, wrapper.prepare_sampling)
        latent = torch.zeros(wan22_latent_shape(batch_size, width, height, length), device=management.intermediate_device())
        return (patched, {"samples": latent}, pixels)


class WanCLSTextEncode:
    """Prompt with `<cls>` before the subject word, encoded by the core Wan text encoder (UMT5-XXL)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "umt5_xxl from CLIPLoader with type wan (Wan family only: the <cls> id "
                                             "is UMT5's tokenizer length, 256300)."}),
                "prompt": ("STRING", {
                    "multiline": True, "dynamicPrompts": True,
                    "default": "a toy robot walks through a snowy forest, cinematic lighting",
                    "tooltip": "What the subject does and where. <cls> is put before the subject word (or typed "
                               "yourself); ComfyUI's (word:1.2) weights work as in CLIP Text Encode.",
                }),
                "subject": ("STRING", {
                    "default": "robot",
                    "tooltip": "A word of the prompt naming the subject (e.g. 'robot'); <cls> goes right before it. "
                               "Empty: <cls> goes at the start of the prompt.",
                }),
            }
        }

    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "encoded_prompt")
    OUTPUT_TOOLTIPS = ("Text conditioning for KSampler (positive).", "The prompt exactly as encoded, with <cls>.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("CLIP Text Encode for SDV-Gen on Wan: <cls> before the subject word, encoded as UMT5's spare "
                   "token id 256300 (an existing, unused embedding row), and the final prompt text.")

    def encode(self, clip, prompt, subject):
        if not prompt.strip():
            raise sdvgen_core.SDVGenError("prompt is empty; describe what the subject does")
        if getattr(clip.tokenizer, "clip_name", None) != "umt5xxl":
            raise sdvgen_core.SDVGenError(
                "clip must be Wan's UMT5-XXL text encoder (CLIPLoader: umt5_xxl, type wan); the <cls> rule here is "
                "for the Wan family (CogVideoX uses the CLS Prompt node)"
            )
        final_prompt = sdvgen_core.insert_cls(prompt.strip(), subject)
        tokenizer = getattr(clip.tokenizer, clip.tokenizer.clip)
        cls_id = tokenizer.tokenizer.tokenizer.get_piece_size() + UMT5_SENTINEL_COUNT
        encoder = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
        rows = encoder.transformer.get_input_embeddings().weight.shape[0]
        if cls_id >= rows:
            raise sdvgen_core.SDVGenError(
                f"clip: the text encoder's embedding table has {rows} rows, no spare row for <cls> (id {cls_id}); "
                f"use the umt5_xxl text encoder of Wan 2.1/2.2 (256384 rows)"
            )
        # The tokenizer splits text into words and has no <cls>: the pieces of the word "<cls>" are swapped
        # for the single id, as the transformers tokenizer with <cls> added would produce it.
        marker = [token for token, *_ in tokenizer.tokenize_with_weights("<cls>")[0]
                  if token not in (tokenizer.end_token, tokenizer.pad_token)]
        tokens = clip.tokenize(final_prompt)
        tokens[clip.tokenizer.clip_name] = insert_token_for_marker(
            tokens[clip.tokenizer.clip_name], marker, cls_id, tokenizer.pad_token, tokenizer.min_length
        )
        return {"ui": {"text": [final_prompt]}, "result": (clip.encode_from_tokens_scheduled(tokens), final_prompt)}


class WanLoraLoader:
    """An SDV-Gen Wan LoRA (diffusers key layout) applied to the core MODEL with ComfyUI's own LoRA patching."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Wan 2.2 TI2V-5B from UNETLoader."}),
                "lora_name": (sorted(lora_files()), {"tooltip": "SDV-Gen Wan LoRA from models/loras in the diffusers key layout our "
                                                 "trainer writes (its native-key copy goes in LoraLoaderModelOnly)."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01,
                                             "tooltip": "LoRA strength (1.0 as trained)."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA patched in (ComfyUI applies it when the model is loaded).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("LoraLoaderModelOnly for SDV-Gen Wan LoRAs: renames the diffusers keys to ComfyUI's native Wan "
                   "names, then patches the model exactly as the core loader does.")

    @classmethod
    def VALIDATE_INPUTS(cls, strength_model=None):
        if strength_model is not None and not -4.0 <= strength_model <= 4.0:  # also false for NaN
            return f"strength_model must be a number in [-4, 4] (got {strength_model})"
        return True

    def load(self, model, lora_name, strength_model):
        utils, sd, lora_keys = (_host(name) for name in ("comfy.utils", "comfy.sd", "comfy.lora"))
        path = lora_files().get(lora_name)
        if path is None:
            raise sdvgen_core.LoraLoadError(f"lora_name: no file {lora_name!r} in {where(LORA_FOLDER)} (.safetensors only)")
        _require_wan22(model)
        lora = core_module("wan_lora").diffusers_wan_lora_to_native(utils.load_torch_file(str(path), safe_load=True))
        known = lora_keys.model_lora_keys_unet(model.model, {})
        unknown = sorted({key.rsplit(".lora_", 1)[0] for key in lora} - set(known))
        if unknown:  # the core loader would only log and skip these
            raise sdvgen_core.LoraLoadError(
                f"lora_name: {lora_name!r} has {len(unknown)} modules this Wan model lacks, e.g. {unknown[0]!r}"
            )
        patched, _ = sd.load_lora_for_models(model, None, lora, strength_model, 0)
        return (patched,)
