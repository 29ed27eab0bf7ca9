"""A tiny SDV-Gen LoRA for the tiny model, written with the project's own writer (random, nonzero weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from sdvgen_core.lora import DEFAULT_ADAPTER, make_lora_config, save_lora
from sdvgen_core.transformer import SDVGenTransformer3DModel


def write_tiny_lora(model_dir, path, seed: int = 1) -> Path:
    transformer = SDVGenTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(make_lora_config(rank=4, alpha=4), adapter_name=DEFAULT_ADAPTER)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return save_lora(transformer, path, dtype=torch.float32)
