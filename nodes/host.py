"""Optional ComfyUI host services: model folders, progress bar with previews, interrupt, device, memory.

Every function works without ComfyUI (plain Python, tests, scripts): the host modules are imported
lazily and, when they are absent, folders come from `SDVGEN_MODELS_DIR` (default `./models`, same
`CogVideo/`, `diffusers/`, `loras/` layout as ComfyUI), progress is tqdm's inside the pipeline, there is
no interrupt and the device is CUDA when available.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

# Base models are diffusers-layout folders: `models/CogVideo/<name>/` (the folder CogVideoX node packs
# use) or `models/diffusers/<name>/` (ComfyUI's own folder for diffusers models).
MODEL_FOLDER = "CogVideo"
MODEL_FOLDER_NAMES = (MODEL_FOLDER, "diffusers")
LORA_FOLDER = "loras"
MODELS_DIR_ENV = "SDVGEN_MODELS_DIR"


def comfy_module(name: str) -> ModuleType | None:
    """The host module `name` (e.g. `folder_paths`), or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def register_model_folder() -> None:
    """Make `models/CogVideo` a ComfyUI model folder (a no-op outside ComfyUI)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def folder_paths_for(name: str) -> list[Path]:
    """Search paths of the model folder `name`: ComfyUI's (extra_model_paths.yaml included) or `$SDVGEN_MODELS_DIR/name`."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return [Path(os.environ.get(MODELS_DIR_ENV, "models")) / name]
    try:
        return [Path(path) for path in folder_paths.get_folder_paths(name)]
    except KeyError:
        return []


def model_dirs() -> dict[str, Path]:
    """Diffusers model folders (those with a `transformer/` subfolder) by dropdown label, one or two levels deep."""
    found: dict[str, Path] = {}
    for folder_name in MODEL_FOLDER_NAMES:
        for root in folder_paths_for(folder_name):
            if not root.is_dir():
                continue
            for candidate in sorted([*root.glob("*/transformer"), *root.glob("*/*/transformer")]):
                if candidate.is_dir():
                    found.setdefault(candidate.parent.relative_to(root).as_posix(), candidate.parent)
    return found


def lora_files() -> dict[str, Path]:
    """`.safetensors` files in the LoRA folders by dropdown label (path relative to the folder)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        names = [name for name in folder_paths.get_filename_list(LORA_FOLDER) if name.endswith(".safetensors")]
        return {name: Path(folder_paths.get_full_path(LORA_FOLDER, name)) for name in names}
    found: dict[str, Path] = {}
    for root in folder_paths_for(LORA_FOLDER):
        for path in sorted(root.rglob("*.safetensors")):
            found.setdefault(path.relative_to(root).as_posix(), path)
    return found


def where(folder_name: str) -> str:
    """Human-readable list of the search paths of `folder_name`, for error messages."""
    return " or ".join(repr(str(path)) for path in folder_paths_for(folder_name)) or f"models/{folder_name}"


def torch_device():
    """ComfyUI's device when hosted (honours --cpu, --directml, ...), else CUDA when available, else CPU."""
    import torch

    model_management = comfy_module("comfy.model_management")
    if model_management is not None:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision(device) -> str:
    """bf16 where the device does it well, else fp16 on an accelerator, else fp32 (ComfyUI's judgement when hosted)."""
    import torch

    model_management = comfy_module("comfy.model_management")
    if model_management is not None:
        if model_management.should_use_bf16(device):
            return "bf16"
        return "fp16" if model_management.should_use_fp16(device) else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def free_host_memory(unload_models: bool = False) -> None:
    """Give cached device memory back; `unload_models` also evicts ComfyUI's own models (before a 5B load)."""
    model_management = comfy_module("comfy.model_management")
    if model_management is None:
        return
    if unload_models:
        model_management.unload_all_models()
    model_management.soft_empty_cache()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel, so the host handles it as a cancel."""
    model_management = comfy_module("comfy.model_management")
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    """ComfyUI's progress bar for the running node, or None outside ComfyUI."""
    utils = comfy_module("comfy.utils")
    return None if utils is None else utils.ProgressBar(total)


def preview_max_size() -> int | None:
    """The host's preview size when latent previews are on, None when the user turned them off."""
    cli_args = comfy_module("comfy.cli_args")
    if cli_args is None:
        return None
    if cli_args.args.preview_method == cli_args.LatentPreviewMethod.NoPreviews:
        return None
    return cli_args.args.preview_size
