"""Tiny stand-ins for the Wan 2.2 files of a real ComfyUI, for the real-host tests (host's Python, ComfyUI imported).

The host's UMT5-XXL and Wan 2.2 VAE only come at full size, so: a tiny native-format Wan 2.2 TI2V
transformer (ComfyUI detects it from its tensor shapes), a real `comfy.sd.CLIP` with the real UMT5
tokenizer class on a small sentencepiece model and a 1-layer UMT5 that keeps UMT5-XXL's 256,384-row
embedding table, and a "VAE" that pools 16x and maps 3 <-> 48 channels. Never shipped in the pack.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import comfy.ldm.wan.model
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.t5
import comfy.text_encoders.wan

TINY_WAN = dict(model_type="t2v", in_dim=48, out_dim=48, dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=4096)
COMFYUI_ROOT = Path(comfy.sd.__file__).resolve().parents[1]


def write_tiny_wan22(path: Path) -> dict[str, torch.Tensor]:
    """A native-layout Wan 2.2 TI2V-architecture state dict, random but deterministic."""
    model = comfy.ldm.wan.model.WanModel(**TINY_WAN, operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(value.shape, generator=generator) * 0.05 for key, value in model.state_dict().items()}
    save_file(state, str(path))
    return state


class PoolingVAE:
    """Test-only stand-in for the Wan 2.2 VAE: 16x average pooling and a fixed 3 -> 48 channel map."""

    def __init__(self) -> None:
        self.weight = torch.randn(48, 3, generator=torch.Generator().manual_seed(5))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # [F, H, W, 3] -> [1, 48, F', h, w]
        pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 16)  # [F, 3, h, w]
        latent = torch.einsum("oc,fchw->ofhw", self.weight, pooled)[None]
        return latent[:, :, :1] if pixels.shape[0] == 1 else latent

    def decode(self, latent: torch.Tensor) -> torch.Tensor:  # [B, 48, T, h, w] -> [B, 4(T - 1) + 1, 16h, 16w, 3]
        rgb = torch.sigmoid(torch.einsum("oc,bothw->bcthw", self.weight, latent))
        rgb = rgb.repeat_interleave(4, dim=2)[:, :, 3:].repeat_interleave(16, dim=3).repeat_interleave(16, dim=4)
        return rgb.movedim(1, -1)


def tiny_umt5_clip(width: int = 32, rows: int = 256384):
    """A real comfy.sd.CLIP around the real UMT5 tokenizer class with a small sentencepiece model (40 pieces,
    so `<cls>` is id 340), and a 1-layer UMT5 encoder: by default with UMT5-XXL's 256,384-row embedding table
    of narrow rows; with width 4096 (Wan's text width) and a few hundred rows to feed a Wan model."""
    import sentencepiece

    corpus = ["a toy robot walks through a snowy forest", "a plush dog jumps on a trampoline",
              "cinematic lighting, a red backpack on a table", "the cat sleeps < > cls in the sun"] * 50
    model_bytes = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model_bytes, vocab_size=40,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             hard_vocab_limit=False, minloglevel=2)
    config = json.loads((COMFYUI_ROOT / "comfy/text_encoders/umt5_config_xxl.json").read_text())
    config.update(d_model=width, vocab_size=rows, d_ff=64, d_kv=8, num_heads=4, num_layers=1, num_decoder_layers=1)

    class TinyUMT5(comfy.text_encoders.wan.UMT5XXlModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=config, dtype=dtype,
                special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5, enable_attention_masks=True,
                zero_out_masked=True, model_options=model_options)

    class Target:
        params = {}
        clip = comfy.text_encoders.wan.te()
        tokenizer = comfy.text_encoders.wan.WanT5Tokenizer

    clip = comfy.sd.CLIP(Target, tokenizer_data={"spiece_model": model_bytes.getvalue()},
                         model_options={"umt5xxl_class": TinyUMT5})
    encoder = clip.cond_stage_model.umt5xxl.transformer
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())) * 0.1)
    return clip, model_bytes.getvalue()
