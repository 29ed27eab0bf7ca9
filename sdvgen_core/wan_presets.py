"""The embedded `tiny-wan` preset: a randomly initialised Wan 2.2 TI2V-architecture model built in code.

Same layout and options as Wan2.2-TI2V-5B-Diffusers, only tiny: `WanTransformer3DModel` with temporal patch 1
and 48 latent channels, `AutoencoderKLWan` in the Wan 2.2 layout (z_dim 48, residual blocks, pixel patch 2
so 12 input channels, 16x spatial / 4x temporal compression), a UMT5 encoder with a SentencePiece tokenizer,
the flow-matching UniPC scheduler with shift 5, and `expand_timesteps` (per-token timesteps) in
`model_index.json`. It loads through exactly the code path real weights take; its output is noise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .presets import UNUSED_TABLE_ROWS, write_t5_tokenizer

WAN22_FLOW_SHIFT = 5.0  # Wan2.2-TI2V-5B's sample_shift
WAN22_LATENT_CHANNELS = 48

# Generation settings the CLI uses for `--preset tiny-wan` (seconds on 2 CPU cores).
TINY_WAN_GENERATION_DEFAULTS = {"height": 128, "width": 192, "num_frames": 17, "num_inference_steps": 8}


@dataclass(frozen=True)
class TinyWanConfig:
    """Sizes of the tiny Wan 2.2 model (every ratio of TI2V-5B kept: patch [1, 2, 2], 48 channels, 16x VAE)."""

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    text_dim: int = 32
    vae_base_dim: int = 8
    text_layers: int = 2
    spm_vocab_size: int = 160
    table_rows: int | None = None  # None: tokenizer length + 28 spare rows
    seed: int = 0


def wan22_scheduler():
    """Flow-matching UniPC as configured in Wan2.2-TI2V-5B-Diffusers (`flow_shift` 5)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=WAN22_FLOW_SHIFT,
        num_train_timesteps=1000, solver_order=2, solver_type="bh2", final_sigmas_type="zero",
    )


def build_tiny_wan_model(folder: str | os.PathLike, config: TinyWanConfig = TinyWanConfig()) -> Path:
    """Write a tiny random Wan 2.2 TI2V model (diffusers layout, safetensors) to `folder` and return it."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    tokenizer_length = write_t5_tokenizer(folder / "tokenizer", config.spm_vocab_size)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim, in_channels=WAN22_LATENT_CHANNELS,
            out_channels=WAN22_LATENT_CHANNELS, text_dim=config.text_dim, freq_dim=32,
            ffn_dim=2 * config.num_attention_heads * config.attention_head_dim, num_layers=config.num_layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        )
        vae = AutoencoderKLWan(
            base_dim=config.vae_base_dim, decoder_base_dim=config.vae_base_dim, z_dim=WAN22_LATENT_CHANNELS,
            dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
            in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
            # Not the real statistics (random weights have none): distinct per-channel values so that
            # normalisation is exercised.
            latents_mean=[round(0.02 * (i % 7) - 0.06, 4) for i in range(WAN22_LATENT_CHANNELS)],
            latents_std=[round(0.8 + 0.05 * (i % 5), 4) for i in range(WAN22_LATENT_CHANNELS)],
        )
        table_rows = config.table_rows or tokenizer_length + UNUSED_TABLE_ROWS
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=table_rows, d_model=config.text_dim, d_kv=8, d_ff=64, num_layers=config.text_layers,
                num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    wan22_scheduler().save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "WanPipeline",
        "boundary_ratio": None,
        "expand_timesteps": True,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "sdvgen_preset": "tiny-wan (random weights: output is noise)",
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder
