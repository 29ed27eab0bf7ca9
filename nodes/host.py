"""Optional ComfyUI host services: model folders, progress bar with previews, interrupt, device, memory.

Every function works without ComfyUI (plain Python, tests, scripts): the host modules are imported
lazily and, when they are absent, folders come from `SDVGEN_MODELS_DIR` (default `./models`, same
`CogVideo/`, `diffusers/`, `loras/`, `CogVideo/loras/`, `text_encoders/`, `clip/` layout as ComfyUI), progress is tqdm's inside the pipeline, there is
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
# The CogVideoX node pack keeps LoRAs in models/CogVideo/loras under this folder name; registered the same way.
COGVIDEO_LORA_FOLDER = "cogvideox_loras"
COGVIDEO_LORA_PATH = (MODEL_FOLDER, "loras")
LORA_FOLDER_NAMES = (LORA_FOLDER, COGVIDEO_LORA_FOLDER)
# Single-file text encoders (T5-XXL): ComfyUI's text_encoders folder and its older name clip.
TEXT_ENCODER_FOLDER_NAMES = ("text_encoders", "clip")
MODELS_DIR_ENV = "SDVGEN_MODELS_DIR"


def comfy_module(name: str) -> ModuleType | None:
    """The host module `name` (e.g. `folder_paths`), or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def register_model_folder() -> None:
    """Make `models/CogVideo` and `models/CogVideo/loras` ComfyUI model folders (a no-op outside ComfyUI)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))
    if COGVIDEO_LORA_FOLDER not in folder_paths.folder_names_and_paths:  # the CogVideoX pack may have done it
        folder_paths.add_model_folder_path(COGVIDEO_LORA_FOLDER, os.path.join(folder_paths.models_dir, *COGVIDEO_LORA_PATH))


def folder_paths_for(name: str) -> list[Path]:
    """Search paths of the model folder `name`: ComfyUI's (extra_model_paths.yaml included) or `$SDVGEN_MODELS_DIR/name`."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        models = Path(os.environ.get(MODELS_DIR_ENV, "models"))
        return [models.joinpath(*COGVIDEO_LORA_PATH) if name == COGVIDEO_LORA_FOLDER else models / name]
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


def safetensors_files(folder_names: tuple[str, ...]) -> dict[str, Path]:
    """`.safetensors` files in the model folders `folder_names` by dropdown label, each file once.

    Labels are paths relative to the folder (as ComfyUI's own loaders show them); a file reached through
    two folders (ComfyUI maps `clip` onto `text_encoders`, a symlink, an extra_model_paths entry) is
    listed once; a different file with a label already taken keeps its folder name in front.
    """
    folder_paths = comfy_module("folder_paths")
    found: dict[str, Path] = {}
    seen: set[Path] = set()
    for folder_name in folder_names:
        if folder_paths is not None:
            try:
                names = folder_paths.get_filename_list(folder_name)
            except KeyError:  # folder not registered in this host
                continue
            files = [(name, Path(folder_paths.get_full_path(folder_name, name))) for name in names]
        else:
            files = [(path.relative_to(root).as_posix(), path)
                     for root in folder_paths_for(folder_name) for path in sorted(root.rglob("*.safetensors"))]
        for label, path in files:
            if not label.endswith(".safetensors") or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            found[label if label not in found else f"{folder_name}/{label}"] = path
    return found


def lora_files() -> dict[str, Path]:
    """LoRA files from `models/loras` and `models/CogVideo/loras` by dropdown label."""
    return safetensors_files(LORA_FOLDER_NAMES)


def text_encoder_files() -> dict[str, Path]:
    """Single-file text encoders from `models/text_encoders` and `models/clip` by dropdown label."""
    return safetensors_files(TEXT_ENCODER_FOLDER_NAMES)


def t5_tokenizer_dir() -> Path | None:
    """The T5 tokenizer ComfyUI ships (`comfy/text_encoders/t5_tokenizer`), or None outside ComfyUI."""
    comfy = comfy_module("comfy")
    for root in getattr(comfy, "__path__", []):  # `comfy` is a namespace package (no __init__.py, no __file__)
        folder = Path(root) / "text_encoders" / "t5_tokenizer"
        if folder.is_dir():
            return folder
    return None


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
