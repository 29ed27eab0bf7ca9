"""One description per video backbone, so the CLI, trainer and nodes do not branch on the model everywhere.

`detect_family(model_dir)` reads `transformer/config.json`'s `_class_name`; `get_backbone(family)` returns the
`Backbone` (pipeline/transformer classes, generation defaults, schedulers, LoRA targets, and what training
needs: latent layout and normalisation, objective); `load_pipeline(model_dir)` loads the right pipeline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ModelLoadError, SDVGenError

COGVIDEOX = "cogvideox"
WAN22 = "wan22"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a generation uses when the user gives nothing."""

    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    size_multiple: int  # width and height must be multiples of this
    max_frames: int | None  # None: limited only by the model's position table


@dataclass(frozen=True)
class Backbone:
    """Everything family-specific that code outside the pipeline needs to know."""

    family: str
    label: str
    transformer_class_names: tuple[str, ...]  # `_class_name` values in transformer/config.json
    defaults: GenerationDefaults
    schedulers: tuple[str, ...]  # the first is the default
    lora_target_modules: tuple[str, ...]
    training_objective: str  # "v_prediction" (CogVideoX DDIM) or "flow_matching" (velocity ε - x0)
    latent_layout: str  # einops layout of the pipeline's latents
    vae_scale_spatial: int
    vae_scale_temporal: int
    text_encoder_class: str
    tokenizer_class: str
    max_text_tokens: int
    pipeline_module: str
    pipeline_class_name: str
    transformer_class_name: str
    reference_options: tuple[str, ...]  # extra `__call__` options this family has
    vae_class_name: str  # diffusers class of vae/
    vae_dtype: str | None  # None: the model dtype; "fp32": the family's pipeline keeps its VAE in fp32
    vae_channels_key: str  # vae/config.json key with the latent channel count
    vae_normalization_keys: tuple[str, ...]  # vae/config.json keys `normalize_latents` reads (cached by training)

    @property
    def pipeline_class(self) -> type:
        import importlib

        return getattr(importlib.import_module(self.pipeline_module, __package__), self.pipeline_class_name)

    @property
    def transformer_class(self) -> type:
        import importlib

        module = ".transformer" if self.family == COGVIDEOX else ".wan_transformer"
        return getattr(importlib.import_module(module, __package__), self.transformer_class_name)

    @property
    def vae_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.vae_class_name)

    def normalize_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE posterior sample -> the transformer's latent space (what training noises and sampling makes)."""
        if self.family == WAN22:
            from .wan_latents import normalize_latents

            return normalize_latents(vae, latents)
        return latents * vae.config.scaling_factor

    def denormalize_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents` (what goes into `vae.decode`)."""
        if self.family == WAN22:
            from .wan_latents import denormalize_latents

            return denormalize_latents(vae, latents)
        return latents / vae.config.scaling_factor

    def encode_prompts(
        self, tokenizer: Any, text_encoder: Any, prompts: list[str], device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Text embeddings `[N, max_text_tokens, D]` exactly as this family's pipeline makes them (for caches)."""
        if self.family == WAN22:
            from .wan_pipeline import encode_wan_prompts

            return encode_wan_prompts(tokenizer, text_encoder, prompts, device, dtype, self.max_text_tokens)
        from .prompts import encode_prompts

        return encode_prompts(tokenizer, text_encoder, prompts, device, dtype, self.max_text_tokens)

    def reference_encoder(self) -> Callable[..., torch.Tensor]:
        """`encode_reference(vae, image [B, 3, H, W] in 0..1, generator=None, device=None)` -> normalised latents."""
        if self.family == WAN22:
            from .wan_latents import encode_reference
        else:
            from .reference import encode_reference
        return encode_reference


def _cogvideox() -> Backbone:
    from .lora import LORA_TARGET_MODULES

    return Backbone(
        family=COGVIDEOX, label="CogVideoX-5B", transformer_class_names=("CogVideoXTransformer3DModel",),
        defaults=GenerationDefaults(720, 480, 49, 50, 6.0, 8, 16, 49),
        schedulers=("ddim", "dpm"), lora_target_modules=LORA_TARGET_MODULES, training_objective="v_prediction",
        latent_layout="b t c h w", vae_scale_spatial=8, vae_scale_temporal=4, text_encoder_class="T5EncoderModel",
        tokenizer_class="T5Tokenizer", max_text_tokens=226, pipeline_module=".pipeline",
        pipeline_class_name="SDVGenPipeline", transformer_class_name="SDVGenTransformer3DModel",
        reference_options=("use_dynamic_cfg", "eta"), vae_class_name="AutoencoderKLCogVideoX", vae_dtype=None,
        vae_channels_key="latent_channels", vae_normalization_keys=("scaling_factor",),
    )


def _wan22() -> Backbone:
    from .lora import WAN_LORA_TARGET_MODULES

    return Backbone(
        family=WAN22, label="Wan2.2-TI2V-5B", transformer_class_names=("WanTransformer3DModel",),
        defaults=GenerationDefaults(1280, 704, 121, 50, 5.0, 24, 32, None),
        schedulers=("unipc", "euler"), lora_target_modules=WAN_LORA_TARGET_MODULES,
        training_objective="flow_matching", latent_layout="b c t h w", vae_scale_spatial=16, vae_scale_temporal=4,
        text_encoder_class="UMT5EncoderModel", tokenizer_class="T5Tokenizer", max_text_tokens=512,
        pipeline_module=".wan_pipeline", pipeline_class_name="SDVGenWanPipeline",
        transformer_class_name="SDVGenWanTransformer3DModel", reference_options=("reference_timestep",),
        vae_class_name="AutoencoderKLWan", vae_dtype="fp32", vae_channels_key="z_dim",
        vae_normalization_keys=("latents_mean", "latents_std", "z_dim"),
    )


_BACKBONES = {COGVIDEOX: _cogvideox, WAN22: _wan22}
FAMILIES = tuple(_BACKBONES)


def get_backbone(family: str) -> Backbone:
    if family not in _BACKBONES:
        raise SDVGenError(f"model family {family!r} is not one of {list(FAMILIES)}")
    return _BACKBONES[family]()


def detect_family(model_dir: str | os.PathLike) -> str:
    """`cogvideox` or `wan22`, from the `_class_name` in `model_dir/transformer/config.json`."""
    config_path = Path(model_dir) / "transformer" / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{str(config_path)!r} does not exist; point to a diffusers model folder (CogVideoX-5B: "
            f"THUDM/CogVideoX-5b, Wan 2.2: Wan-AI/Wan2.2-TI2V-5B-Diffusers) that holds transformer/, vae/, "
            f"text_encoder/, tokenizer/, scheduler/"
        )
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ModelLoadError(f"{str(config_path)!r} is not a readable JSON config: {error}") from None
    for family in FAMILIES:
        if class_name in get_backbone(family).transformer_class_names:
            return family
    raise ModelLoadError(
        f"{str(config_path)!r} describes a {class_name!r}; supported are CogVideoXTransformer3DModel (CogVideoX-5B) "
        f"and WanTransformer3DModel (Wan 2.2 TI2V-5B)"
    )


def load_pipeline(model_dir: str | os.PathLike, family: str | None = None, **kwargs: Any):
    """The family's pipeline (`SDVGenPipeline` or `SDVGenWanPipeline`) via its `from_model_dir(model_dir, **kwargs)`.

    `family` overrides detection; `kwargs`: dtype, lora_path, lora_strength, fuse_lora, scheduler (None or
    absent: the family's default).
    """
    backbone = get_backbone(family or detect_family(model_dir))
    if kwargs.get("scheduler") is None:
        kwargs["scheduler"] = backbone.schedulers[0]
    elif kwargs["scheduler"] not in backbone.schedulers:
        raise SDVGenError(
            f"scheduler {kwargs['scheduler']!r} is not available for {backbone.label}; choose one of "
            f"{list(backbone.schedulers)}"
        )
    return backbone.pipeline_class.from_model_dir(model_dir, **kwargs)
