"""Loading the frozen parts the trainer needs from a diffusers folder (safetensors only), for any backbone family.

Each loader takes the family's `Backbone` (`training.families.resolve_backbone`); the classes come from it, so
CogVideoX loads `AutoencoderKLCogVideoX` / `T5EncoderModel` / `SDVGenTransformer3DModel` and Wan 2.2
`AutoencoderKLWan` / `UMT5EncoderModel` / `SDVGenWanTransformer3DModel`, exactly as the inference pipelines do.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from diffusers import CogVideoXDDIMScheduler
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sdvgen_core.backbones import COGVIDEOX, Backbone, get_backbone
from sdvgen_core.errors import ModelLoadError
from sdvgen_core.pipeline import check_model_dir, resolve_dtype
from sdvgen_core.prompts import ClsTokenInfo, add_cls_token


def _load(what: str, root: Path, loader):
    try:
        return loader()
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load the {what} from {str(root)!r}: {error}") from error


def _backbone(backbone: Backbone | None) -> Backbone:
    return backbone or get_backbone(COGVIDEOX)


def load_vae(model_dir: str, dtype: str, backbone: Backbone | None = None):
    """The family's VAE, frozen; in fp32 where the family's pipeline keeps it there (Wan)."""
    backbone = _backbone(backbone)
    root = check_model_dir(model_dir)
    vae = _load("VAE", root, lambda: backbone.vae_class.from_pretrained(
        root, subfolder="vae", torch_dtype=resolve_dtype(backbone.vae_dtype or dtype), use_safetensors=True))
    return vae.requires_grad_(False).eval()


def load_text_encoder(model_dir: str, dtype: str, backbone: Backbone | None = None
                      ) -> tuple[PreTrainedTokenizerBase, torch.nn.Module, ClsTokenInfo]:
    """Tokenizer and text encoder (T5 / UMT5) with `<cls>` wired in exactly as inference does."""
    backbone = _backbone(backbone)
    root = check_model_dir(model_dir)
    encoder_class = getattr(transformers, backbone.text_encoder_class)
    tokenizer = _load("tokenizer", root, lambda: AutoTokenizer.from_pretrained(root / "tokenizer"))
    text_encoder = _load("text encoder", root, lambda: encoder_class.from_pretrained(
        root / "text_encoder", torch_dtype=resolve_dtype(dtype), use_safetensors=True))
    cls_info = add_cls_token(tokenizer, text_encoder)
    return tokenizer, text_encoder.requires_grad_(False).eval(), cls_info


def load_transformer(model_dir: str, dtype: str, backbone: Backbone | None = None):
    """The family's SDV-Gen transformer (stock weights, reference-aware forward), frozen."""
    backbone = _backbone(backbone)
    root = check_model_dir(model_dir)
    transformer = _load("transformer", root, lambda: backbone.transformer_class.from_pretrained(
        root, subfolder="transformer", torch_dtype=resolve_dtype(dtype), use_safetensors=True))
    transformer.check_supported()
    return transformer.requires_grad_(False)


def load_scheduler(model_dir: str) -> CogVideoXDDIMScheduler:
    """CogVideoX's DDIM training scheduler (v-prediction)."""
    root = check_model_dir(model_dir)
    return _load("scheduler", root, lambda: CogVideoXDDIMScheduler.from_pretrained(root, subfolder="scheduler"))


def flush_subnormals_on_cpu(device: torch.device) -> None:
    """On CPUs, treat subnormal floats as zero. Small VAE activations, Adam's second moments and tiny LoRA
    updates go subnormal, and x86 handles those in microcode: CPU runs were 3-10x slower without this."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
