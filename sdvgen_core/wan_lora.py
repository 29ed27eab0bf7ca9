"""Wan LoRA files for ComfyUI: our diffusers-layout keys renamed to the native Wan layout.

We write Wan LoRAs in the diffusers key layout (`transformer.blocks.0.attn1.to_q.lora_A.weight`), which diffusers'
`WanPipeline.load_lora_weights` loads. ComfyUI 0.3.64's `model_lora_keys_unet` has no diffusers mapping for Wan
models: it matches only the native names (`diffusion_model.blocks.0.self_attn.q`), so a copy with native names
is written for ComfyUI's core `LoraLoaderModelOnly`. The rename is the inverse of diffusers' Wan checkpoint
conversion (`self_attn.q` -> `attn1.to_q`, `ffn.0` -> `ffn.net.0.proj`, ...). Alpha is already folded into
`lora_B` in our files, so the native copy needs no alpha keys (ComfyUI then applies scale 1).
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from .errors import LoraLoadError
from .files import atomic_output
from .lora import lora_file_family, read_lora_file

# diffusers module name -> native Wan module name (block-level names apply under `blocks.N.`)
WAN_DIFFUSERS_TO_NATIVE = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "patch_embedding": "patch_embedding", "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2", "proj_out": "head.head",
}


def native_module_name(diffusers_name: str) -> str:
    """`blocks.3.attn1.to_q` -> `blocks.3.self_attn.q`, `condition_embedder.text_embedder.linear_1` -> `text_embedding.0`."""
    prefix, inner = "", diffusers_name
    if diffusers_name.startswith("blocks."):
        index, _, inner = diffusers_name[len("blocks."):].partition(".")
        prefix = f"blocks.{index}."
    if inner not in WAN_DIFFUSERS_TO_NATIVE:
        raise LoraLoadError(
            f"LoRA module {diffusers_name!r} has no native Wan name; known: {sorted(WAN_DIFFUSERS_TO_NATIVE)}"
        )
    return prefix + WAN_DIFFUSERS_TO_NATIVE[inner]


def export_wan_lora_for_comfyui(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write `source` (our Wan LoRA, diffusers layout) with native Wan keys `diffusion_model.<native>.lora_A.weight`.

    Refuses a CogVideoX LoRA and an existing `destination` (never overwrites what the user has).
    """
    destination = Path(destination)
    if destination.exists():
        raise LoraLoadError(f"{str(destination)!r} already exists; choose another name or remove it first")
    tensors, metadata = read_lora_file(source)
    stripped = {key.removeprefix("transformer."): value for key, value in tensors.items()}
    family = lora_file_family(stripped, metadata)
    if family != "wan22":
        raise LoraLoadError(f"{str(source)!r} is a LoRA for the {family} backbone; only Wan LoRAs are converted")
    native = {}
    for key, value in stripped.items():
        module, _, rest = key.partition(".lora_")
        native[f"diffusion_model.{native_module_name(module)}.lora_{rest}"] = value
    with atomic_output(destination) as tmp_name:
        save_file(native, tmp_name, metadata={**metadata, "sdvgen.key_layout": "wan-native"})
    return destination
