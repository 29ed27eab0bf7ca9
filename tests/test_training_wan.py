"""The fine-tuner on a tiny Wan 2.2 TI2V model: flow-matching loss, identity/video steps, cache, export to ComfyUI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from sdvgen_core.backbones import get_backbone, load_pipeline
from sdvgen_core.evaluation.media import read_video
from sdvgen_core.lora import WAN_LORA_TARGET_MODULES
from sdvgen_core.wan_latents import normalize_latents
from training.__main__ import main as training_cli
from training.batches import IDENTITY, VIDEO, StepRules, TrainingCache, step_generator
from training.config import ConfigError, load_config
from training.data import DataError
from training.demo import make_demo_data
from training.families import FlowMatchingObjective, flow_matching_loss, resolve_backbone, shift_sigmas
from training.models import load_transformer, load_vae
from training.prepare import run_prepare
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_WAN_CONFIG = REPO / "training" / "configs" / "tiny_wan_cpu.yaml"


def wan_overrides(root: Path, run: str) -> list[str]:
    return [
        f"model.path={root / 'model'}",
        f"data.cache_dir={root / 'cache'}",
        f"data.identity.subjects200k=[{root / 'subjects200k'}]",
        f"data.identity.pairs_jsonl=[{root / 'pairs' / 'pairs.jsonl'}]",
        f"data.video.folders=[{root / 'videos'}]",
        f"train.output_dir={root / run}",
    ]


@pytest.fixture(scope="module")
def wan_demo(tmp_path_factory) -> Path:
    """Tiny Wan model + media (3 usable pairs' worth of identity items, 2 clips), prepared from the raw files."""
    root = make_demo_data(tmp_path_factory.mktemp("wan-demo"), subjects200k_rows=2, pairs=1, videos=2,
                          family="wan22")
    run_prepare(load_config(TINY_WAN_CONFIG, wan_overrides(root, "prepare")))
    return root


def wan_config(root: Path, run: str, *overrides: str):
    return load_config(TINY_WAN_CONFIG, [*wan_overrides(root, run), "data.holdout_identity=1", *overrides])


def test_prepare_caches_wan_latents_and_umt5_text(wan_demo):
    config = wan_config(wan_demo, "x")
    backbone = resolve_backbone(config)
    assert backbone.family == "wan22" and config.lora.target_modules == list(WAN_LORA_TARGET_MODULES)
    cache = TrainingCache(config)
    assert cache.meta["family"] == "wan22" and len(cache.meta["latents_std"]) == 48
    video = load_file(cache.video[0])
    # 9 frames -> 3 latent frames, 64x96 / 16 -> 4x6, 48 channels; UMT5 text padded to 512 tokens
    assert list(video["video.mean"].shape) == [3, 48, 4, 6] and list(video["frames.mean"].shape) == [9, 48, 4, 6]
    assert video["text"].shape[0] == 512

    # sampled latents are normalised exactly as the Wan pipeline normalises (per-channel mean/std of the VAE)
    vae = load_vae(config.model.path, "fp32", backbone)
    generator = torch.Generator().manual_seed(0)
    sampled = cache.latents.sample(video, "video", generator)
    eps = torch.randn(video["video.mean"].shape, generator=torch.Generator().manual_seed(0))
    raw = (video["video.mean"] + video["video.std"] * eps).permute(1, 0, 2, 3)[None]
    expected = normalize_latents(vae, raw)[0].permute(1, 0, 2, 3)
    torch.testing.assert_close(sampled, expected)


def test_shift_is_the_flow_match_euler_schedulers():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    grid = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000  # the unshifted training sigmas
    torch.testing.assert_close(shift_sigmas(grid, 5.0), scheduler.sigmas[:1000].float())


def test_flow_matching_loss_equals_a_direct_computation(wan_demo):
    config = wan_config(wan_demo, "x")
    backbone = resolve_backbone(config)
    model = load_transformer(config.model.path, "fp32", backbone)
    cache = TrainingCache(config, backbone)
    batch = cache.load(VIDEO, [cache.video[0]] * 2, torch.Generator().manual_seed(1), StepRules.from_config(config))
    objective = FlowMatchingObjective(5.0, "none", "b c t h w", (1, 2, 2), "clean")

    generator = torch.Generator().manual_seed(7)
    loss = objective.loss(model, batch, generator)

    replay = torch.Generator().manual_seed(7)  # the same draws: noise, then u
    noise = torch.randn(batch.latents.shape, generator=replay)
    u = torch.rand(2, generator=replay)
    sigma = 5.0 * u / (1 + 4.0 * u)
    x0, eps = batch.latents.permute(0, 2, 1, 3, 4), noise.permute(0, 2, 1, 3, 4)  # [B, C, T, h, w]
    s = sigma.view(2, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * eps
    tokens = 3 * 2 * 3
    with torch.no_grad():
        predicted = model(noisy, (sigma * 1000)[:, None].expand(2, tokens), batch.text,
                          reference_latents=batch.reference.permute(0, 2, 1, 3, 4),
                          reference_keep_indices=batch.keep_indices, reference_timestep="clean").sample
    expected = ((predicted - (eps - x0)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    # a fixed monitor timestep index i is sigma shift((i + 1) / 1000)
    fixed = objective.loss(model, batch, torch.Generator().manual_seed(3), torch.tensor([999, 499]))
    direct = flow_matching_loss(model, batch, torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(3)),
                                shift_sigmas(torch.tensor([1.0, 0.5]), 5.0), "b c t h w", (1, 2, 2), "clean")
    torch.testing.assert_close(fixed, direct)


class Spy(torch.nn.Module):
    """Records what the objective feeds the transformer and answers with a zero velocity."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return (torch.zeros_like(kwargs["hidden_states"]),)


def test_identity_step_feeds_one_target_frame_after_the_reference(wan_demo):
    config = wan_config(wan_demo, "x")
    cache = TrainingCache(config)
    rules = StepRules.from_config(config)
    generator = step_generator(0, 0, "sample", 0)
    identity = cache.load(IDENTITY, cache.identity[:2], generator, rules)
    video = cache.load(VIDEO, cache.video[:1], generator, rules)
    spy = Spy()
    objective = FlowMatchingObjective(5.0, "none", "b c t h w", (1, 2, 2), "video")
    objective.loss(spy, identity, torch.Generator().manual_seed(0))
    objective.loss(spy, video, torch.Generator().manual_seed(0))
    first, second = spy.calls
    # identity: the target is ONE latent frame (T=1); the reference, one frame too, goes in front (RoPE frame 0)
    assert tuple(first["hidden_states"].shape) == (2, 48, 1, 4, 6)
    assert tuple(first["reference_latents"].shape) == (2, 48, 1, 4, 6)
    assert tuple(first["timestep"].shape) == (2, 1 * 2 * 3) and first["reference_timestep"] == "video"
    assert first["encoder_hidden_states"].shape[:2] == (2, 512)
    # video: 3 latent frames, a reference frame from the clip's per-frame latents, one timestep per video token
    assert tuple(second["hidden_states"].shape) == (1, 48, 3, 4, 6)
    assert tuple(second["reference_latents"].shape) == (1, 48, 1, 4, 6)
    assert tuple(second["timestep"].shape) == (1, 3 * 2 * 3)
    timestep = first["timestep"]
    assert torch.all(timestep == timestep[:, :1]) and torch.all((timestep > 0) & (timestep <= 1000))

    # view drop: the identity micro-batch trains text-to-image on its one target frame, without reference tokens
    dropped = TrainingCache(wan_config(wan_demo, "x", "task.p_view_drop=1"))
    batch = dropped.load(IDENTITY, dropped.identity[:2], generator, StepRules.from_config(dropped.config))
    objective.loss(spy, batch, torch.Generator().manual_seed(0))
    assert spy.calls[-1]["reference_latents"] is None and tuple(spy.calls[-1]["hidden_states"].shape) == (2, 48, 1, 4, 6)


def test_prepare_train_export_and_load_in_the_wan_pipeline(wan_demo, tmp_path, subject_image):
    root = wan_demo
    reference = tmp_path / "reference.png"
    subject_image.save(reference)
    args = ["--config", str(TINY_WAN_CONFIG)]
    for override in [*wan_overrides(root, "e2e"), "data.holdout_identity=1", "train.max_steps=3",
                     "train.checkpoint_every=0", "monitor.every=2", "monitor.pcgrad=true", "monitor.pcgrad_buffer=2",
                     "task.task_draw=global", "task.p_video=0.5", "train.seed=44", "validation.every=3",
                     f"validation.references=[{reference}]", "validation.prompts=[<cls> a mug]",
                     "validation.num_frames=5", "validation.num_inference_steps=2"]:
        args += ["--set", override]
    assert training_cli(["train", *args]) == 0
    run = root / "e2e"
    with (run / "grad_monitor.csv").open() as handle:  # monitor and PCGrad act on the Wan LoRA parameters
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    assert all(math.isfinite(float(r["cosine"])) and float(r["norm_video"]) > 0 for r in rows)
    assert (run / "sdvgen_lora_comfyui.safetensors").is_file()
    video = run / "validation" / "step-000003-ref0.mp4"  # sampled through the Wan pipeline
    frames, _ = read_video(video)
    assert frames.shape[:3] == (5, 64, 96)

    output = tmp_path / "wan_lora.safetensors"
    assert training_cli(["export", *args, "-o", str(output), "--dtype", "fp32"]) == 0
    with safe_open(str(output), "pt") as handle:
        assert handle.metadata()["sdvgen.family"] == "wan22"
        assert all(key.startswith("transformer.blocks.") or key.startswith("transformer.condition_embedder.")
                   or key.startswith("transformer.patch_embedding.") for key in handle.keys())
    native = tmp_path / "wan_lora_comfyui.safetensors"
    with safe_open(str(native), "pt") as handle:
        keys = list(handle.keys())
        assert keys and all(key.startswith("diffusion_model.") for key in keys)
        assert handle.metadata()["sdvgen.key_layout"] == "wan-native"
    assert training_cli(["export", *args, "-o", str(output)]) == 2  # never overwritten without --overwrite

    kwargs = dict(prompt="<cls> a mug", reference_image=subject_image, height=64, width=96, num_frames=5,
                  num_inference_steps=2, output_type="latent")
    plain = load_pipeline(root / "model", dtype="fp32")
    with_lora = load_pipeline(root / "model", dtype="fp32", lora_path=output)
    a = plain(**kwargs, generator=torch.Generator().manual_seed(0)).latents
    b = with_lora(**kwargs, generator=torch.Generator().manual_seed(0)).latents
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_cache_of_the_other_family_is_refused(wan_demo, tiny_model_dir, tmp_path):
    config = wan_config(wan_demo, "x", f"model.path={tiny_model_dir}", "data.height=64", "data.width=96")
    with pytest.raises(DataError, match=r"prepared for the wan22 backbone.*CogVideoX-5B"):
        TrainingCache(config)
    with pytest.raises(DataError, match="prepared for the wan22 backbone"):
        run_prepare(config)


def test_wrong_model_family_is_a_clear_error(wan_demo, capsys):
    config = wan_config(wan_demo, "wrong", "model.family=cogvideox")
    with pytest.raises(ConfigError, match=r"model.family=cogvideox but .*Wan2.2-TI2V-5B model \(wan22\)"):
        Trainer(config)
    args = ["--config", str(TINY_WAN_CONFIG), *(a for o in wan_overrides(wan_demo, "wrong") for a in ("--set", o))]
    assert training_cli(["train", *args, "--set", "model.family=cogvideox"]) == 2
    assert "model.family=auto" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="multiples of 32"):
        resolve_backbone(wan_config(wan_demo, "x", "data.height=48"))
    assert get_backbone("wan22").vae_class.__name__ == "AutoencoderKLWan"


def test_demo_data_keeps_a_model_of_the_other_family(wan_demo, tmp_path):
    import shutil

    shutil.copytree(wan_demo / "model", tmp_path / "model")
    with pytest.raises(ConfigError, match="already holds a tiny wan22 model, not cogvideox"):
        make_demo_data(tmp_path, family="cogvideox")
    assert not (tmp_path / "videos").exists()
