"""Load SDV LoRA: the CogVideoX-5B base model plus the SDV-Gen LoRA, shared between loaders.

A 5B model is loaded once and kept: `PIPELINE_CACHE` holds one base model (folder + precision + device).
What a loader outputs is an `SDVGenModel`, a small handle with that loader's LoRA file, strength, fuse
and memory mode; the sampling nodes apply a handle's settings to the shared pipeline right before they
use it. So two loaders on the same base with different LoRA strengths (the comparison workflow) cost
one model in memory and still each sample with their own strength, whatever order ComfyUI runs them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import host
from .core import core_module, sdvgen_core
from .types import CATEGORY, MEMORY_MODES, NO_LORA, PIPE, PRECISIONS

RELEASED_LORA = "pytorch_lora_weights_transformer.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    path: Path | None
    strength: float
    fuse: bool


@dataclass(frozen=True)
class BaseSettings:
    model_dir: Path
    precision: str  # resolved: bf16, fp16 or fp32
    device: str


class PipelineCache:
    """The one loaded base model, with the LoRA settings and memory mode currently applied to it."""

    def __init__(self) -> None:
        self.base: BaseSettings | None = None
        self.pipeline = None
        self.lora: LoraSettings | None = None
        self.memory_mode: str | None = None
        self.preview_factors = None  # latent -> RGB map fitted to this VAE, see preview.py

    def load(self, base: BaseSettings):
        """The pipeline for `base`, loading it (and dropping the previous one) only when `base` changed."""
        if base != self.base:
            self.clear()
            host.free_host_memory(unload_models=True)
            self.pipeline = sdvgen_core.SDVGenPipeline.from_model_dir(base.model_dir, dtype=base.precision)
            self.base = base
        return self.pipeline

    def apply(self, lora: LoraSettings, memory_mode: str) -> None:
        """Make the loaded pipeline carry `lora` and be placed by `memory_mode`; unchanged settings cost nothing."""
        pipeline, transformer = self.pipeline, self.pipeline.transformer
        lora_module = core_module("lora")
        adapter = lora_module.DEFAULT_ADAPTER
        if lora != self.lora:
            previous, self.lora = self.lora, None  # unknown until applied: after a failure, re-apply in full
            if lora_module.is_fused(transformer):
                transformer.unfuse_lora()
            if lora.path is None:
                if adapter in getattr(transformer, "peft_config", {}):
                    transformer.delete_adapters(adapter)
                pipeline.lora_info = None
            elif previous is not None and previous.path == lora.path:
                lora_module.set_lora_strength(transformer, lora.strength)
                if lora.fuse:
                    transformer.fuse_lora(adapter_names=[adapter])
            else:
                pipeline.load_lora(lora.path, lora.strength, fuse=lora.fuse)
            self.lora = lora
        if memory_mode != self.memory_mode:
            pipeline.set_memory_mode(memory_mode, self.base.device)
            self.memory_mode = memory_mode

    def clear(self) -> None:
        self.__init__()


PIPELINE_CACHE = PipelineCache()


@dataclass(frozen=True)
class SDVGenModel:
    """What an SDVGEN_PIPE socket carries: a base model in `PIPELINE_CACHE` and one loader's LoRA settings."""

    base: BaseSettings
    lora: LoraSettings
    memory_mode: str

    def pipeline(self):
        """The shared pipeline with this handle's LoRA and memory mode applied (reloaded if another base replaced it)."""
        PIPELINE_CACHE.load(self.base)
        PIPELINE_CACHE.apply(self.lora, self.memory_mode)
        return PIPELINE_CACHE.pipeline


def missing_model_message(name: str) -> str:
    return (
        f"model folder {name!r} not found. Put CogVideoX-5B in diffusers layout (THUDM/CogVideoX-5b, the folder "
        f"holding transformer/ vae/ text_encoder/ tokenizer/ scheduler/) into {host.where(host.MODEL_FOLDER)} "
        f"(or {host.where('diffusers')}), then refresh the node list (R) and pick it"
    )


def missing_lora_message(name: str) -> str:
    return (
        f"LoRA file {name!r} not found. Put the .safetensors file (the authors' release is {RELEASED_LORA}) into "
        f"{host.where(host.LORA_FOLDER)}, then refresh the node list (R), or choose {NO_LORA!r}"
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
                               "holding transformer/, vae/, text_encoder/, tokenizer/ and scheduler/.",
                }),
                "lora": ([NO_LORA, *sorted(host.lora_files())], {
                    "default": NO_LORA,
                    "tooltip": f"SDV-Gen LoRA from models/loras (the authors' release: {RELEASED_LORA}). "
                               f"'{NO_LORA}' runs the base model, which was not trained on reference tokens.",
                }),
                "lora_strength": ("FLOAT", {
                    "default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
                    "tooltip": "How strongly the LoRA applies: lower keeps more of the base model's motion, "
                               "higher binds identity harder.",
                }),
                "precision": (PRECISIONS, {
                    "default": "auto",
                    "tooltip": "Weights dtype. auto: bf16 on a GPU (as released), fp32 on the CPU.",
                }),
                "memory_mode": (MEMORY_MODES, {
                    "default": "model_offload",
                    "tooltip": "on_device: all on the GPU (fastest, ~30 GB). model_offload: one model on the GPU "
                               "at a time (~20 GB). sequential_offload: layer by layer (least memory, slowest). "
                               "Offload modes need a GPU.",
                }),
                "fuse_lora": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Merge the LoRA into the weights: faster steps; changing strength then re-merges.",
                }),
            }
        }

    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with its LoRA settings, for CLS Prompt, Subject Reference Encode and the sampler.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads CogVideoX-5B and the SDV-Gen LoRA for zero-shot subject-driven video."

    @classmethod
    def VALIDATE_INPUTS(cls, model, lora):
        # Replaces ComfyUI's "value not in list" for these two dropdowns with messages saying where files go.
        if model not in host.model_dirs():
            return missing_model_message(model)
        if lora != NO_LORA and lora not in host.lora_files():
            return missing_lora_message(lora)
        return True

    def load(self, model, lora, lora_strength, precision, memory_mode, fuse_lora):
        model_dirs = host.model_dirs()
        if model not in model_dirs:
            raise sdvgen_core.ModelLoadError(missing_model_message(model))
        lora_path = None
        if lora != NO_LORA:
            lora_path = host.lora_files().get(lora)
            if lora_path is None:
                raise sdvgen_core.LoraLoadError(missing_lora_message(lora))
        device = host.torch_device()
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        handle = SDVGenModel(
            base=BaseSettings(model_dirs[model], precision, str(device)),
            lora=LoraSettings(lora_path, float(lora_strength), bool(fuse_lora)),
            memory_mode=memory_mode,
        )
        handle.pipeline()  # load now: errors show on this node and the first sampler step is not a load
        return (handle,)
