"""`export`: a checkpoint's adapter -> a standalone LoRA file (core writer: atomic, diffusers-loadable).

For Wan 2.2 a second file `<output stem>_comfyui.safetensors` holds the same LoRA under the native Wan keys
that ComfyUI's core `LoraLoaderModelOnly` maps (`training.families.write_extra_lora_copies`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdvgen_core.lora import DEFAULT_ADAPTER, make_lora_config, read_lora_file, save_lora
from sdvgen_core.pipeline import resolve_dtype

from .config import Config, ConfigError
from .families import extra_lora_paths, resolve_backbone, write_extra_lora_copies
from .models import load_transformer
from .rundir import check_writable
from .trainer import ADAPTER_FILE, LORA_FILE, find_checkpoint, load_adapter

logger = logging.getLogger(__name__)


def run_export(config: Config, checkpoint: str, output: str, dtype: str, overwrite: bool = False) -> Path:
    """Write the LoRA of `checkpoint` (a folder or `latest` in `train.output_dir`) to `output` in `dtype`.

    An existing `output` is replaced only with `overwrite`; both are checked before the model loads.
    """
    backbone = resolve_backbone(config)
    check_new_output(Path(output), overwrite)
    for extra in extra_lora_paths(backbone, Path(output)):
        check_new_output(extra, overwrite)
    folder = find_checkpoint(Path(config.train.output_dir), checkpoint)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint in {config.train.output_dir!r}/checkpoints")
    _, header = read_lora_file(folder / LORA_FILE)
    transformer = load_transformer(config.model.path, config.model.dtype, backbone)
    # The adapter's shape and scale are the checkpoint's, whatever the current config says.
    rank, alpha = int(header["sdvgen.rank"]), float(header["sdvgen.alpha"])
    targets = json.loads(header["sdvgen.target_modules"])
    transformer.add_adapter(make_lora_config(rank, alpha, 0.0, targets), adapter_name=DEFAULT_ADAPTER)
    load_adapter(transformer, folder / ADAPTER_FILE)
    extra = {k: v for k, v in header.items() if k.startswith("sdvgen.")}
    path = save_lora(transformer, output, adapter_name=DEFAULT_ADAPTER, dtype=resolve_dtype(dtype), extra_metadata=extra)
    write_extra_lora_copies(backbone, path, overwrite=True)  # its name was checked above
    logger.info("exported %s -> %s (%s)", folder, path, dtype)
    return path


def check_new_output(output: Path, overwrite: bool) -> None:
    """`--output` must be a writable file path; an existing file only with `--overwrite`."""
    if output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a folder: name the .safetensors file to write")
    if output.exists() and not overwrite:
        raise ConfigError(f"--output {str(output)!r} already exists: choose another name or pass --overwrite")
    check_writable(output.parent, "--output folder")
