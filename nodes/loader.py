"""Load SDV LoRA: the CogVideoX-5B base model plus the SDV-Gen LoRA, shared between loaders.

A 5B model is loaded once and shared: `PIPELINE_CACHE` knows one base model (folder + precision + device).
What a loader outputs is an `SDVGenModel`, a small handle with that loader's LoRA file, strength, fuse
and memory mode; the sampling nodes apply a handle's settings to the shared pipeline right before they
use it. So two loaders on the same base with different LoRA strengths (the comparison workflow) cost
one model in memory and still each sample with their own strength, whatever order ComfyUI runs them in.
"""

from __future__ import annotations

import gc
import logging
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import host, validation
from .core import core_module, sdvgen_core
from .preview import fit_latent_to_rgb
from .types import (
    ATTENTION_NAMES, CACHES, CATEGORY, COMPILE_MODES, FROM_MODEL_FOLDER, MEMORY_MODES, NO_LORA, PIPE, PRECISIONS,
    WEIGHTS,
)

logger = logging.getLogger(__name__)

RELEASED_LORA = "pytorch_lora_weights_transformer.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    path: Path | None
    strength: float
    fuse: bool
    file_id: tuple[int, int, int] | None = None  # (size, mtime, inode) when loaded: a replaced file is a new LoRA


@dataclass(frozen=True)
class BaseSettings:
    model_dir: Path
    precision: str  # resolved: bf16, fp16 or fp32
    device: str
    text_encoder: Path | None = None  # a single-file T5 replacing the folder's text_encoder/
    weights: str = "precision"  # fp8 storage is set at load: going back needs a reload


class PipelineCache:
    """The loaded base model, with the LoRA settings and memory mode currently applied to it.

    Only a weak reference: the strong ones are the `SDVGenModel` handles in ComfyUI's node-output cache.
    So ComfyUI's "free model and node cache" (or a workflow no longer using the loader) releases the 5B
    model, while loaders and samplers that still hold a handle keep sharing one copy.
    """

    def __init__(self) -> None:
        self.clear()

    @property
    def pipeline(self):
        return self._pipeline() if self._pipeline is not None else None

    def load(self, base: BaseSettings):
        """The pipeline for `base`, loading it (and dropping the previous one) only when `base` changed."""
        pipeline = self.pipeline
        if pipeline is not None and base == self.base:
            return pipeline
        if pipeline is not None:
            logger.warning("SDV-Gen: switching the base model to %s (%s); each switch reloads it from disk",
                           base.model_dir, base.precision)
        del pipeline
        self.clear()
        host.free_host_memory(unload_models=True)
        pipeline = sdvgen_core.SDVGenPipeline.from_model_dir(
            base.model_dir, dtype=base.precision, text_encoder_file=base.text_encoder,
            fallback_tokenizer_dir=host.t5_tokenizer_dir(),
        )
        if base.weights != "precision":  # cast while the weights are on the CPU
            pipeline.configure_acceleration(device=base.device, weights=base.weights)
        if host.preview_max_size():
            # Fitted now, while the weights are on the CPU: mid-sampling it would push the transformer off the GPU.
            self.preview_factors = fit_latent_to_rgb(pipeline.vae)
        self._pipeline = weakref.ref(pipeline)
        self.base = base
        return pipeline

    def apply(self, lora: LoraSettings, memory_mode: str, acceleration: tuple[tuple[str, object], ...] = ()) -> None:
        """Make the loaded pipeline carry `lora`, the speed options `acceleration` (`configure_acceleration`
        keyword pairs) and be placed by `memory_mode`; unchanged settings cost nothing."""
        pipeline = self.pipeline
        if acceleration != self.acceleration:
            self.acceleration = None  # unknown until applied
            pipeline.configure_acceleration(device=self.base.device, **dict(acceleration))
            self.acceleration = acceleration
        if lora != self.lora:
            self.lora = None  # unknown until applied: after a failure, re-apply in full
            pipeline.set_lora(lora.path, lora.strength, fuse=lora.fuse)
            self.lora = lora
        if memory_mode != self.memory_mode:
            pipeline.set_memory_mode(memory_mode, self.base.device)
            self.memory_mode = memory_mode

    def clear(self) -> None:
        """Forget the loaded model; its offload hooks are removed so that it can be freed at once."""
        pipeline = self.pipeline if getattr(self, "_pipeline", None) is not None else None
        if pipeline is not None:
            pipeline.remove_all_hooks()  # accelerate's hooks form reference cycles that would delay the free
        del pipeline
        self._pipeline: weakref.ref | None = None
        self.base: BaseSettings | None = None
        self.lora: LoraSettings | None = None
        self.memory_mode: str | None = None
        self.acceleration: tuple | None = ()
        self.preview_factors = None  # latent -> RGB map fitted to this VAE, see preview.py
        gc.collect()


PIPELINE_CACHE = PipelineCache()


def lora_file_identity(path: Path | None) -> tuple[int, int, int] | None:
    return None if path is None else core_module("lora").file_identity(path)


@dataclass(frozen=True)
class SDVGenModel:
    """What an SDVGEN_PIPE socket carries: a base model and one loader's LoRA settings.

    `owner` keeps the shared pipeline alive while ComfyUI holds this output.
    """

    base: BaseSettings
    lora: LoraSettings
    memory_mode: str
    owner: object = field(default=None, compare=False, repr=False)
    acceleration: tuple[tuple[str, object], ...] = ()  # compile/attention/cache options (configure_acceleration)

    def pipeline(self):
        """The shared pipeline with this handle's LoRA and memory mode applied (reloaded if another base replaced it)."""
        pipeline = PIPELINE_CACHE.load(self.base)
        PIPELINE_CACHE.apply(self.lora, self.memory_mode, self.acceleration)
        return pipeline


def missing_model_message(name: str) -> str:
    return (
        f"model folder {name!r} not found. Put CogVideoX-5B in diffusers layout (THUDM/CogVideoX-5b, the folder "
        f"holding transformer/ vae/ scheduler/, and text_encoder/ tokenizer/ unless a text encoder file is chosen) "
        f"into {host.where(host.MODEL_FOLDER)} "
        f"(or {host.where('diffusers')}), then refresh the node list (R) and pick it"
    )


def missing_lora_message(name: str) -> str:
    return (
        f"LoRA file {name!r} not found. Put the .safetensors file (the authors' release is {RELEASED_LORA}) into "
        f"{host.where(host.LORA_FOLDER)} (or {host.where(host.COGVIDEO_LORA_FOLDER)}), then refresh the node list (R), "
        f"or choose {NO_LORA!r}"
    )


def missing_text_encoder_message(name: str) -> str:
    return (
        f"text encoder file {name!r} not found. Put a T5-XXL .safetensors file (e.g. t5xxl_fp16.safetensors) into "
        f"{host.where('text_encoders')}, then refresh the node list (R), or choose {FROM_MODEL_FOLDER!r}"
    )


class LoadSDVLoRA:
    """CogVideoX-5B (diffusers folder) with the SDV-Gen LoRA; reuses what is loaded when settings are equal."""

    @classmethod
    def INPUT_TYPES(cls):
        host.register_model_folder()
        return {
            "required": {
                "model": (sorted(host.model_dirs()), {
                    "tooltip": "CogVideoX-5B in diffusers layout: a folder in models/CogVideo (or models/diffusers) "
                               "holding transformer/, vae/, scheduler/ and, unless a text_encoder file is chosen, "
                               "text_encoder/ and tokenizer/.",
                }),
                "lora": ([NO_LORA, *sorted(host.lora_files())], {
                    "default": NO_LORA,
                    "tooltip": f"SDV-Gen LoRA from models/loras or models/CogVideo/loras (the authors' release: "
                               f"{RELEASED_LORA}). '{NO_LORA}' runs the base model, which was not trained on "
                               f"reference tokens.",
                }),
                "lora_strength": ("FLOAT", {
                    "default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
                    "tooltip": "How strongly the LoRA applies: lower keeps more of the base model's motion, "
                               "higher binds identity harder.",
                }),
                "precision": (PRECISIONS, {
                    "default": "auto",
                    "tooltip": "Weights dtype. auto: bf16 (as released) where the GPU supports it well, else fp16; "
                               "fp32 on the CPU.",
                }),
                "memory_mode": (MEMORY_MODES, {
                    "default": "auto",
                    "tooltip": "auto: picked by GPU memory (on_device from 40 GB, model_offload from 20 GB, else "
                               "group_offload); on the CPU everything stays on the CPU. on_device: all on the GPU "
                               "(fastest, ~30 GB). model_offload: one model on the GPU at a time (~20 GB). "
                               "group_offload: blocks streamed in ahead of use ('block swap'; ~12 GB, estimate). "
                               "sequential_offload: layer by layer (least memory, slowest).",
                }),
                "fuse_lora": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Merge the LoRA into the weights: faster steps; changing strength then re-merges.",
                }),
            },
            "optional": {
                "text_encoder": ([FROM_MODEL_FOLDER, *sorted(host.text_encoder_files())], {
                    "default": FROM_MODEL_FOLDER,
                    "tooltip": "T5-XXL text encoder: the model folder's text_encoder/, or a single file from "
                               "models/text_encoders (or models/clip): t5xxl_fp16, t5xxl_fp8_e4m3fn or "
                               "t5xxl_fp8_e4m3fn_scaled, computed in the chosen precision. Needed for folders "
                               "without text_encoder/ (as the CogVideoX node pack downloads them).",
                }),
                "weights": (WEIGHTS, {
                    "default": "precision",
                    "tooltip": "precision: weights stored as 'precision' says. fp8: transformer and T5 stored in "
                               "float8 (e4m3), computed in 'precision': about half their memory, a small change in "
                               "the video. A fused LoRA is merged into the fp8 weights.",
                }),
                "compile": (COMPILE_MODES, {
                    "default": "off",
                    "tooltip": "blocks: torch.compile the transformer blocks. The first run compiles (minutes), later "
                               "runs are faster; LoRA strength, subject and prompt changes do not recompile, a new "
                               "size does. Needs Triton on the GPU.",
                }),
                "attention": (ATTENTION_NAMES, {
                    "default": "sdpa",
                    "tooltip": "Attention kernel. sdpa: PyTorch's (always works). flash / sage / xformers: faster "
                               "kernels from flash-attn / SageAttention / xformers when installed (GPU, bf16/fp16).",
                }),
                "cache": (CACHES, {
                    "default": "off",
                    "tooltip": "first_block: skip the remaining blocks on steps where the first block's output "
                               "barely changed (First Block Cache): faster, slightly different video.",
                }),
                "cache_threshold": ("FLOAT", {
                    "default": 0.05, "min": 0.001, "max": 1.0, "step": 0.005,
                    "tooltip": "first_block cache: relative change under which a step reuses the cached blocks; "
                               "higher skips more steps (faster, rougher).",
                }),
                "blocks_per_group": ("INT", {
                    "default": 1, "min": 1, "max": 42,
                    "tooltip": "group_offload: transformer blocks brought to the GPU per transfer; more = faster, "
                               "more memory.",
                }),
            },
        }

    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with its LoRA settings, for CLS Prompt, Subject Reference Encode and the sampler.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads CogVideoX-5B and the SDV-Gen LoRA for zero-shot subject-driven video."

    @classmethod
    def IS_CHANGED(cls, lora, **_):
        # A LoRA file replaced on disk under the same name makes ComfyUI run the loader again (and reload it).
        return lora_file_identity(host.lora_files().get(lora)) if lora != NO_LORA else None

    @classmethod
    def VALIDATE_INPUTS(cls, lora_strength):
        # Only lora_strength (see validation.py): the model / lora / text_encoder dropdowns keep ComfyUI's own
        # per-input "value not in list" check; load() says where missing files go and checks the folder
        # before loading anything.
        return validation.result(validation.finite("lora_strength", lora_strength))

    def load(self, model, lora, lora_strength, precision, memory_mode, fuse_lora, text_encoder=FROM_MODEL_FOLDER,
             weights="precision", compile="off", attention="sdpa", cache="off", cache_threshold=0.05,
             blocks_per_group=1):
        model_dirs = host.model_dirs()
        if model not in model_dirs:
            raise sdvgen_core.ModelLoadError(missing_model_message(model))
        lora_path = None
        if lora != NO_LORA:
            lora_path = host.lora_files().get(lora)
            if lora_path is None:
                raise sdvgen_core.LoraLoadError(missing_lora_message(lora))
        text_encoder_path = None
        if text_encoder != FROM_MODEL_FOLDER:
            text_encoder_path = host.text_encoder_files().get(text_encoder)
            if text_encoder_path is None:
                raise sdvgen_core.ModelLoadError(missing_text_encoder_message(text_encoder))
        if message := validation.finite("lora_strength", lora_strength):
            raise sdvgen_core.SDVGenError(message)
        device = host.torch_device()
        if precision == "auto":
            precision = host.default_precision(device)
        speed = {"compile": compile, "attention": attention, "cache": cache, "cache_threshold": float(cache_threshold),
                 "blocks_per_group": int(blocks_per_group)}
        # Refused here, before the model loads, with the option named (e.g. flash without flash-attn).
        acceleration = core_module("acceleration")
        acceleration.check_acceleration(acceleration.AccelerationConfig(weights=weights, **speed), device,
                                        core_module("pipeline").resolve_dtype(precision))
        handle = SDVGenModel(
            base=BaseSettings(model_dirs[model], precision, str(device), text_encoder_path, weights),
            lora=LoraSettings(lora_path, float(lora_strength), bool(fuse_lora), lora_file_identity(lora_path)),
            memory_mode=memory_mode,
            acceleration=tuple(speed.items()),
        )
        # Load now, so errors show on this node and the first sampler step is not a load.
        return (replace(handle, owner=handle.pipeline()),)
