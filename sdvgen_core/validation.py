"""Argument checks shared by the CLI, the Python API and the nodes: one place, one message per input.

Every check raises `SDVGenError` naming the input (as the caller spells it: `--lora-strength` on the
CLI, `lora_strength` in Python) and the accepted range, before anything expensive runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SDVGenError

# Ranges of the float settings (the nodes' widgets use the same or narrower ones).
LORA_STRENGTH_RANGE = (-10.0, 10.0)
GUIDANCE_RANGE = (0.0, 30.0)
REFERENCE_GUIDANCE_RANGE = (0.0, 10.0)
ETA_RANGE = (0.0, 1.0)
TILE_OVERLAP_RANGE = (0.0, 0.5)
TILE_SIZE_RANGE = (64, 4096)
FPS_RANGE = (1, 240)
SEED_RANGE = (0, 2**64 - 1)
# A video side may be up to this many times the side the model was trained at; beyond it the attention
# sequence (and memory) grows past what the model has ever seen or a GPU holds.
MAX_SIZE_FACTOR = 2
# Wan 2.2 TI2V-5B's configs name no training size: it was trained at 1280x704 (height, width below) and
# 121 frames; frames are allowed up to twice that length, like the sides.
WAN_TRAINING_SIZE = (704, 1280)
WAN_MAX_FRAMES = 241


def check_float(name: str, value: object, low: float, high: float) -> float:
    """`value` as a float; `SDVGenError` unless it is a finite number within `low..high`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SDVGenError(f"{name} must be a number from {low:g} to {high:g}; got {value!r}") from None
    if not math.isfinite(number):
        raise SDVGenError(f"{name} must be a finite number from {low:g} to {high:g}; got {number}")
    if not low <= number <= high:
        raise SDVGenError(f"{name}={number:g} is out of range; expected {low:g} to {high:g}")
    return number


def check_int(name: str, value: object, low: int, high: int) -> int:
    """`value` as an int; `SDVGenError` unless it is a whole number within `low..high`."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SDVGenError(f"{name} must be a whole number from {low} to {high}; got {value!r}")
    if not low <= value <= high:
        raise SDVGenError(f"{name}={value} is out of range; expected {low} to {high}")
    return value


@dataclass(frozen=True)
class GenerationLimits:
    """What sizes a model can generate: read from a loaded pipeline or from a model folder's configs."""

    spatial_multiple: int  # width and height are multiples of this (VAE factor x patch size)
    temporal_factor: int  # frames are temporal_factor * k + 1
    max_frames: int
    max_height: int
    max_width: int
    max_steps: int  # the scheduler's training timesteps

    @classmethod
    def from_configs(cls, transformer: dict, vae: dict, scheduler: dict) -> "GenerationLimits":
        """Limits from the transformer/VAE/scheduler configs of either backbone (CogVideoX or Wan 2.2)."""
        max_steps = int(scheduler.get("num_train_timesteps", 1000))
        patch = transformer.get("patch_size", 2)
        if isinstance(patch, (list, tuple)):  # Wan: (t, h, w) patches; the VAE states its own factors
            spatial = int(vae.get("scale_factor_spatial", 8))
            multiple = spatial * int(patch[1])
            return cls(
                spatial_multiple=multiple,
                temporal_factor=int(vae.get("scale_factor_temporal", 4)),
                max_frames=WAN_MAX_FRAMES,
                max_height=MAX_SIZE_FACTOR * WAN_TRAINING_SIZE[0],
                max_width=MAX_SIZE_FACTOR * WAN_TRAINING_SIZE[1],
                max_steps=max_steps,
            )
        vae_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return cls(
            spatial_multiple=vae_factor * patch,
            temporal_factor=int(vae.get("temporal_compression_ratio", 4)),
            max_frames=int(transformer.get("sample_frames", 49)),
            max_height=MAX_SIZE_FACTOR * int(transformer.get("sample_height", 60)) * vae_factor,
            max_width=MAX_SIZE_FACTOR * int(transformer.get("sample_width", 90)) * vae_factor,
            max_steps=max_steps,
        )

    @classmethod
    def from_model_dir(cls, root: str | os.PathLike) -> "GenerationLimits":
        """Limits of a checked diffusers model folder, from its small config files (no weights read)."""
        root = Path(root)
        configs = {}
        for name, file in (("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
            path = root / name / file
            try:
                configs[name] = json.loads(path.read_text())
            except FileNotFoundError:
                configs[name] = {}
            except (OSError, ValueError) as error:
                raise SDVGenError(f"cannot read {str(path)!r}: {error}; the model folder is damaged") from None
        return cls.from_configs(**configs)


def check_size(limits: GenerationLimits, height: object, width: object, num_frames: object, names: dict[str, str]) -> None:
    """Width, height and frame count against the model's limits; `names` maps `height`/`width`/`frames` to how the caller calls them."""
    multiple = limits.spatial_multiple
    for key, value, high in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        size = check_int(names[key], value, multiple, high)
        if size % multiple:
            raise SDVGenError(f"{names[key]}={size} must be a multiple of {multiple}")
    frames = check_int(names["frames"], num_frames, 1, limits.max_frames)
    if (frames - 1) % limits.temporal_factor:
        step = limits.temporal_factor
        raise SDVGenError(
            f"{names['frames']}={frames} must be {step}k+1 (1, {1 + step}, {1 + 2 * step}, ..., {limits.max_frames}) "
            f"and at most the model's {limits.max_frames}"
        )


def check_generation_settings(
    limits: GenerationLimits,
    *,
    height: object,
    width: object,
    num_frames: object,
    num_inference_steps: object,
    guidance_scale: object,
    reference_guidance_scale: object,
    eta: object = 0.0,
    names: dict[str, str] | None = None,
) -> None:
    """Check every sampling setting; `names` renames inputs for the message (the CLI passes `--frames` etc.)."""
    names = {
        "height": "height", "width": "width", "frames": "num_frames", "steps": "num_inference_steps",
        "cfg": "guidance_scale", "reference_guidance": "reference_guidance_scale", "eta": "eta", **(names or {}),
    }
    check_size(limits, height, width, num_frames, names)
    check_int(names["steps"], num_inference_steps, 1, limits.max_steps)
    check_float(names["cfg"], guidance_scale, *GUIDANCE_RANGE)
    check_float(names["reference_guidance"], reference_guidance_scale, *REFERENCE_GUIDANCE_RANGE)
    check_float(names["eta"], eta, *ETA_RANGE)


def check_tiles(height: object, width: object, overlap: object) -> None:
    """Tiled-decode settings: tile sides (None = the VAE's default) and the overlap fraction."""
    for name, value in (("tile_sample_min_height", height), ("tile_sample_min_width", width)):
        if value is not None:
            check_int(name, value, *TILE_SIZE_RANGE)
    if overlap is not None:
        check_float("tile_overlap_factor", overlap, *TILE_OVERLAP_RANGE)


def resolve_device(device: object, name: str = "device"):
    """`auto`, `cpu`, `cuda`, `cuda:N`, `mps`, ... -> a `torch.device` that exists here; `SDVGenError` otherwise."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise SDVGenError(f"{name} {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise SDVGenError(
            f"{name} {device!r}: no {resolved.type} device is available to this PyTorch ({torch.__version__}); "
            f"use cpu, or install a PyTorch build for your accelerator"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if resolved.index is not None and resolved.index >= count:
        raise SDVGenError(f"{name} {device!r}: there are only {count} {resolved.type} device(s) (0..{count - 1})")
    return resolved
