"""sdvgen_core: zero-shot subject-driven video generation on CogVideoX-5B and Wan 2.2 TI2V-5B (SDV-Gen), plain Python.

Heavy modules (torch, diffusers) load on first use of a name below, so importing the package is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SDVGenTransformer3DModel": ".transformer",
    "SDVGenPipeline": ".pipeline",
    "MemoryMode": ".pipeline",
    "AccelerationConfig": ".acceleration",
    "StepInfo": ".pipeline",
    "load_lora": ".lora",
    "save_lora": ".lora",
    "make_lora_config": ".lora",
    "LORA_TARGET_MODULES": ".lora",
    "insert_cls": ".prompts",
    "add_cls_token": ".prompts",
    "CLS_TOKEN": ".prompts",
    "FitMode": ".reference",
    "prepare_reference_image": ".reference",
    "encode_reference": ".reference",
    "build_tiny_model": ".presets",
    "SDVGenWanPipeline": ".wan_pipeline",
    "SDVGenWanTransformer3DModel": ".wan_transformer",
    "build_tiny_wan_model": ".wan_presets",
    "load_pipeline": ".backbones",
    "detect_family": ".backbones",
    "get_backbone": ".backbones",
    "SDVGenError": ".errors",
    "ModelLoadError": ".errors",
    "LoraLoadError": ".errors",
    "NonFiniteError": ".errors",
    "GenerationCancelled": ".errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .acceleration import AccelerationConfig
    from .errors import GenerationCancelled, LoraLoadError, ModelLoadError, NonFiniteError, SDVGenError
    from .lora import LORA_TARGET_MODULES, load_lora, make_lora_config, save_lora
    from .pipeline import MemoryMode, SDVGenPipeline, StepInfo
    from .presets import build_tiny_model
    from .prompts import CLS_TOKEN, add_cls_token, insert_cls
    from .reference import FitMode, encode_reference, prepare_reference_image
    from .transformer import SDVGenTransformer3DModel
    from .backbones import detect_family, get_backbone, load_pipeline
    from .wan_pipeline import SDVGenWanPipeline
    from .wan_presets import build_tiny_wan_model
    from .wan_transformer import SDVGenWanTransformer3DModel


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
