"""Everything the trainer does differently per backbone family, in one module.

The rest of `training/` works on the family's `Backbone` (sdvgen_core.backbones) and the objects made here:
the resolved backbone (`resolve_backbone`), the training objective (`make_objective`: CogVideoX's v-prediction,
Wan 2.2's flow matching), cached latents sampled and normalised as the family's pipeline normalises them
(`CachedLatents`), the validation pipeline built from the training parts, and the extra ComfyUI-native LoRA
copy Wan needs. The cache and `Batch` hold latents as `b t c h w` (`CACHE_LAYOUT`); the objective rearranges
them to the backbone's `latent_layout` right before the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from einops import rearrange

from sdvgen_core.backbones import WAN22, Backbone, detect_family, get_backbone
from sdvgen_core.lora import LORA_TARGET_MODULES

from .config import Config, ConfigError

logger = logging.getLogger(__name__)

CACHE_LAYOUT = "b t c h w"
FLOW_NUM_TRAIN_TIMESTEPS = 1000  # Wan's timestep = sigma * 1000, as FlowMatchEulerDiscreteScheduler / UniPC feed it
COMFYUI_LORA_SUFFIX = "_comfyui"


# --- the family -------------------------------------------------------------------------------------------------

def resolve_backbone(config: Config) -> Backbone:
    """The backbone of `model.path` (detected; `model.family` must agree unless `auto`), after the checks that
    depend on it. Fills in the family's LoRA targets when `lora.target_modules` is left at its default."""
    detected = detect_family(config.model.path)
    wanted = config.model.family
    if wanted not in ("auto", detected):
        raise ConfigError(
            f"model.family={wanted} but {config.model.path!r} holds a {get_backbone(detected).label} model "
            f"({detected}); set model.family=auto or model.family={detected}"
        )
    backbone = get_backbone(detected)
    multiple = backbone.defaults.size_multiple
    if config.data.height % multiple or config.data.width % multiple:
        raise ConfigError(f"data.height/width must be multiples of {multiple} for {backbone.label}; got "
                          f"{config.data.height}x{config.data.width}")
    if config.data.identity.jitter_px % backbone.vae_scale_spatial:
        raise ConfigError(f"data.identity.jitter_px must be a multiple of {backbone.vae_scale_spatial} (one latent "
                          f"pixel of {backbone.label}); got {config.data.identity.jitter_px}")
    if list(config.lora.target_modules) == list(LORA_TARGET_MODULES) != list(backbone.lora_target_modules):
        logger.info("lora.target_modules left at its default: training the %s list %s", backbone.label,
                    list(backbone.lora_target_modules))
        config.lora.target_modules = list(backbone.lora_target_modules)
    return backbone


# --- objectives ---------------------------------------------------------------------------------------------------

class Objective(Protocol):
    num_train_timesteps: int

    def loss(self, model, batch, generator: torch.Generator, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of `batch` (`timesteps` `[B]` integer indices in [0, num_train_timesteps) fix the noise level)."""


def v_prediction_loss(model, scheduler, batch, generator: torch.Generator,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' CogVideoX LoRA loss: v-prediction turned into an x0 estimate, weighted by 1 / (1 - alpha_bar_t).

    `timesteps` `[B]` fixes t per sample; by default t is uniform over the training timesteps.
    """
    latents = batch.latents
    batch_size = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    velocity = model(
        hidden_states=noisy,
        encoder_hidden_states=batch.text,
        timestep=timesteps,
        reference_latents=batch.reference,
        reference_keep_indices=batch.keep_indices,
        return_dict=False,
    )[0]
    predicted_latents = scheduler.get_velocity(velocity.float(), noisy.float(), timesteps)
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)[timesteps]
    weights = (1.0 / (1.0 - alphas_cumprod)).view(batch_size, *([1] * (latents.ndim - 1)))
    return (weights * (predicted_latents - latents.float()) ** 2).reshape(batch_size, -1).mean(dim=1).mean()


@dataclass
class VPredictionObjective:
    """CogVideoX: the DDIM scheduler's v-prediction (latents already in the model's `b t c h w` layout)."""

    scheduler: Any

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def loss(self, model, batch, generator, timesteps=None):
        return v_prediction_loss(model, self.scheduler, batch, generator, timesteps)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """`FlowMatchEulerDiscreteScheduler`'s shift: sigma = shift * u / (1 + (shift - 1) * u)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(model, batch, noise: torch.Tensor, sigmas: torch.Tensor, layout: str, patch_size: tuple,
                       reference_timestep: str) -> torch.Tensor:
    """Rectified-flow loss as diffusers' flow-matching LoRA scripts compute it, per-token timesteps as Wan 2.2 TI2V.

    `batch.latents` `[B, T, C, h, w]` (x0) and `noise` (same shape) are rearranged to `layout`; with `sigmas` `[B]`:
    x_t = (1 - sigma) x0 + sigma noise, the model sees timestep sigma * 1000 on every video token and predicts the
    velocity noise - x0; MSE over the video (target) tokens only (the model drops the reference tokens).
    """
    to_model = f"{CACHE_LAYOUT} -> {layout}"
    latents = rearrange(batch.latents, to_model)
    noise = rearrange(noise, to_model).to(latents)
    reference = None if batch.reference is None else rearrange(batch.reference, to_model)
    batch_size = latents.shape[0]
    sigma = sigmas.to(latents.device, torch.float32).view(batch_size, 1, 1, 1, 1)
    noisy = ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)
    frames, height, width = (latents.shape[layout.split().index(axis)] for axis in ("t", "h", "w"))
    tokens = frames * (height // patch_size[1]) * (width // patch_size[2])
    timestep = (sigmas.to(latents.device, torch.float32) * FLOW_NUM_TRAIN_TIMESTEPS)[:, None].expand(-1, tokens)
    velocity = model(
        hidden_states=noisy,
        timestep=timestep,
        encoder_hidden_states=batch.text,
        reference_latents=reference,
        reference_keep_indices=batch.keep_indices,
        reference_timestep=reference_timestep,
        return_dict=False,
    )[0]
    target = noise.float() - latents.float()
    return ((velocity.float() - target) ** 2).reshape(batch_size, -1).mean(dim=1).mean()


@dataclass
class FlowMatchingObjective:
    """Wan 2.2: sigma from `compute_density_for_timestep_sampling` (uniform by default) then shifted."""

    shift: float
    weighting_scheme: str
    layout: str
    patch_size: tuple
    reference_timestep: str
    num_train_timesteps: int = FLOW_NUM_TRAIN_TIMESTEPS

    def sample_sigmas(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29, generator=generator)
        return shift_sigmas(u, self.shift)

    def loss(self, model, batch, generator, timesteps=None):
        noise = torch.randn(batch.latents.shape, generator=generator)
        if timesteps is None:
            sigmas = self.sample_sigmas(batch.latents.shape[0], generator)
        else:  # the discrete training grid of FlowMatchEulerDiscreteScheduler: index i -> u = (i + 1) / N
            sigmas = shift_sigmas((timesteps.float() + 1) / self.num_train_timesteps, self.shift)
        return flow_matching_loss(model, batch, noise, sigmas, self.layout, self.patch_size, self.reference_timestep)


def folder_flow_shift(model_dir: str) -> float:
    """`flow_shift` (UniPC) or `shift` (Euler) of the folder's scheduler config (1.0 when absent)."""
    path = Path(model_dir) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return float(config.get("flow_shift", config.get("shift", 1.0)))


def make_objective(config: Config, backbone: Backbone, transformer) -> Objective:
    """The family's objective; `transformer` gives the patch size (per-token timesteps)."""
    if backbone.training_objective == "v_prediction":
        from .models import load_scheduler

        return VPredictionObjective(load_scheduler(config.model.path))
    shift = config.flow.shift or folder_flow_shift(config.model.path)
    return FlowMatchingObjective(shift, config.flow.weighting_scheme, backbone.latent_layout,
                                 tuple(transformer.config.patch_size), config.task.reference_timestep)


# --- cached latents -----------------------------------------------------------------------------------------------

def vae_normalization(backbone: Backbone, vae_config) -> dict[str, Any]:
    """The VAE config values `Backbone.normalize_latents` reads, recorded in the cache's meta.json."""
    return {key: vae_config[key] for key in backbone.vae_normalization_keys}


class CachedLatents:
    """Samples from cached posterior statistics `[..., C, h, w]`, normalised by `Backbone.normalize_latents` with
    the VAE config values recorded in the cache (so `train` needs no VAE)."""

    def __init__(self, backbone: Backbone, meta: dict):
        self.backbone = backbone
        self.vae = SimpleNamespace(config=SimpleNamespace(**{k: meta[k] for k in backbone.vae_normalization_keys}))

    def sample(self, stats: dict[str, torch.Tensor], name: str, generator: torch.Generator) -> torch.Tensor:
        mean, std = stats[f"{name}.mean"].float(), stats[f"{name}.std"].float()
        raw = mean + std * torch.randn(mean.shape, generator=generator)
        frames = raw if raw.ndim == 4 else raw[None]
        normalized = self.backbone.normalize_latents(self.vae, rearrange(frames, "t c h w -> 1 c t h w"))
        return rearrange(normalized, "1 c t h w -> t c h w").reshape(raw.shape)


# --- validation and export ----------------------------------------------------------------------------------------

def validation_pipeline(backbone: Backbone, model_dir: str, tokenizer, text_encoder, vae, transformer, scheduler):
    """The family's sampling pipeline around the training transformer (no second copy of the weights)."""
    if backbone.family == WAN22:
        from sdvgen_core.wan_pipeline import flow_scheduler

        index_path = Path(model_dir) / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        return backbone.pipeline_class(tokenizer, text_encoder, vae, flow_scheduler("unipc", scheduler),
                                       transformer, expand_timesteps=index.get("expand_timesteps", True))
    return backbone.pipeline_class(tokenizer, text_encoder, vae, transformer, scheduler)


def validation_scheduler(backbone: Backbone, model_dir: str):
    """CogVideoX: the folder's DDIM scheduler; Wan: the folder's scheduler config (UniPC, as inference)."""
    if backbone.family == WAN22:
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler.load_config(model_dir, subfolder="scheduler")
    from .models import load_scheduler

    return load_scheduler(model_dir)


def extra_lora_paths(backbone: Backbone, path: Path) -> list[Path]:
    """Wan: `<name>_comfyui.safetensors` next to `path`; CogVideoX: none (ComfyUI loads the diffusers layout)."""
    if backbone.family != WAN22:
        return []
    return [path.with_name(f"{path.stem}{COMFYUI_LORA_SUFFIX}{path.suffix}")]


def write_extra_lora_copies(backbone: Backbone, path: Path, overwrite: bool = True) -> list[Path]:
    """For Wan, a copy of the LoRA file `path` with the native keys ComfyUI's core `LoraLoaderModelOnly` maps
    (ComfyUI 0.3.64 has no diffusers-layout mapping for Wan). An existing copy is replaced only with `overwrite`."""
    from sdvgen_core.wan_lora import export_wan_lora_for_comfyui

    written = []
    for target in extra_lora_paths(backbone, Path(path)):
        if target.exists():
            if not overwrite:
                raise ConfigError(f"{str(target)!r} already exists: choose another --output or pass --overwrite")
            target.unlink()
        written.append(export_wan_lora_for_comfyui(path, target))
        logger.info("ComfyUI-native copy (core LoraLoaderModelOnly): %s", target)
    return written
