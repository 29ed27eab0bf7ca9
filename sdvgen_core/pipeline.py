"""Subject-driven CogVideoX sampling: `SDVGenPipeline` (a `CogVideoXPipeline` with reference tokens).

Guidance follows the authors' release: the reference tokens are in both halves of the CFG batch, so
classifier-free guidance is over the text only. `reference_guidance_scale` (off by default) adds an
extra branch without the reference and pushes the prediction away from it:

    v = v(∅, ref) + cfg * (v(text, ref) - v(∅, ref)) + reference_guidance_scale * (v(text, ref) - v(text, ∅))
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
)
from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps
from transformers import AutoTokenizer, T5EncoderModel

from .acceleration import AccelerationConfig, after_lora_change, apply_acceleration, check_acceleration, editable_weights
from .acceleration import apply_group_offload, remove_group_offload, resolve_memory_mode, with_options
from .errors import ModelLoadError, SDVGenError
from .lora import DEFAULT_ADAPTER, LoraFileInfo, is_fused, load_lora
from .prompts import ClsTokenInfo, add_cls_token, encode_prompts
from .reference import FitMode, ImageInput, encode_reference, prepare_reference_image
from .transformer import SDVGenTransformer3DModel

logger = logging.getLogger(__name__)

MODEL_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}


class MemoryMode(str, Enum):
    AUTO = "auto"  # on_device on a CPU (silently); on a GPU chosen by its memory (acceleration.resolve_memory_mode)
    ON_DEVICE = "on_device"  # everything resident on the device: fastest, most memory
    MODEL_OFFLOAD = "model_offload"  # one whole model on the device at a time
    GROUP_OFFLOAD = "group_offload"  # groups of blocks streamed in ahead of use ("block swap")
    SEQUENTIAL_OFFLOAD = "sequential_offload"  # one layer at a time: least memory, slowest


@dataclass
class StepInfo:
    """What a step callback sees after denoising step `step` (0-based) of `total_steps`."""

    step: int
    total_steps: int
    timestep: int
    latents: torch.Tensor  # [B, T, C, h, w] after this step
    denoised: torch.Tensor  # [B, T, C, h, w] current clean-latent estimate, for previews


StepCallback = Callable[[StepInfo], None]


@dataclass
class SDVGenOutput:
    frames: torch.Tensor | None  # [B, T, 3, H, W] in 0..1 (None for output_type="latent")
    latents: torch.Tensor  # [B, T, C, h, w] final latents


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SDVGenError(f"precision {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """Raise `ModelLoadError` naming what is missing unless `model_dir` is a CogVideoX diffusers folder with safetensors."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(
            f"model folder {str(root)!r} does not exist; download CogVideoX-5B in diffusers layout "
            f"(THUDM/CogVideoX-5b) and point to the folder that holds {', '.join(MODEL_SUBFOLDERS)}"
        )
    missing = [name for name in MODEL_SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"model folder {str(root)!r} lacks the subfolder(s) {missing}; expected the diffusers layout "
            f"{list(MODEL_SUBFOLDERS)} (as in THUDM/CogVideoX-5b)"
        )
    for name in ("transformer", "vae", "text_encoder"):
        folder = root / name
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{str(folder)!r} has no config.json; the model folder is incomplete")
        if not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.glob("*.bin"))
            hint = f" (found only pickle files {pickles}, which are never loaded)" if pickles else ""
            raise ModelLoadError(f"{str(folder)!r} has no .safetensors weights{hint}; convert or re-download them")
    return root


class SDVGenPipeline(CogVideoXPipeline):
    """CogVideoX-5B text-to-video with a subject reference image (zero-shot SDV-Gen).

    Construction registers `<cls>` with the tokenizer (and, only if its table is full, the text encoder).
    """

    transformer: SDVGenTransformer3DModel

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler) -> None:
        super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)
        self.cls_info: ClsTokenInfo = add_cls_token(self.tokenizer, self.text_encoder)
        self.lora_info: LoraFileInfo | None = None
        self.memory_mode = MemoryMode.ON_DEVICE
        self.memory_device: torch.device | None = None
        self.acceleration = AccelerationConfig()
        self._warned_no_accelerator = False  # the CPU fallback warns once per loaded pipeline

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | os.PathLike,
        dtype: str | torch.dtype = "bf16",
        lora_path: str | os.PathLike | None = None,
        lora_strength: float = 1.0,
        fuse_lora: bool = False,
        scheduler: str = "ddim",
    ) -> "SDVGenPipeline":
        """Load a CogVideoX diffusers folder (safetensors only) on the CPU, optionally with a LoRA.

        Call `set_memory_mode` afterwards to place it on a device.
        """
        root = check_model_dir(model_dir)
        torch_dtype = resolve_dtype(dtype)
        try:
            transformer = SDVGenTransformer3DModel.from_pretrained(
                root, subfolder="transformer", torch_dtype=torch_dtype, use_safetensors=True
            )
            vae = AutoencoderKLCogVideoX.from_pretrained(
                root, subfolder="vae", torch_dtype=torch_dtype, use_safetensors=True
            )
            text_encoder = T5EncoderModel.from_pretrained(
                root / "text_encoder", torch_dtype=torch_dtype, use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot load the model in {str(root)!r}: {error}") from error
        transformer.check_supported()
        scheduler_class = SCHEDULERS.get(scheduler)
        if scheduler_class is None:
            raise SDVGenError(f"scheduler {scheduler!r} is not one of {sorted(SCHEDULERS)}")
        pipe = cls(tokenizer, text_encoder, vae, transformer, scheduler_class.from_pretrained(root, subfolder="scheduler"))
        if lora_path is not None:
            pipe.set_lora(lora_path, lora_strength, fuse=fuse_lora)
        return pipe

    def set_lora(
        self, path: str | os.PathLike | None, strength: float = 1.0, fuse: bool = False
    ) -> LoraFileInfo | None:
        """Load the SDV-Gen LoRA (or replace it, or remove it with `path=None`) at `strength`; `fuse` merges it.

        The same file again only changes strength and fusing. Safe under every memory mode: offload hooks
        (sequential offload parks the weights on the meta device) are taken off while the weights change
        and put back afterwards (group offload re-reads the changed weights).
        """
        offloaded = self.memory_mode is not MemoryMode.ON_DEVICE
        if offloaded:
            self.remove_all_hooks()
        try:
            with editable_weights(self.transformer, keep_unfused=fuse):  # fp8 layers: edits in compute precision
                if is_fused(self.transformer):
                    self.transformer.unfuse_lora()
                if path is None:
                    if DEFAULT_ADAPTER in getattr(self.transformer, "peft_config", {}):
                        self.transformer.delete_adapters(DEFAULT_ADAPTER)
                    self.lora_info = None
                elif self.lora_info is not None and Path(self.lora_info.path) == Path(path):
                    self.transformer.set_adapters([DEFAULT_ADAPTER], weights=[strength])
                else:
                    self.lora_info = None  # until the new file is in: a failed load leaves no stale record
                    self.lora_info = load_lora(self.transformer, path, strength=strength, adapter_name=DEFAULT_ADAPTER)
                if fuse and self.lora_info is not None:
                    self.transformer.fuse_lora(adapter_names=[DEFAULT_ADAPTER])
        finally:
            after_lora_change(self)
            if offloaded:
                self._place(self.memory_mode, self.memory_device)
        return self.lora_info

    def set_scheduler(self, name: str) -> None:
        if name not in SCHEDULERS:
            raise SDVGenError(f"scheduler {name!r} is not one of {sorted(SCHEDULERS)}")
        if not isinstance(self.scheduler, SCHEDULERS[name]):
            self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config)

    def set_memory_mode(self, mode: MemoryMode | str, device: torch.device | str) -> None:
        """Place the models: all on `device`, or offloaded to the CPU and brought to `device` when used.

        `auto` picks by device memory (`acceleration.resolve_memory_mode`) and is silent on a CPU; an explicit
        offload mode on a CPU falls back to on_device with one warning per loaded pipeline.
        """
        device = torch.device(device)
        requested = MemoryMode(mode)
        mode = MemoryMode(resolve_memory_mode(requested.value, device))
        if mode is not MemoryMode.ON_DEVICE and device.type == "cpu":
            if not self._warned_no_accelerator:
                logger.warning("memory mode %s needs an accelerator; running everything on the CPU", mode.value)
                self._warned_no_accelerator = True
            mode = MemoryMode.ON_DEVICE
        self._place(mode, device)

    def _place(self, mode: MemoryMode, device: torch.device) -> None:
        """Apply `mode` as is (group offload also runs with the CPU as both devices, which the tests use)."""
        self.remove_all_hooks()
        remove_group_offload(self)
        if mode is MemoryMode.ON_DEVICE:
            self.to(device)
        elif mode is MemoryMode.MODEL_OFFLOAD:
            self.enable_model_cpu_offload(device=device)
        elif mode is MemoryMode.GROUP_OFFLOAD:
            apply_group_offload(self, device, self.acceleration.blocks_per_group)
        else:
            self.enable_sequential_cpu_offload(device=device)
        self.memory_mode = mode
        self.memory_device = device

    def configure_acceleration(self, device: torch.device | str | None = None, **options) -> None:
        """Set speed/memory options (`sdvgen_core.acceleration.AccelerationConfig` fields): `weights` ("precision" |
        "fp8"), `compile` ("off" | "blocks"), `attention` ("sdpa" | "flash" | "sage" | "xformers"), `cache`
        ("off" | "first_block"), `cache_threshold`, `blocks_per_group`. Unnamed options keep their value.
        `device`: where it will run (default: where the models are placed); call before `set_memory_mode` so
        fp8 casting happens on the CPU.

        Checked first (`SDVGenError` naming the option); then applied with diffusers' hooks, with the models
        off their offload hooks while they change.
        """
        config = with_options(self.acceleration, **options)
        device = torch.device(device) if device is not None else self.memory_device or self._execution_device
        check_acceleration(config, device, self.transformer.dtype)
        mode, placed = self.memory_mode, self.memory_device is not None
        if placed:
            self.remove_all_hooks()
            remove_group_offload(self)
        try:
            apply_acceleration(self, config)
        finally:
            if placed:
                self._place(mode, self.memory_device)

    def _get_t5_prompt_embeds(self, prompt=None, num_videos_per_prompt=1, max_sequence_length=226, device=None, dtype=None):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        embeds = encode_prompts(
            self.tokenizer, self.text_encoder, prompt, device or self._execution_device,
            dtype or self.text_encoder.dtype, max_sequence_length,
        )
        return embeds.repeat_interleave(num_videos_per_prompt, dim=0)

    def encode_reference_image(
        self,
        image: ImageInput,
        height: int,
        width: int,
        fit: FitMode | str = FitMode.CROP,
        subject_mask: ImageInput | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Subject image -> reference latents `[1, 1, C, height/8, width/8]`."""
        pixels = prepare_reference_image(image, height, width, fit=fit, subject_mask=subject_mask)
        return encode_reference(self.vae, pixels, generator=generator, device=self._execution_device)

    def check_generation_args(self, height: int, width: int, num_frames: int, num_inference_steps: int) -> None:
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise SDVGenError(f"size {width}x{height} must be positive multiples of {multiple} (e.g. 720x480)")
        limit = self.transformer.config.sample_frames
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal or num_frames > limit:
            raise SDVGenError(
                f"frames={num_frames} must be 4k+1 (1, 5, 9, ..., {limit}) and at most the model's {limit}"
            )
        if num_inference_steps < 1:
            raise SDVGenError(f"steps={num_inference_steps} must be at least 1")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        reference_image: ImageInput | None = None,
        reference_latents: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 720,
        num_frames: int = 49,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        reference_guidance_scale: float = 0.0,
        fit: FitMode | str = FitMode.CROP,
        subject_mask: ImageInput | None = None,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        output_type: str = "pt",
        callback: StepCallback | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> SDVGenOutput:
        """Generate `[B, num_frames, 3, height, width]` frames (or latents with `output_type="latent"`).

        Give the subject as `reference_image` (fitted and VAE-encoded here) or as ready `reference_latents`
        `[B, 1, C, h, w]`; with neither it is plain CogVideoX text-to-video. `callback` runs after every step
        and may raise (e.g. `GenerationCancelled`) to stop. `prompt_embeds` / `negative_prompt_embeds`
        `[B, 226, D]` replace `prompt` / `negative_prompt` when the text was encoded beforehand (ComfyUI's
        prompt node encodes once and its result is cached).
        """
        self.check_generation_args(height, width, num_frames, num_inference_steps)
        if reference_guidance_scale and reference_image is None and reference_latents is None:
            raise SDVGenError("reference_guidance_scale needs a reference image")
        if (prompt is None) == (prompt_embeds is None):
            raise SDVGenError("give either a prompt or prompt_embeds, not both or neither")
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        device = self._execution_device
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0

        prompt_embeds, negative_embeds = self.encode_prompt(
            prompts, negative_prompt, do_cfg, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, device=device, dtype=dtype,
        )
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if negative_embeds is not None:
            negative_embeds = negative_embeds.to(device=device, dtype=dtype)
        if reference_image is not None:
            reference_latents = self.encode_reference_image(
                reference_image, height, width, fit=fit, subject_mask=subject_mask, generator=generator
            )
        if reference_latents is not None:
            reference_latents = reference_latents.to(device=device, dtype=dtype)
            if reference_latents.shape[0] == 1 and batch_size > 1:
                reference_latents = reference_latents.expand(batch_size, -1, -1, -1, -1)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        latents = self.prepare_latents(
            batch_size, self.transformer.config.in_channels, num_frames, height, width, dtype, device, generator
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        text_embeds = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        branch_reference = (
            torch.cat([reference_latents] * 2) if do_cfg and reference_latents is not None else reference_latents
        )

        old_pred_original_sample = None
        try:
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
                    # Each transformer call of a step has its own cache context: step caches never cross branches.
                    with self.transformer.cache_context("cfg_batch"):
                        velocity = self.transformer(
                            hidden_states=model_input,
                            encoder_hidden_states=text_embeds,
                            timestep=t.expand(model_input.shape[0]),
                            reference_latents=branch_reference,
                            return_dict=False,
                        )[0].float()
                    scale = guidance_scale
                    if use_dynamic_cfg:
                        scale = 1 + guidance_scale * (
                            (1 - math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)) / 2
                        )
                    if do_cfg:
                        velocity_uncond, velocity_text = velocity.chunk(2)
                        velocity = velocity_uncond + scale * (velocity_text - velocity_uncond)
                    else:
                        velocity_text = velocity
                    if reference_guidance_scale:
                        with self.transformer.cache_context("no_reference"):
                            velocity_no_reference = self.transformer(
                                hidden_states=self.scheduler.scale_model_input(latents, t),
                                encoder_hidden_states=prompt_embeds,
                                timestep=t.expand(latents.shape[0]),
                                return_dict=False,
                            )[0].float()
                        velocity = velocity + reference_guidance_scale * (velocity_text - velocity_no_reference)

                    if isinstance(self.scheduler, CogVideoXDPMScheduler):
                        latents, old_pred_original_sample = self.scheduler.step(
                            velocity, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
                            **extra_step_kwargs, return_dict=False,
                        )
                        denoised = old_pred_original_sample
                    else:
                        step_output = self.scheduler.step(velocity, t, latents, **extra_step_kwargs)
                        latents, denoised = step_output.prev_sample, step_output.pred_original_sample
                    latents = latents.to(dtype)
                    progress_bar.update()
                    if callback is not None:
                        callback(StepInfo(i, num_inference_steps, int(t), latents, denoised))
            frames = None if output_type == "latent" else self.decode(latents)
        finally:
            self.maybe_free_model_hooks()
        return SDVGenOutput(frames=frames, latents=latents)

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        tiled: bool = False,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_overlap_factor: float | None = None,
        sliced: bool = False,
    ) -> torch.Tensor:
        """Latents `[B, T, C, h, w]` -> frames `[B, 4(T-1)+1, 3, 8h, 8w]` in 0..1.

        `tiled` decodes in overlapping spatial tiles, `sliced` one video of the batch at a time; both trade
        speed for memory.
        """
        if tiled:
            self.vae.enable_tiling(
                tile_sample_min_height, tile_sample_min_width, tile_overlap_factor, tile_overlap_factor
            )
        else:
            self.vae.disable_tiling()
        if sliced:
            self.vae.enable_slicing()
        else:
            self.vae.disable_slicing()
        latents = latents.to(device=self._execution_device, dtype=self.vae.dtype)
        frames = self.decode_latents(latents)  # [B, 3, F, H, W] in -1..1
        # The VAE keeps the first latent frame as one frame only when the latent count is odd (13 for
        # 49 frames); an even count comes back as 4T frames, whose 3 leading extras are dropped.
        expected = self.vae_scale_factor_temporal * (latents.shape[1] - 1) + 1
        frames = frames[:, :, frames.shape[2] - expected :]
        return ((frames.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 1, 3, 4)
