"""Checks of model folders and files before any weights load, each failing with one `ModelLoadError` line.

Catches what otherwise fails late or silently: missing subfolders, Git-LFS pointer files in place of the
real files (a clone without `git lfs pull`), configs that are not valid JSON, a tokenizer without its
vocabulary (it would load and turn every word into `<unk>`), and weights whose shapes do not match
their config (read from the safetensors headers only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError

MODEL_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_SUBFOLDERS = ("text_encoder", "tokenizer")
CONFIG_FILES = {
    "transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
    "scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
}
TOKENIZER_VOCAB_FILES = ("spiece.model", "tokenizer.json")
LFS_POINTER_START = b"version https://git-lfs.github.com/spec/v1"
LFS_POINTER_MAX_BYTES = 1024
# Words every T5 (and the tiny test tokenizer) knows; a tokenizer mapping all of them to <unk> has no vocabulary.
PROBE_TEXT = "a dog runs in the garden"


def check_not_lfs_pointer(path: Path, what: str) -> None:
    """Refuse a Git-LFS pointer file (a few hundred bytes of text) standing where `path`'s content should be."""
    if path.stat().st_size <= LFS_POINTER_MAX_BYTES and path.read_bytes().startswith(LFS_POINTER_START):
        raise ModelLoadError(
            f"{what} {str(path)!r} is a Git-LFS pointer, not the file itself; run `git lfs pull` in the "
            f"repository (or download the file directly) and try again"
        )


def read_json(path: Path) -> dict:
    """A JSON config file as a dict, or `ModelLoadError` naming the file and the problem."""
    if not path.is_file():
        raise ModelLoadError(f"{str(path)!r} is missing; the model folder is incomplete")
    check_not_lfs_pointer(path, "config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"config file {str(path)!r} is not valid JSON ({error}); re-download it") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"config file {str(path)!r} holds {type(data).__name__}, expected a JSON object")
    return data


def missing_text_encoder_message(root: Path, missing: list[str]) -> str:
    return (
        f"model folder {str(root)!r} has no {' and no '.join(f'{name}/' for name in missing)} (as downloaded by "
        f"CogVideoX node packs, which encode text with a separate T5-XXL file). Either put a T5-XXL file "
        f"(e.g. t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors) into models/text_encoders and "
        f"choose it as the text encoder (Load SDV LoRA: text_encoder input; CLI: --text-encoder), or add the "
        f"text_encoder/ and tokenizer/ subfolders of THUDM/CogVideoX-5b to the folder"
    )


def check_model_dir(model_dir: str | os.PathLike, text_encoder_file: bool = False) -> Path:
    """Raise `ModelLoadError` unless `model_dir` is a complete diffusers model folder (safetensors), either backbone.

    With `text_encoder_file` the text encoder comes from a separate file, so `text_encoder/` may be
    missing (and `tokenizer/`, which the host's T5 tokenizer then replaces).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(
            f"model folder {str(root)!r} does not exist; download CogVideoX-5B (THUDM/CogVideoX-5b) or Wan 2.2 "
            f"TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers) in diffusers layout and point to the folder that holds "
            f"{', '.join(MODEL_SUBFOLDERS)}"
        )
    optional = TEXT_SUBFOLDERS if text_encoder_file else ()
    missing = [name for name in MODEL_SUBFOLDERS if not (root / name).is_dir() and name not in optional]
    missing_text = [name for name in missing if name in TEXT_SUBFOLDERS]
    if missing_text:
        raise ModelLoadError(missing_text_encoder_message(root, missing_text))
    if missing:
        raise ModelLoadError(
            f"model folder {str(root)!r} lacks the subfolder(s) {missing}; expected the diffusers layout "
            f"{list(MODEL_SUBFOLDERS)} (as in THUDM/CogVideoX-5b or Wan-AI/Wan2.2-TI2V-5B-Diffusers)"
        )
    weighted = ("transformer", "vae") if text_encoder_file else ("transformer", "vae", "text_encoder")
    for name in MODEL_SUBFOLDERS:
        if (root / name).is_dir() and not (text_encoder_file and name == "text_encoder"):
            read_json(root / name / CONFIG_FILES[name])
    for name in weighted:
        weight_files(root / name)
    if (root / "tokenizer").is_dir():
        check_tokenizer_folder(root / "tokenizer")
    return root


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weights of a model subfolder, checked to be real files (not LFS pointers)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found only pickle files {pickles}, which are never loaded)" if pickles else ""
        raise ModelLoadError(f"{str(folder)!r} has no .safetensors weights{hint}; convert or re-download them")
    for path in files:
        check_not_lfs_pointer(path, "weight file")
    return files


def check_tokenizer_folder(folder: Path) -> None:
    """A tokenizer folder needs its vocabulary (`spiece.model` or `tokenizer.json`) as a real file."""
    present = [folder / name for name in TOKENIZER_VOCAB_FILES if (folder / name).is_file()]
    if not present:
        raise ModelLoadError(
            f"tokenizer folder {str(folder)!r} has no vocabulary file (one of {list(TOKENIZER_VOCAB_FILES)}); without "
            f"it every word would become <unk>. Copy spiece.model from THUDM/CogVideoX-5b's tokenizer/ into it"
        )
    for path in present:
        check_not_lfs_pointer(path, "tokenizer file")


def check_tokenizer_works(tokenizer, folder: Path) -> None:
    """Refuse a tokenizer that maps common words to `<unk>` (a vocabulary that did not load)."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    if not ids or tokenizer.unk_token_id in ids:
        raise ModelLoadError(
            f"the tokenizer in {str(folder)!r} turns the plain words {PROBE_TEXT!r} into <unk>: its vocabulary did not load; "
            f"re-download spiece.model / tokenizer.json"
        )


def check_weight_shapes(folder: Path, meta_model: torch.nn.Module) -> None:
    """Compare the safetensors headers in `folder` with `meta_model` (built from the folder's config on `meta`)."""
    expected = {name: tuple(tensor.shape) for name, tensor in meta_model.state_dict().items()}
    found = 0
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    if key not in expected:
                        continue
                    found += 1
                    shape = tuple(handle.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise ModelLoadError(
                            f"{str(path)!r}: weight {key!r} has shape {shape} but {str(folder / 'config.json')!r} "
                            f"implies {expected[key]}; the config and the weights come from different models"
                        )
        except SafetensorError as error:
            raise ModelLoadError(f"weight file {str(path)!r} is not a readable safetensors file: {error}") from error
    if not found:
        raise ModelLoadError(
            f"the weights in {str(folder)!r} share no names with the model {str(folder / 'config.json')!r} describes; "
            f"they belong to another model"
        )
