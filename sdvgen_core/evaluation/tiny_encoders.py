"""Tiny random CLIP and DINO-ViT folders built in code, laid out like the real ones.

They let the demo and the tests run every metric's real loading and scoring path without a download.
Their weights are random, so their scores mean nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_IMAGE_SIZE = 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _byte_level_vocab() -> list[str]:
    """The 256 byte-level symbols CLIP's BPE starts from (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny CLIPModel + CLIPProcessor (byte-level BPE without merges) saved with safetensors."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_level_vocab()
    vocab = {token: index for index, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]},
        vision_config={"image_size": TINY_IMAGE_SIZE, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_dino(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny ViTModel (DINO ViT-S/16 layout, patch 8 at 32 px) + its image processor, saved with safetensors."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    config = ViTConfig(image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder)
    return folder
