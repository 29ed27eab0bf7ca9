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
from accelerate import init_empty_weights
from transformers import T5Config, T5EncoderModel

from .acceleration import AccelerationConfig, after_lora_change, apply_acceleration, check_acceleration, editable_weights
from .acceleration import apply_group_offload, remove_group_offload, resolve_memory_mode, with_options
from .errors import ModelLoadError, NonFiniteError, SDVGenError
from .lora import DEFAULT_ADAPTER, LoraFileInfo, apply_lora, check_lora_header, fuse_lora, prepare_lora, unfuse_lora
from .model_files import check_model_dir, check_weight_shapes, read_json
from .prompts import ClsTokenInfo, add_cls_token, encode_prompts
from .reference import FitMode, ImageInput, encode_reference, prepare_reference_image
from .text_encoder import load_t5_encoder_file, load_t5_tokenizer
from .transformer import SDVGenTransformer3DModel
from .validation import LORA_STRENGTH_RANGE, GenerationLimits, check_float, check_generation_settings, check_tiles, resolve_device

logger = logging.getLogger(__name__)

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
    """What a step callback sees after denoising step `step` (0-based) of `total_steps`.

    Latents are in the backbone's layout: `[B, T, C, h, w]` for CogVideoX, `[B, C, T, h, w]` for Wan.
    """

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


def check_tokenizer_fits(tokenizer, text_encoder: T5EncoderModel, tokenizer_dir: Path) -> None:
    """The tokenizer's ids must index the text encoder's table (one row short is fine: `<cls>` gets one)."""
    rows = text_encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"the tokenizer in {str(tokenizer_dir)!r} has {len(tokenizer)} tokens but the text encoder only {rows} "
            f"embedding rows; they belong to different models"
        )


def check_finite(tensor: torch.Tensor, what: str, hint: str) -> None:
    """Raise `NonFiniteError` if `tensor` holds NaN or inf (one reduction: cheap next to a model pass)."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contain NaN or infinite values; {hint}")


def non_finite_hint(dtype: torch.dtype) -> str:
    """The likely cause of NaN/inf in a model running in `dtype`, phrased as what to try."""
    if dtype == torch.float16:
        return "fp16 overflows easily on this model: try precision bf16 or fp32"
    return "a LoRA, LoRA strength or guidance scale far outside its usual range is the usual cause"


class SDVGenPipelineMixin:
    """Backbone-independent controls shared by the CogVideoX and Wan SDV-Gen pipelines (LoRA, memory modes,
    argument checks).

    The pipeline calls `_init_controls()` in its `__init__`.
    """

    def set_lora(
        self, path: str | os.PathLike | None, strength: float = 1.0, fuse: bool = False
    ) -> LoraFileInfo | None:
        """Load the SDV-Gen LoRA (or replace it, or remove it with `path=None`) at `strength`; `fuse` merges it.

        `lora_info` always describes what is applied. A file that is refused (missing, damaged, for another
        model, NaN values) or a bad strength changes nothing: the previous LoRA stays applied and reported.
        The same unchanged file again only changes strength and fusing; a file replaced on disk since it was
        read (other size, time or inode) is read again. Safe under every memory mode: offload hooks
        (sequential offload parks the weights on the meta device) are taken off while the weights change
        and put back afterwards.
        """
        strength = check_float("lora_strength", strength, *LORA_STRENGTH_RANGE)
        same_file = path is not None and self.lora_info is not None and self.lora_info.is_file(path)
        prepared = prepare_lora(self.transformer, path) if path is not None and not same_file else None
        offloaded = self.memory_mode is not MemoryMode.ON_DEVICE
        if offloaded:
            self.remove_all_hooks()
        try:
            with editable_weights(self.transformer, keep_unfused=fuse):  # fp8 layers: edits in compute precision
                unfuse_lora(self.transformer)
                if path is None:
                    self._remove_lora()
                elif same_file:
                    self.transformer.set_adapters([DEFAULT_ADAPTER], weights=[strength])
                else:
                    try:
                        self.lora_info = apply_lora(self.transformer, prepared, strength, adapter_name=DEFAULT_ADAPTER)
                    except BaseException:
                        self._remove_lora()  # half-loaded: take it out entirely, so nothing unreported stays applied
                        raise
                if fuse and self.lora_info is not None:
                    fuse_lora(self.transformer, DEFAULT_ADAPTER)
        finally:
            after_lora_change(self)
            if offloaded:
                self._place(self.memory_mode, self.memory_device)
        return self.lora_info

    def _remove_lora(self) -> None:
        if DEFAULT_ADAPTER in getattr(self.transformer, "peft_config", {}):
            self.transformer.delete_adapters(DEFAULT_ADAPTER)
        self.lora_info = None

    def set_memory_mode(self, mode: MemoryMode | str, device: torch.device | str) -> None:
        """Place the models: all on `device`, or offloaded to the CPU and brought to `device` when used.

        `auto` picks by device memory (`acceleration.resolve_memory_mode`) and is silent on a CPU; an explicit
        offload mode on a CPU falls back to on_device with one warning per loaded pipeline.
        """
        try:
            requested = MemoryMode(mode)
        except ValueError:
            raise SDVGenError(f"memory mode {mode!r} is not one of {[m.value for m in MemoryMode]}") from None
        device = resolve_device(device)
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

    def _check_call(
        self, prompt, prompt_embeds, negative_prompt_embeds, reference_image, reference_latents,
        reference_guidance_scale: float, output_type: str,
    ) -> tuple[list[str] | None, int]:
        """The `__call__` checks every backbone shares; returns the prompts as a list (or None) and the batch size."""
        if output_type not in ("pt", "latent"):
            raise SDVGenError(f"output_type {output_type!r} is not one of ['latent', 'pt']")
        for name, tensor in (("reference_latents", reference_latents), ("prompt_embeds", prompt_embeds),
                             ("negative_prompt_embeds", negative_prompt_embeds)):
            if tensor is not None:
                check_finite(tensor, f"{name} (given by the caller)", non_finite_hint(self.transformer.dtype))
        if reference_guidance_scale and reference_image is None and reference_latents is None:
            raise SDVGenError("reference_guidance_scale needs a reference image")
        if (prompt is None) == (prompt_embeds is None):
            raise SDVGenError("give either a prompt or prompt_embeds, not both or neither")
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        return prompts, len(prompts) if prompts is not None else prompt_embeds.shape[0]

    def _encode_text(
        self, prompts, negative_prompt, do_cfg: bool, prompt_embeds, negative_prompt_embeds, **encode_options
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt and negative embeddings on the execution device in the transformer's dtype, checked finite."""
        device, dtype = self._execution_device, self.transformer.dtype
        hint = non_finite_hint(dtype)
        prompt_embeds, negative_embeds = self.encode_prompt(
            prompts, negative_prompt, do_cfg, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, device=device, **encode_options,
        )
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        check_finite(prompt_embeds, "the prompt embeddings", hint)
        if negative_embeds is not None:
            negative_embeds = negative_embeds.to(device=device, dtype=dtype)
            check_finite(negative_embeds, "the negative prompt embeddings", hint)
        return prompt_embeds, negative_embeds

    def _init_controls(self) -> None:
        """The state the controls above keep; called from each pipeline's `__init__`."""
        self.lora_info: LoraFileInfo | None = None
        self.memory_mode = MemoryMode.ON_DEVICE
        self.memory_device: torch.device | None = None
        self.acceleration = AccelerationConfig()
        self._warned_no_accelerator = False  # the CPU fallback warns once per loaded pipeline

    def generation_limits(self) -> GenerationLimits:
        """The sizes and step counts this model can generate."""
        return GenerationLimits.from_configs(
            dict(self.transformer.config), dict(self.vae.config), dict(self.scheduler.config)
        )

    def check_generation_args(
        self,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float = 6.0,
        reference_guidance_scale: float = 0.0,
        eta: float = 0.0,
    ) -> None:
        """Raise `SDVGenError` naming the first setting that is not a finite number in its range (any backbone)."""
        check_generation_settings(
            self.generation_limits(), height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            reference_guidance_scale=reference_guidance_scale, eta=eta,
        )


class SDVGenPipeline(SDVGenPipelineMixin, CogVideoXPipeline):
    """CogVideoX-5B text-to-video with a subject reference image (zero-shot SDV-Gen).

    Construction registers `<cls>` with the tokenizer (and, only if its table is full, the text encoder).
    """

    transformer: SDVGenTransformer3DModel

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler) -> None:
        super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)
        self.cls_info: ClsTokenInfo = add_cls_token(self.tokenizer, self.text_encoder)
        self._init_controls()

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | os.PathLike,
        dtype: str | torch.dtype = "bf16",
        lora_path: str | os.PathLike | None = None,
        lora_strength: float = 1.0,
        fuse_lora: bool = False,
        scheduler: str = "ddim",
        text_encoder_file: str | os.PathLike | None = None,
        fallback_tokenizer_dir: str | os.PathLike | None = None,
    ) -> "SDVGenPipeline":
        """Load a CogVideoX diffusers folder (safetensors only) on the CPU, optionally with a LoRA.

        `text_encoder_file`: a single-file T5-XXL (plain, fp8 or ComfyUI's scaled fp8, see `text_encoder`)
        used instead of the folder's `text_encoder/`, which may then be absent. The tokenizer is the folder's
        `tokenizer/`, else `fallback_tokenizer_dir` (e.g. the T5 tokenizer shipped with ComfyUI). Everything
        that can be checked without loading weights (folder layout, configs, LFS pointers, tokenizer
        vocabulary, weight shapes against configs) is checked first. Call `set_memory_mode` afterwards to
        place the pipeline on a device.
        """
        root = check_model_dir(model_dir, text_encoder_file=text_encoder_file is not None)
        torch_dtype = resolve_dtype(dtype)
        scheduler_class = SCHEDULERS.get(scheduler)
        if scheduler_class is None:
            raise SDVGenError(f"scheduler {scheduler!r} is not one of {sorted(SCHEDULERS)}")
        if lora_path is not None:  # what can be checked without the model, before minutes of loading
            check_float("lora_strength", lora_strength, *LORA_STRENGTH_RANGE)
            check_lora_header(lora_path)
        tokenizer_dir = root / "tokenizer"
        if not tokenizer_dir.is_dir():
            if fallback_tokenizer_dir is None:
                raise ModelLoadError(
                    f"model folder {str(root)!r} has no tokenizer/ for the text encoder file; add the tokenizer/ "
                    f"subfolder of THUDM/CogVideoX-5b to it (inside ComfyUI the host's T5 tokenizer is used)"
                )
            tokenizer_dir = Path(fallback_tokenizer_dir)
        with init_empty_weights():
            meta_transformer = SDVGenTransformer3DModel.from_config(read_json(root / "transformer" / "config.json"))
            meta_transformer.check_supported()
            check_weight_shapes(root / "transformer", meta_transformer)
            check_weight_shapes(root / "vae", AutoencoderKLCogVideoX.from_config(read_json(root / "vae" / "config.json")))
            if text_encoder_file is None:
                text_config = T5Config.from_dict(read_json(root / "text_encoder" / "config.json"))
                check_weight_shapes(root / "text_encoder", T5EncoderModel(text_config))
        tokenizer = load_t5_tokenizer(tokenizer_dir)
        try:
            scheduler_model = scheduler_class.from_pretrained(root, subfolder="scheduler")
            if text_encoder_file is not None:
                text_encoder = load_t5_encoder_file(text_encoder_file, torch_dtype)
            else:
                text_encoder = T5EncoderModel.from_pretrained(
                    root / "text_encoder", torch_dtype=torch_dtype, use_safetensors=True
                )
            check_tokenizer_fits(tokenizer, text_encoder, tokenizer_dir)
            transformer = SDVGenTransformer3DModel.from_pretrained(
                root, subfolder="transformer", torch_dtype=torch_dtype, use_safetensors=True
            )
            vae = AutoencoderKLCogVideoX.from_pretrained(
                root, subfolder="vae", torch_dtype=torch_dtype, use_safetensors=True
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            if isinstance(error, ModelLoadError):
                raise
            raise ModelLoadError(f"cannot load the model in {str(root)!r}: {error}") from error
        pipe = cls(tokenizer, text_encoder, vae, transformer, scheduler_model)
        if lora_path is not None:
            pipe.set_lora(lora_path, lora_strength, fuse=fuse_lora)
        return pipe

    def set_scheduler(self, name: str) -> None:
        if name not in SCHEDULERS:
            raise SDVGenError(f"scheduler {name!r} is not one of {sorted(SCHEDULERS)}")
        if not isinstance(self.scheduler, SCHEDULERS[name]):
            self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config)

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

    def _check_reference_latents_shape(self, latents: torch.Tensor, height: int, width: int, batch_size: int) -> None:
        factor = self.vae_scale_factor_spatial
        channels = self.transformer.config.in_channels
        expected = (1, channels, height // factor, width // factor)
        if latents.ndim != 5 or tuple(latents.shape[1:]) != expected or latents.shape[0] not in (1, batch_size):
            raise SDVGenError(
                f"reference_latents have shape {tuple(latents.shape)}; a {width}x{height} video needs "
                f"[1 or {batch_size}, {', '.join(map(str, expected))}] (encode the reference at the video size)"
            )

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
        self.check_generation_args(
            height, width, num_frames, num_inference_steps, guidance_scale, reference_guidance_scale, eta
        )
        prompts, batch_size = self._check_call(
            prompt, prompt_embeds, negative_prompt_embeds, reference_image, reference_latents,
            reference_guidance_scale, output_type,
        )
        # The image is fitted (and checked: NaN, mask size, fit mode) before the text encoder or VAE runs.
        reference_pixels = (
            None if reference_image is None
            else prepare_reference_image(reference_image, height, width, fit=fit, subject_mask=subject_mask)
        )
        device = self._execution_device
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_embeds = self._encode_text(
            prompts, negative_prompt, do_cfg, prompt_embeds, negative_prompt_embeds, dtype=dtype
        )
        if reference_pixels is not None:
            reference_latents = encode_reference(
                self.vae, reference_pixels, generator=generator, device=self._execution_device
            )
        if reference_latents is not None:
            self._check_reference_latents_shape(reference_latents, height, width, batch_size)
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
                    check_finite(
                        latents, f"the latents after sampling step {i + 1} of {num_inference_steps}",
                        non_finite_hint(self.transformer.dtype),
                    )
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
        check_tiles(tile_sample_min_height, tile_sample_min_width, tile_overlap_factor)
        check_finite(latents, "the latents to decode", "they come from a failed or fp16-overflowed sampling run")
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
        check_finite(frames, "the decoded frames", non_finite_hint(self.transformer.dtype))
        return ((frames.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 1, 3, 4)
