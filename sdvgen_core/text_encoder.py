"""T5 text encoder from one safetensors file, as ComfyUI users keep it in `models/text_encoders/`.

Layouts read (those of `t5xxl_fp16`, `t5xxl_fp8_e4m3fn` and `t5xxl_fp8_e4m3fn_scaled`, as ComfyUI loads them):

- plain: fp32 / fp16 / bf16 tensors under T5's own key names (`shared.weight`, `encoder.block.N...`,
  `encoder.final_layer_norm.weight`), possibly behind a prefix (e.g. `text_encoders.t5xxl.transformer.`
  in files cut out of a full checkpoint); decoder keys, if any, are ignored;
- fp8 e4m3fn: the same keys with fp8 linear weights;
- fp8 "scaled" (ComfyUI's format): a `scaled_fp8` marker tensor and, per linear layer, a scalar
  `<layer>.scale_weight`; the real weight is `fp8_weight * scale_weight` (`scale_input`, used only by
  ComfyUI's fp8 matmul, is ignored).

Everything is dequantised to the chosen compute dtype one tensor at a time into a model built on the meta
device, so peak memory is about the model in that dtype. The T5 configuration comes from the key shapes.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from .errors import ModelLoadError
from .model_files import check_not_lfs_pointer, check_tokenizer_folder, check_tokenizer_works

logger = logging.getLogger(__name__)

FINAL_NORM_KEY = "encoder.final_layer_norm.weight"
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIX = ".scale_weight"
IGNORED_SUFFIXES = (".scale_input",)
_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")


def _key_prefix(keys: list[str], path: Path) -> str:
    """The prefix in front of T5's key names (`""` for the usual files)."""
    prefixes = sorted(key[: -len(FINAL_NORM_KEY)] for key in keys if key.endswith(FINAL_NORM_KEY))
    if not prefixes:
        raise ModelLoadError(
            f"text encoder file {str(path)!r} is not a T5 encoder (no '{FINAL_NORM_KEY}' key); choose a T5-XXL file "
            f"such as t5xxl_fp16.safetensors"
        )
    if len(prefixes) > 1:
        raise ModelLoadError(f"text encoder file {str(path)!r} holds several T5 encoders ({prefixes}); use a file with one")
    return prefixes[0]


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> T5Config:
    """T5 v1.1 encoder configuration from the weight shapes (keys without prefix)."""
    try:
        vocab_size, d_model = shapes["shared.weight"]
        num_layers = 1 + max(int(m.group(1)) for key in shapes if (m := _BLOCK.match(key)))
        num_buckets, num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner_dim = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
        d_ff = shapes[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"][0]
    except (KeyError, ValueError) as error:
        raise ModelLoadError(
            f"text encoder file {str(path)!r} lacks T5 encoder weights ({error}); it is incomplete or not a T5 encoder"
        ) from error
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=inner_dim // num_heads, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=num_buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def load_t5_encoder_file(path: str | os.PathLike, dtype: torch.dtype) -> T5EncoderModel:
    """A `T5EncoderModel` in `dtype` (eval mode, on the CPU) from one safetensors file in a layout above."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"text encoder file {str(path)!r} does not exist")
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"text encoder file {str(path)!r} is not .safetensors; only safetensors files are loaded")
    check_not_lfs_pointer(path, "text encoder file")
    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            prefix = _key_prefix(keys, path)
            own = {key[len(prefix):]: key for key in keys if key.startswith(prefix)}
            scaled = SCALED_FP8_MARKER in own
            shapes = {
                name: tuple(handle.get_slice(key).get_shape()) for name, key in own.items()
                if name.startswith(("shared.", "encoder.")) and not name.endswith((SCALE_SUFFIX, *IGNORED_SUFFIXES))
            }
            config = t5_config_from_shapes(shapes, path)
            with torch.device("meta"):
                model = T5EncoderModel(config)
            expected = model.state_dict()
            state: dict[str, torch.Tensor] = {}
            for name, target in expected.items():
                if name == "encoder.embed_tokens.weight":
                    continue  # tied to shared.weight below
                if name not in shapes:
                    raise ModelLoadError(f"text encoder file {str(path)!r} lacks the weight {prefix + name!r}")
                if shapes[name] != tuple(target.shape):
                    raise ModelLoadError(
                        f"text encoder file {str(path)!r}: weight {prefix + name!r} has shape {shapes[name]}, "
                        f"expected {tuple(target.shape)}; the file is damaged or not a T5 v1.1 encoder"
                    )
                tensor = handle.get_tensor(own[name])
                scale_key = own.get(name.removesuffix(".weight") + SCALE_SUFFIX)
                if scaled and scale_key is not None:
                    tensor = tensor.to(torch.float32) * handle.get_tensor(scale_key).to(torch.float32)
                state[name] = tensor.to(dtype)
    except (OSError, SafetensorError) as error:
        raise ModelLoadError(f"text encoder file {str(path)!r} is not a readable safetensors file: {error}") from error
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # one Parameter for both names, as from_pretrained leaves it (resizing keeps them tied)
    model.eval().requires_grad_(False)
    logger.info("loaded T5 encoder (%d layers, d_model %d%s) from %s", config.num_layers, config.d_model,
                ", fp8 scaled" if scaled else "", path)
    return model


def load_t5_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The T5 tokenizer in `folder` (sentencepiece `spiece.model` or `tokenizer.json`), checked to know real words."""
    folder = Path(folder)
    check_tokenizer_folder(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"cannot load the tokenizer in {str(folder)!r}: {error}") from error
    check_tokenizer_works(tokenizer, folder)
    return tokenizer
