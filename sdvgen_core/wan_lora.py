"""Wan key layouts: diffusers `WanTransformer3DModel` names -> the native Wan names ComfyUI uses.

We write Wan LoRAs in the diffusers key layout (`transformer.blocks.0.attn1.to_q.lora_A.weight`), which our
core, diffusers' `WanPipeline.load_lora_weights` and the "SDV-Gen Wan LoRA Loader" node load. ComfyUI 0.3.64's
`model_lora_keys_unet` has no diffusers mapping for Wan models: it matches only the native names
(`diffusion_model.blocks.0.self_attn.q`), so `export_wan_lora_for_comfyui` writes a copy with native names for
its core `LoraLoaderModelOnly`. The rename is the inverse of diffusers' Wan checkpoint conversion
(`self_attn.q` -> `attn1.to_q`, `ffn.0` -> `ffn.net.0.proj`, ...). Alpha is already folded into `lora_B` in our
files, so the native copy needs no alpha keys (ComfyUI then applies scale 1). This is the one map: the node's
LoRA loader and the tests use it too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import LoraLoadError
from .files import atomic_output
from .lora import lora_file_family, read_lora_file

# diffusers module name -> native Wan module name (block-level names apply under `blocks.N.`)
WAN_DIFFUSERS_TO_NATIVE = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # the (affine) cross-attention norm is norm3 natively
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "patch_embedding": "patch_embedding", "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2", "proj_out": "head.head",
}
# parameters that are not under a module: the output head's and each block's modulation table
_NATIVE_PARAMETERS = {"scale_shift_table": "head.modulation"}
_BLOCK_PARAMETERS = {"scale_shift_table": "modulation"}
_LORA_KEY = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.(?P<part>lora_[AB]\.weight|lora_B\.bias)$")


def native_module_name(diffusers_name: str) -> str:
    """`blocks.3.attn1.to_q` -> `blocks.3.self_attn.q`, `condition_embedder.text_embedder.linear_1` -> `text_embedding.0`.

    Raises `LoraLoadError` for a name that is no Wan 2.2 module (e.g. a CogVideoX `transformer_blocks.0...`).
    """
    prefix, inner = "", diffusers_name
    block = re.fullmatch(r"(blocks\.\d+\.)(.+)", diffusers_name)
    if block:
        prefix, inner = block[1], block[2]
    if inner not in WAN_DIFFUSERS_TO_NATIVE:
        raise LoraLoadError(
            f"module {diffusers_name!r} is not a Wan 2.2 transformer module in the diffusers layout (e.g. "
            f"'blocks.0.attn1.to_q'); is this a CogVideoX LoRA? known names: {sorted(WAN_DIFFUSERS_TO_NATIVE)}"
        )
    return prefix + WAN_DIFFUSERS_TO_NATIVE[inner]


def native_weight_name(diffusers_key: str) -> str:
    """The native name of a `WanTransformer3DModel` state-dict key (`blocks.0.attn1.to_q.weight` ->
    `blocks.0.self_attn.q.weight`, `blocks.0.scale_shift_table` -> `blocks.0.modulation`)."""
    if diffusers_key in _NATIVE_PARAMETERS:
        return _NATIVE_PARAMETERS[diffusers_key]
    block = re.fullmatch(r"(blocks\.\d+\.)(\w+)", diffusers_key)
    if block and block[2] in _BLOCK_PARAMETERS:
        return block[1] + _BLOCK_PARAMETERS[block[2]]
    module, _, parameter = diffusers_key.rpartition(".")
    return f"{native_module_name(module)}.{parameter}"


def diffusers_wan_lora_to_native(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Wan LoRA tensors (`[transformer.]blocks.0.attn1.to_q.lora_A.weight`) under ComfyUI's native keys
    (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`); the tensors themselves are passed through.

    A key that is not a LoRA tensor of a Wan 2.2 module is a `LoraLoadError` naming it.
    """
    native = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise LoraLoadError(
                f"LoRA key {key!r} is not a LoRA tensor in the diffusers layout "
                f"(expected e.g. 'transformer.blocks.0.attn1.to_q.lora_A.weight')"
            )
        try:
            module = native_module_name(match["module"])
        except LoraLoadError as error:
            raise LoraLoadError(f"LoRA key {key!r}: {error}") from None
        native[f"diffusion_model.{module}.{match['part']}"] = value
    return native


def export_wan_lora_for_comfyui(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write `source` (our Wan LoRA, diffusers layout) with native Wan keys `diffusion_model.<native>.lora_A.weight`.

    Refuses a CogVideoX LoRA and an existing `destination` (never overwrites what the user has).
    """
    destination = Path(destination)
    if destination.exists():
        raise LoraLoadError(f"{str(destination)!r} already exists; choose another name or remove it first")
    tensors, metadata = read_lora_file(source)
    family = lora_file_family({key.removeprefix("transformer."): value for key, value in tensors.items()}, metadata)
    if family not in (None, "wan22"):
        raise LoraLoadError(f"{str(source)!r} is a LoRA for the {family} backbone; only Wan LoRAs are converted")
    native = diffusers_wan_lora_to_native(tensors)
    with atomic_output(destination) as tmp_name:
        save_file(native, tmp_name, metadata={**metadata, "sdvgen.family": "wan22", "sdvgen.key_layout": "wan-native"})
    return destination
