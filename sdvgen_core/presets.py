"""The embedded `tiny` preset: a randomly initialised CogVideoX-architecture model built in code.

It has the real architecture and folder layout (diffusers `transformer/`, `vae/`, `text_encoder/`,
`tokenizer/` as a SentencePiece T5 tokenizer with 100 extra ids and a table 28 rows longer, like
CogVideoX's 32100/32128, `scheduler/`), only tiny. It loads through exactly the code path real weights
take. Its weights are random, so the videos it makes are noise: it exists for demos, tests and
benchmarks without downloads.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_TEXT_DIM = 32
EXTRA_IDS = 100
UNUSED_TABLE_ROWS = 28  # CogVideoX: tokenizer 32100, T5 table 32128

_SUBJECTS = "cat dog toy car backpack armchair robot teddy bear pig duck sneaker mug lamp plant guitar kettle".split()
_ACTIONS = "runs jumps rolls spins walks sits flies swims dances drives chases floats sleeps waves".split()
_PLACES = (
    "in the garden|on the beach at sunset|in the living room|on a wet road|in the snow|on a wooden table|"
    "under the rain|in a forest|on the street|near a lake|in the kitchen|on the grass"
).split("|")
_STYLES = "a an the red blue small big old new happy fluffy shiny slowly quickly camera zooms in close up".split()


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of the tiny CogVideoX. Defaults keep every CogVideoX ratio (8x space, 4x time, patch 2, 16 channels)."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    vae_channels: int = 8
    text_layers: int = 2
    spm_vocab_size: int = 160
    table_rows: int | None = None  # None: tokenizer length + 28, like CogVideoX
    seed: int = 0


# Generation settings the CLI uses for `--preset tiny` (seconds on 2 CPU cores).
TINY_GENERATION_DEFAULTS = {"height": 160, "width": 256, "num_frames": 25, "num_inference_steps": 10}


def _corpus() -> list[str]:
    sentences = []
    for i, subject in enumerate(_SUBJECTS):
        for j, action in enumerate(_ACTIONS):
            place = _PLACES[(i + j) % len(_PLACES)]
            style = _STYLES[(i * 3 + j) % len(_STYLES)]
            sentences.append(f"A {style} {subject} {action} {place}.")
    return sentences


def write_t5_tokenizer(folder: str | os.PathLike, vocab_size: int) -> int:
    """Train a small SentencePiece model and write it as a CogVideoX-style T5 tokenizer; return its length."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS, "model_max_length": 226, "legacy": True,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(AutoTokenizer.from_pretrained(folder))


def cogvideox_5b_scheduler():
    """The DDIM scheduler exactly as configured in CogVideoX-5B's `scheduler/scheduler_config.json`."""
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=1.0, timestep_spacing="trailing",
    )


def build_tiny_model(folder: str | os.PathLike, config: TinyModelConfig = TinyModelConfig()) -> Path:
    """Write a tiny random CogVideoX (diffusers layout, safetensors) to `folder` and return it."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    tokenizer_length = write_t5_tokenizer(folder / "tokenizer", config.spm_vocab_size)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim,
            in_channels=16,
            out_channels=16,
            time_embed_dim=32,
            text_embed_dim=TINY_TEXT_DIM,
            num_layers=config.num_layers,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            use_rotary_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(config.vae_channels,) * 4,
            latent_channels=16,
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.7,
        )
        table_rows = config.table_rows or tokenizer_length + UNUSED_TABLE_ROWS
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=table_rows, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=config.text_layers,
                num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = cogvideox_5b_scheduler()
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "CogVideoXPipeline",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        "sdvgen_preset": "tiny (random weights: output is noise)",
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder
