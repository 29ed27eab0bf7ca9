"""Tiny SDV-Gen LoRAs for the tiny models, written with the project's own writer (random, nonzero weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from sdvgen_core.lora import DEFAULT_ADAPTER, LORA_TARGET_MODULES, make_lora_config, save_lora
from sdvgen_core.transformer import SDVGenTransformer3DModel


def write_random_lora(transformer, path, seed: int = 1, alpha: float = 4, target_modules=LORA_TARGET_MODULES,
                      std: float = 0.2) -> Path:
    """Add a rank-4 adapter with normal(0, `std`) weights to `transformer` (in place) and save it to `path`."""
    transformer.add_adapter(make_lora_config(rank=4, alpha=alpha, target_modules=target_modules),
                            adapter_name=DEFAULT_ADAPTER)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return save_lora(transformer, path, dtype=torch.float32)


def write_tiny_lora(model_dir, path, seed: int = 1) -> Path:
    return write_random_lora(SDVGenTransformer3DModel.from_pretrained(model_dir, subfolder="transformer"), path, seed)
