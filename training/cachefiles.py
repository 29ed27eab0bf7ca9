"""The cache on disk: `meta.json` and the per-item safetensors files, written atomically and verified on use.

`prepare` writes `meta.json` before encoding (`"complete": false`) and again when every rank is done
(`true`), with the expected tensor shapes of an item; it checks each existing item against them (header
readable, file fully covered, every tensor present with its shape and dtype) and redoes broken ones.
`train` checks every item's header the same way before any model loads, and each tensor it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdvgen_core.backbones import Backbone
from sdvgen_core.files import atomic_write_text

from .config import Config
from .data import DataError

META_FILE = "meta.json"
SAFETENSORS_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
RERUN = "re-run `python -m training prepare` with the same config (it redoes broken cache files)"


class CacheFileError(DataError):
    """A cache file that cannot be used; the message names it and says how to repair the cache."""


def read_meta(root: Path) -> dict | None:
    """The cache's `meta.json` (None if there is none); a damaged one is an error naming it and the fix."""
    path = root / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        problem = None if isinstance(meta, dict) else "not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"not valid JSON: {error}"
    if problem is not None:
        raise CacheFileError(
            f"the cache's {str(path)!r} is damaged ({problem}; a full disk or a killed `prepare`?): delete it and "
            f"re-run `python -m training prepare` with this cache's config (existing items are verified and reused)"
        )
    return meta


def write_meta(root: Path, meta: dict) -> None:
    atomic_write_text(root / META_FILE, json.dumps(meta, indent=2))


def item_shapes(config: Config, backbone: Backbone, vae_config, text_dim: int) -> dict[str, dict[str, list[int]]]:
    """Expected tensor shapes of a cached item per kind (`name.mean/.std` share a shape; `text*` one)."""
    data = config.data
    ratio = backbone.vae_scale_spatial
    channels = vae_config[backbone.vae_channels_key]
    margin = 2 * data.identity.jitter_px
    frames = data.video.num_frames
    latent_frames = (frames - 1) // backbone.vae_scale_temporal + 1
    latent = [data.height // ratio, data.width // ratio]
    text = [backbone.max_text_tokens, text_dim]
    return {
        "identity": {"view0": [channels, (data.height + margin) // ratio, (data.width + margin) // ratio],
                     "view1": [channels, (data.height + margin) // ratio, (data.width + margin) // ratio],
                     "text": text},
        "video": {"video": [latent_frames, channels, *latent], "frames": [frames, channels, *latent], "text": text},
    }


def _read_header(path: Path) -> dict[str, tuple[list[int], str]]:
    # safe_open also checks that the header's offsets cover the file exactly (a truncated file fails here)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype()) for key in handle.keys()}


def header(path: Path) -> dict[str, tuple[list[int], str]]:
    """`name -> (shape, dtype)` from the header; `CacheFileError` when the file is unreadable or truncated."""
    try:
        return _read_header(path)
    except (SafetensorError, OSError) as error:
        raise CacheFileError(f"cache file {str(path)!r} is not a readable safetensors file ({error}): {RERUN}") from None


def item_problem(path: Path, kind: str, meta: dict) -> str | None:
    """What is wrong with a cached item (None if it is sound), judged by its header against `meta`."""
    try:
        tensors = _read_header(path)
    except (SafetensorError, OSError) as error:
        return f"not a readable safetensors file ({error})"
    shapes = meta.get("item_shapes", {}).get(kind)
    if shapes is None:  # a cache from before shapes were recorded: readability is all that can be checked
        return None
    dtype = SAFETENSORS_DTYPES.get(meta.get("cache_dtype", ""))
    texts = [k for k in tensors if k == "text" or k.startswith("text.")]
    if not texts:
        return "no text embedding"
    expected = {k: shapes["text"] for k in texts}
    for name, shape in shapes.items():
        if name != "text":
            expected |= {f"{name}.mean": shape, f"{name}.std": shape}
    for key, shape in expected.items():
        if key not in tensors:
            return f"tensor {key} is missing"
        got_shape, got_dtype = tensors[key]
        if list(got_shape) != list(shape):
            return f"tensor {key} has shape {list(got_shape)}, expected {shape}"
        if dtype and got_dtype != dtype:
            return f"tensor {key} is {got_dtype}, expected {dtype} (data.cache_dtype)"
    return None


def check_items(files: list[Path], kind: str, meta: dict) -> None:
    """`train`: every item's header must be sound before any model loads."""
    for path in files:
        problem = item_problem(path, kind, meta)
        if problem is not None:
            raise CacheFileError(f"cache file {str(path)!r} is broken ({problem}): {RERUN}")


def read_item(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a cached item; `CacheFileError` naming the file for unreadable or non-finite data."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CacheFileError(f"cache file {str(path)!r} cannot be read ({error}): {RERUN}") from None
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CacheFileError(f"cache file {str(path)!r} holds non-finite values in {key}: delete it and {RERUN}")
    return tensors
