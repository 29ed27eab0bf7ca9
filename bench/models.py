"""Random-weight CogVideoX pipelines at benchmark sizes (no download): tiny, mid (CPU) and real 5B (GPU)."""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKLCogVideoX
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from sdvgen_core.pipeline import SDVGenPipeline
from sdvgen_core.presets import cogvideox_5b_scheduler, write_t5_tokenizer
from sdvgen_core.transformer import SDVGenTransformer3DModel

TRANSFORMER = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, num_layers=2, time_embed_dim=32),
    "mid": dict(num_attention_heads=8, attention_head_dim=64, text_embed_dim=512, num_layers=2, time_embed_dim=128),
    "5b": dict(num_attention_heads=48, attention_head_dim=64, text_embed_dim=4096, num_layers=42, time_embed_dim=512),
}
# Wan 2.2 TI2V transformer sizes; "5b" is Wan2.2-TI2V-5B's config (dim 3072, 30 layers, 48 latent channels).
_WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=48, out_channels=48, freq_dim=256, rope_max_seq_len=1024)
WAN_TRANSFORMER = {
    "tiny": dict(_WAN_COMMON, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2),
    "mid": dict(_WAN_COMMON, num_attention_heads=8, attention_head_dim=64, text_dim=512, ffn_dim=2048, num_layers=2),
    "5b": dict(_WAN_COMMON, num_attention_heads=24, attention_head_dim=128, text_dim=4096, ffn_dim=14336, num_layers=30),
}
VAE = {
    "tiny": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
    "mid": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
    "5b": dict(block_out_channels=(128, 256, 256, 512), layers_per_block=3, norm_num_groups=32),
}
T5 = {
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "mid": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=2, num_heads=8),
    "5b": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),  # T5-XXL encoder
}


def random_pipeline(model: str, dtype: torch.dtype, init_device: str = "cpu") -> SDVGenPipeline:
    """A pipeline with CogVideoX's architecture at size `model` and random weights, built on `init_device`."""
    torch.manual_seed(0)
    with torch.device(init_device):
        transformer = SDVGenTransformer3DModel(
            **TRANSFORMER[model], use_rotary_positional_embeddings=True, sample_frames=49
        ).to(dtype)
        vae = AutoencoderKLCogVideoX(latent_channels=16, scaling_factor=0.7, **VAE[model]).to(dtype)
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **T5[model])
        ).to(dtype)
    with tempfile.TemporaryDirectory() as folder:
        write_t5_tokenizer(folder, 160)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    # Built models start in training mode; T5's dropout (0.1) would make every generation differ.
    for model in (transformer, vae, text_encoder):
        model.eval()
    return SDVGenPipeline(tokenizer, text_encoder, vae, transformer, cogvideox_5b_scheduler())
