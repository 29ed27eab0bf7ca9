"""Loading the frozen CogVideoX parts the trainer needs, from a diffusers folder (safetensors only)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from sdvgen_core.errors import ModelLoadError
from sdvgen_core.pipeline import check_model_dir, resolve_dtype
from sdvgen_core.prompts import ClsTokenInfo, add_cls_token
from sdvgen_core.transformer import SDVGenTransformer3DModel


def _load(what: str, root: Path, loader):
    try:
        return loader()
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load the {what} from {str(root)!r}: {error}") from error


def load_vae(model_dir: str, dtype: str) -> AutoencoderKLCogVideoX:
    root = check_model_dir(model_dir)
    vae = _load("VAE", root, lambda: AutoencoderKLCogVideoX.from_pretrained(
        root, subfolder="vae", torch_dtype=resolve_dtype(dtype), use_safetensors=True))
    return vae.requires_grad_(False).eval()


def load_text_encoder(model_dir: str, dtype: str) -> tuple[PreTrainedTokenizerBase, T5EncoderModel, ClsTokenInfo]:
    """Tokenizer and T5 encoder with `<cls>` wired in exactly as inference does."""
    root = check_model_dir(model_dir)
    tokenizer = _load("tokenizer", root, lambda: AutoTokenizer.from_pretrained(root / "tokenizer"))
    text_encoder = _load("text encoder", root, lambda: T5EncoderModel.from_pretrained(
        root / "text_encoder", torch_dtype=resolve_dtype(dtype), use_safetensors=True))
    cls_info = add_cls_token(tokenizer, text_encoder)
    return tokenizer, text_encoder.requires_grad_(False).eval(), cls_info


def load_transformer(model_dir: str, dtype: str) -> SDVGenTransformer3DModel:
    root = check_model_dir(model_dir)
    transformer = _load("transformer", root, lambda: SDVGenTransformer3DModel.from_pretrained(
        root, subfolder="transformer", torch_dtype=resolve_dtype(dtype), use_safetensors=True))
    transformer.check_supported()
    return transformer.requires_grad_(False)


def load_scheduler(model_dir: str) -> CogVideoXDDIMScheduler:
    root = check_model_dir(model_dir)
    return _load("scheduler", root, lambda: CogVideoXDDIMScheduler.from_pretrained(root, subfolder="scheduler"))


def flush_subnormals_on_cpu(device: torch.device) -> None:
    """On CPUs, treat subnormal floats as zero. Small VAE activations, Adam's second moments and tiny LoRA
    updates go subnormal, and x86 handles those in microcode: CPU runs were 3-10x slower without this."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
