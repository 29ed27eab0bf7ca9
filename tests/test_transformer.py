"""Reference-token transformer against stock diffusers CogVideoX (spec: sequence layout, positions, modulation)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

from sdvgen_core.errors import ModelLoadError, SDVGenError
from sdvgen_core.transformer import SDVGenTransformer3DModel

# Not 720x480: 80x48 pixels -> 10x6 latents -> 5x3 tokens per frame.
HEIGHT, WIDTH, LATENT_FRAMES = 48, 80, 3


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    ours = SDVGenTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    stock = CogVideoXTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    return ours, stock


def stock_rope(stock, num_frames, height=HEIGHT, width=WIDTH):
    """RoPE exactly as the stock CogVideoXPipeline builds it (pixel height/width, latent frames)."""
    fake_pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=stock)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, height, width, num_frames, "cpu")


def inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, LATENT_FRAMES, 16, HEIGHT // 8, WIDTH // 8, generator=g)
    reference = torch.randn(batch, 1, 16, HEIGHT // 8, WIDTH // 8, generator=g)
    text = torch.randn(batch, 226, 32, generator=g)
    timestep = torch.full((batch,), 700)
    return video, reference, text, timestep


@torch.no_grad()
def test_without_reference_equals_stock(models):
    ours, stock = models
    video, _, text, t = inputs(batch=2)
    expected = stock(video, text, t, image_rotary_emb=stock_rope(stock, LATENT_FRAMES)).sample
    got = ours(video, text, t).sample
    assert got.shape == video.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@torch.no_grad()
def test_reference_equals_stock_with_reference_as_frame_zero(models):
    """Independent computation of the spec: stock diffusers on [reference ; video] as T+1 frames with RoPE for
    T+1 frames (reference = frame 0, video = frames 1..T); every op after the blocks is per token, so dropping the
    reference frame from the stock output must give our output exactly. This also pins the modulation: stock puts
    frame-0 tokens in the video stream, with the video shift/scale/gate and the joint feed-forward."""
    ours, stock = models
    video, reference, text, t = inputs(batch=2)
    joint = torch.cat([reference, video], dim=1)
    expected = stock(joint, text, t, image_rotary_emb=stock_rope(stock, LATENT_FRAMES + 1)).sample[:, 1:]
    got = ours(video, text, t, reference_latents=reference).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reference_rotation_is_frame_zero_and_video_is_shifted(models):
    ours, stock = models
    tokens_per_frame = (HEIGHT // 16) * (WIDTH // 16)
    cos, sin = ours.reference_rotary_embeddings(LATENT_FRAMES, HEIGHT // 8, WIDTH // 8, "cpu")
    cos_t1, sin_t1 = stock_rope(stock, LATENT_FRAMES + 1)
    assert cos.shape == ((LATENT_FRAMES + 1) * tokens_per_frame, 16)
    torch.testing.assert_close(cos, cos_t1)
    torch.testing.assert_close(sin, sin_t1)
    # the reference slice equals a one-frame RoPE (frame 0) ...
    cos_one, sin_one = stock_rope(stock, 1)
    torch.testing.assert_close(cos[:tokens_per_frame], cos_one)
    torch.testing.assert_close(sin[:tokens_per_frame], sin_one)
    # ... and the video slice is the plain T2V RoPE shifted by one frame, not the T2V RoPE itself
    cos_t, _ = stock_rope(stock, LATENT_FRAMES)
    assert not torch.allclose(cos[tokens_per_frame:], cos_t)
    torch.testing.assert_close(cos[tokens_per_frame:], cos_t1[tokens_per_frame:])


@torch.no_grad()
def test_reference_changes_output_and_is_deterministic(models):
    ours, _ = models
    video, reference, text, t = inputs()
    other = torch.randn_like(reference)
    first = ours(video, text, t, reference_latents=reference).sample
    again = ours(video, text, t, reference_latents=reference).sample
    different = ours(video, text, t, reference_latents=other).sample
    plain = ours(video, text, t).sample
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - different).abs().max() > 1e-3
    assert (first - plain).abs().max() > 1e-3


@torch.no_grad()
def test_reference_token_drop(models):
    ours, _ = models
    video, reference, text, t = inputs()
    tokens_per_frame = (HEIGHT // 16) * (WIDTH // 16)
    full = ours(video, text, t, reference_latents=reference).sample
    keep_all = ours(video, text, t, reference_latents=reference, reference_keep_indices=torch.arange(tokens_per_frame))
    torch.testing.assert_close(keep_all.sample, full)

    seen = {}
    hook = ours.transformer_blocks[0].register_forward_hook(
        lambda module, args, kwargs, output: seen.update(n=kwargs["hidden_states"].shape[1],
                                                         rope=kwargs["image_rotary_emb"][0]),
        with_kwargs=True,
    )
    keep = torch.tensor([0, 3, 7])
    try:
        dropped = ours(video, text, t, reference_latents=reference, reference_keep_indices=keep).sample
    finally:
        hook.remove()
    assert seen["n"] == 3 + LATENT_FRAMES * tokens_per_frame
    cos_t1, _ = ours.rotary_embeddings(LATENT_FRAMES + 1, HEIGHT // 8, WIDTH // 8, "cpu")
    torch.testing.assert_close(seen["rope"][:3], cos_t1[keep])
    torch.testing.assert_close(seen["rope"][3:], cos_t1[tokens_per_frame:])
    assert dropped.shape == full.shape and (dropped - full).abs().max() > 1e-4


def test_gradients_flow_with_checkpointing(models):
    ours, _ = models
    video, reference, text, t = inputs()
    ours.enable_gradient_checkpointing()
    try:
        ours.train()
        out = ours(video, text, t, reference_latents=reference).sample
        out.square().mean().backward()
        assert ours.patch_embed.proj.weight.grad is not None
        assert ours.patch_embed.proj.weight.grad.abs().sum() > 0
    finally:
        ours.disable_gradient_checkpointing()
        ours.eval()
        ours.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "reference_shape, message",
    [
        ((1, 1, 16, 4, 4), "must match the video latents"),
        ((1, 2, 16, HEIGHT // 8, WIDTH // 8), "one reference frame"),
        ((2, 1, 16, HEIGHT // 8, WIDTH // 8), "batch"),
        ((16, HEIGHT // 8, WIDTH // 8), r"\[B, R, C, h, w\]"),
    ],
)
def test_bad_reference_shapes(models, reference_shape, message):
    ours, _ = models
    video, _, text, t = inputs()
    with pytest.raises(SDVGenError, match=message):
        ours(video, text, t, reference_latents=torch.zeros(reference_shape))


def test_sincos_model_is_rejected():
    model = SDVGenTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, time_embed_dim=32, num_layers=1,
        use_rotary_positional_embeddings=False,
    )
    with pytest.raises(ModelLoadError, match="CogVideoX-2B"):
        model.check_supported()
