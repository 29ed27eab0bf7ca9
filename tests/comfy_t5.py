"""Single-file T5 encoders written the way ComfyUI users' files are (t5xxl_fp16 / _fp8_e4m3fn / _fp8_e4m3fn_scaled).

Written here from a tiny `T5EncoderModel`, independently of `sdvgen_core.text_encoder`: T5's own key names
(`shared.weight`, `encoder.block.N...`, no tied `encoder.embed_tokens.weight`), optionally behind a prefix;
fp8 layouts store the linear weights in float8_e4m3fn, the scaled one with a `scaled_fp8` marker and a
per-layer `scale_weight` (weight = fp8 * scale, scale = amax / 448 as ComfyUI's converters choose it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5EncoderModel

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
LAYOUTS = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e4m3fn_scaled")
LINEAR = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wi.weight", ".wo.weight")


def comfy_t5_state(model: T5EncoderModel, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {k: v.detach().float() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    out: dict[str, torch.Tensor] = {}
    for name, weight in state.items():
        linear = name.endswith(LINEAR)
        if layout in ("fp32", "fp16", "bf16"):
            out[prefix + name] = weight.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[layout])
        elif layout == "fp8_e4m3fn":
            out[prefix + name] = weight.to(FP8) if linear else weight.to(torch.float16)
        elif linear:
            scale = weight.abs().max() / FP8_MAX
            out[prefix + name] = (weight / scale).to(FP8)
            out[prefix + name.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            out[prefix + name] = weight.to(torch.float16)
    if layout == "fp8_e4m3fn_scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def dequantised_state(file_state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """What the file means in fp32 (the independent reference for the loader)."""
    out = {}
    for key, tensor in file_state.items():
        if key.endswith((".scale_weight", "scaled_fp8")):
            continue
        scale = file_state.get(key.removesuffix(".weight") + ".scale_weight")
        value = tensor.float() * (scale.float() if scale is not None else 1.0)
        out[key[len(prefix):]] = value
    return out


def write_comfy_t5(model: T5EncoderModel, path: Path, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    state = comfy_t5_state(model, layout, prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


def wrapper_style_folder(model_dir: Path, folder: Path) -> Path:
    """A copy of a model folder as the CogVideoX wrapper pack downloads it: no text_encoder/ and no tokenizer/."""
    folder.mkdir(parents=True)
    for name in ("transformer", "vae", "scheduler"):
        shutil.copytree(model_dir / name, folder / name)
    shutil.copy(model_dir / "model_index.json", folder / "model_index.json")
    return folder
