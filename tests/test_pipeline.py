"""Sampling: determinism, guidance branches, schedulers, callbacks/cancel, decoding, model-folder errors."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from sdvgen_core.errors import GenerationCancelled, ModelLoadError, NonFiniteError, SDVGenError
from sdvgen_core.pipeline import MemoryMode, SDVGenPipeline, non_finite_hint

from conftest import draw_subject

SMALL = {"height": 48, "width": 64, "num_frames": 5, "num_inference_steps": 3}
PROMPT = "a <cls> dog runs on the beach"


def run(pipe, seed=0, **kwargs):
    settings = {**SMALL, **kwargs}
    settings.setdefault("reference_image", draw_subject())
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **settings)


def count_transformer_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    return calls, handle


def test_same_seed_same_video(tiny_pipe):
    first, second = run(tiny_pipe, seed=5), run(tiny_pipe, seed=5)
    assert first.frames.shape == (1, 5, 3, 48, 64)
    torch.testing.assert_close(first.frames, second.frames, rtol=0, atol=0)
    other = run(tiny_pipe, seed=6)
    assert (first.frames - other.frames).abs().max() > 1e-3


def test_reference_changes_the_video(tiny_pipe):
    red = run(tiny_pipe, reference_image=draw_subject(color=(250, 0, 0), background=(0, 0, 0)))
    green = run(tiny_pipe, reference_image=draw_subject(color=(0, 250, 0), background=(255, 255, 255)))
    text_only = run(tiny_pipe, reference_image=None)
    assert (red.latents - green.latents).abs().max() > 1e-3
    assert (red.latents - text_only.latents).abs().max() > 1e-3


def test_cfg_batches_reference_in_both_halves_and_reference_guidance_adds_a_branch(tiny_pipe):
    calls, handle = count_transformer_calls(tiny_pipe)
    try:
        base = run(tiny_pipe, output_type="latent")
        assert calls == [2] * SMALL["num_inference_steps"]  # one batched pass: [uncond ; cond], both with the reference
        calls.clear()
        guided = run(tiny_pipe, output_type="latent", reference_guidance_scale=2.0)
        assert calls == [2, 1] * SMALL["num_inference_steps"]  # plus the branch without the reference
        calls.clear()
        no_cfg = run(tiny_pipe, output_type="latent", guidance_scale=1.0)
        assert calls == [1] * SMALL["num_inference_steps"]
    finally:
        handle.remove()
    assert base.frames is None
    assert (base.latents - guided.latents).abs().max() > 1e-4
    assert (base.latents - no_cfg.latents).abs().max() > 1e-4


def test_reference_guidance_formula(tiny_pipe, monkeypatch):
    """With a stub transformer the guided velocity must follow the documented formula exactly."""
    values = {}

    def fake_forward(hidden_states, encoder_hidden_states, timestep, reference_latents=None, return_dict=False, **_):
        if reference_latents is None:
            out = torch.full_like(hidden_states, 0.5)  # v(text, no reference)
        else:
            out = torch.cat([torch.full_like(hidden_states[:1], 1.0), torch.full_like(hidden_states[1:], 3.0)])
        return (out,)

    class Recorder:
        def __init__(self, scheduler):
            self.scheduler = scheduler

        def __getattr__(self, name):
            return getattr(self.scheduler, name)

        def step(self, model_output, *args, **kwargs):
            values.setdefault("velocity", model_output.clone())
            return self.scheduler.step(model_output, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.transformer, "forward", fake_forward)
    monkeypatch.setattr(tiny_pipe, "scheduler", Recorder(tiny_pipe.scheduler))
    run(tiny_pipe, output_type="latent", guidance_scale=6.0, reference_guidance_scale=2.0)
    # v = 1 + 6 (3 - 1) + 2 (3 - 0.5)
    torch.testing.assert_close(values["velocity"], torch.full_like(values["velocity"], 1 + 6 * 2 + 2 * 2.5))


def test_dynamic_cfg_and_dpm(tiny_pipe):
    static = run(tiny_pipe, output_type="latent", num_inference_steps=4)
    dynamic = run(tiny_pipe, output_type="latent", num_inference_steps=4, use_dynamic_cfg=True)
    assert (static.latents - dynamic.latents).abs().max() > 1e-4
    tiny_pipe.set_scheduler("dpm")
    try:
        dpm = run(tiny_pipe, output_type="latent", num_inference_steps=4)
        dpm_again = run(tiny_pipe, output_type="latent", num_inference_steps=4)
    finally:
        tiny_pipe.set_scheduler("ddim")
    torch.testing.assert_close(dpm.latents, dpm_again.latents, rtol=0, atol=0)
    assert (dpm.latents - static.latents).abs().max() > 1e-4
    with pytest.raises(SDVGenError, match="scheduler 'euler'"):
        tiny_pipe.set_scheduler("euler")


def test_callback_sees_every_step_and_can_cancel(tiny_pipe):
    seen = []
    run(tiny_pipe, output_type="latent", callback=seen.append)
    assert [s.step for s in seen] == [0, 1, 2] and all(s.total_steps == 3 for s in seen)
    assert seen[0].denoised.shape == seen[0].latents.shape == (1, 2, 16, 6, 8)
    assert seen[0].timestep > seen[-1].timestep

    def cancel_at_second_step(info):
        seen.append(info.step)
        if info.step == 1:
            raise GenerationCancelled("stop")

    seen.clear()
    with pytest.raises(GenerationCancelled):
        run(tiny_pipe, callback=cancel_at_second_step)
    assert seen == [0, 1]


def test_decode_plain_and_tiled(tiny_pipe):
    latents = run(tiny_pipe, output_type="latent", height=128, width=160).latents
    plain = tiny_pipe.decode(latents)
    tiled = tiny_pipe.decode(latents, tiled=True, tile_sample_min_height=64, tile_sample_min_width=64,
                             tile_overlap_factor=0.25)
    assert tiny_pipe.vae.use_tiling
    tiny_pipe.decode(latents)
    assert not tiny_pipe.vae.use_tiling
    assert plain.shape == tiled.shape == (1, 5, 3, 128, 160)
    assert 0 <= tiled.min() and tiled.max() <= 1
    assert (plain - tiled).abs().mean() < 0.1  # same picture, up to seams


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 6}, "must be 4k\\+1"),
        ({"num_frames": 53}, "num_frames=53 is out of range; expected 1 to 49"),
        ({"height": 50}, "height=50 must be a multiple of 16"),
        ({"num_inference_steps": 0}, "num_inference_steps=0 is out of range"),
        ({"num_inference_steps": 1001}, "num_inference_steps=1001 is out of range; expected 1 to 1000"),
        ({"height": 0}, "height=0 is out of range"),
        ({"width": -16}, "width=-16 is out of range"),
        ({"width": 1456}, "width=1456 is out of range; expected 16 to 1440"),
        ({"num_frames": 0}, "num_frames=0 is out of range"),
        ({"num_frames": 5.5}, "num_frames must be a whole number"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1 is out of range"),
        ({"reference_guidance_scale": float("inf")}, "reference_guidance_scale must be a finite number"),
        ({"reference_guidance_scale": -0.5}, "reference_guidance_scale=-0.5 is out of range"),
        ({"eta": float("nan")}, "eta must be a finite number"),
        ({"output_type": "pil"}, "output_type 'pil'"),
        ({"reference_image": None, "reference_latents": torch.zeros(1, 1, 16, 4, 4)}, "reference_latents have shape"),
        ({"reference_image": None, "reference_latents": torch.full((1, 1, 16, 6, 8), float("nan"))},
         "reference_latents \\(given by the caller\\) contain NaN"),
        ({"reference_image": draw_subject(mode="RGBA"), "subject_mask": torch.full((1, 1, 150, 200), float("nan"))},
         "subject mask has NaN"),
        ({"reference_image": None, "reference_guidance_scale": 1.0}, "needs a reference image"),
    ],
)
def test_bad_generation_arguments(tiny_pipe, kwargs, message):
    calls, handle = count_transformer_calls(tiny_pipe)
    try:
        with pytest.raises(SDVGenError, match=message):
            run(tiny_pipe, **kwargs)
    finally:
        handle.remove()
    assert calls == []  # refused before any model pass


def test_nan_prompt_embeds_are_refused(tiny_pipe):
    embeds = torch.zeros(1, 226, 32)
    embeds[0, 3, 4] = float("inf")
    with pytest.raises(NonFiniteError, match="prompt_embeds \\(given by the caller\\)"):
        tiny_pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros(1, 226, 32), **SMALL)


def test_non_finite_latents_stop_sampling_at_that_step(tiny_pipe, monkeypatch):
    """A model pass that overflows at step 2 stops the run there, naming the step and the likely cause."""
    forward = tiny_pipe.transformer.forward
    calls = []

    def overflow_on_second_step(*args, **kwargs):
        calls.append(1)
        output = forward(*args, **kwargs)
        if len(calls) == 2:
            output[0][0, 0, 0, 0, 0] = float("inf")
        return output

    monkeypatch.setattr(tiny_pipe.transformer, "forward", overflow_on_second_step)
    with pytest.raises(NonFiniteError, match="latents after sampling step 2 of 3 contain NaN.*far outside its usual range"):
        run(tiny_pipe, guidance_scale=1.0, output_type="latent")
    assert len(calls) == 2  # stopped at once, not after the remaining step
    assert "try precision bf16 or fp32" in non_finite_hint(torch.float16)


def test_decode_refuses_non_finite_latents_and_frames(tiny_pipe, monkeypatch):
    latents = torch.zeros(1, 2, 16, 6, 8)
    latents[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="latents to decode contain NaN"):
        tiny_pipe.decode(latents)
    monkeypatch.setattr(tiny_pipe, "decode_latents", lambda latents: torch.full((1, 3, 5, 48, 64), float("nan")))
    with pytest.raises(NonFiniteError, match="decoded frames contain NaN"):
        tiny_pipe.decode(torch.zeros(1, 2, 16, 6, 8))


@pytest.mark.parametrize("kwargs, message", [
    ({"tile_sample_min_height": 0}, "tile_sample_min_height=0 is out of range"),
    ({"tile_sample_min_width": 63}, "tile_sample_min_width=63 is out of range"),
    ({"tile_overlap_factor": float("nan")}, "tile_overlap_factor must be a finite number"),
    ({"tile_overlap_factor": 1.0}, "tile_overlap_factor=1 is out of range"),
])
def test_bad_tile_settings(tiny_pipe, kwargs, message):
    with pytest.raises(SDVGenError, match=message):
        tiny_pipe.decode(torch.zeros(1, 2, 16, 6, 8), tiled=True, **kwargs)


@pytest.mark.parametrize(
    "mode, method", [("model_offload", "enable_model_cpu_offload"), ("sequential_offload", "enable_sequential_cpu_offload")]
)
def test_offload_modes_use_diffusers_hooks_on_an_accelerator(tiny_model_dir, monkeypatch, mode, method):
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32")
    calls = []
    monkeypatch.setattr(pipe, method, lambda device: calls.append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a two-GPU machine, as far as the check sees
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    pipe.set_memory_mode(mode, "cuda:1")
    assert calls == [torch.device("cuda:1")] and pipe.memory_mode is MemoryMode(mode)


@torch.no_grad()
def test_set_lora_under_offload_restores_weights_and_reapplies_the_mode(tiny_model_dir, tmp_path, monkeypatch):
    """Sequential offload parks weights on the meta device; a LoRA change must take the hooks off first."""
    from accelerate import cpu_offload

    from tiny_lora import write_tiny_lora

    lora = write_tiny_lora(tiny_model_dir, tmp_path / "lora.safetensors")
    expected = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=lora, lora_strength=0.5)
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32")
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    assert next(pipe.transformer.parameters()).device.type == "meta"
    pipe.memory_mode, pipe.memory_device = MemoryMode.SEQUENTIAL_OFFLOAD, torch.device("cpu")
    reapplied = []
    monkeypatch.setattr(pipe, "_place", lambda mode, device: reapplied.append((mode, device)))

    pipe.set_lora(lora, strength=0.5)
    assert reapplied == [(MemoryMode.SEQUENTIAL_OFFLOAD, torch.device("cpu"))]
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())
    video, text = torch.randn(1, 2, 16, 6, 8), torch.randn(1, 226, 32)
    reference, t = torch.randn(1, 1, 16, 6, 8), torch.tensor([400])
    torch.testing.assert_close(pipe.transformer(video, text, t, reference_latents=reference).sample,
                               expected.transformer(video, text, t, reference_latents=reference).sample)
    pipe.set_lora(None)
    assert pipe.lora_info is None and "sdvgen" not in getattr(pipe.transformer, "peft_config", {})


def test_sliced_decode_equals_plain(tiny_pipe):
    latents = torch.cat([run(tiny_pipe, output_type="latent", seed=s).latents for s in (1, 2)])
    plain = tiny_pipe.decode(latents)
    sliced = tiny_pipe.decode(latents, sliced=True)
    assert tiny_pipe.vae.use_slicing
    torch.testing.assert_close(sliced, plain, rtol=1e-4, atol=1e-5)
    tiny_pipe.decode(latents[:1])
    assert not tiny_pipe.vae.use_slicing


def test_offload_modes_fall_back_on_cpu(tiny_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        tiny_pipe.set_memory_mode(MemoryMode.MODEL_OFFLOAD, "cpu")
    assert tiny_pipe.memory_mode is MemoryMode.ON_DEVICE
    assert "needs an accelerator" in caplog.text
    with pytest.raises(ValueError):
        tiny_pipe.set_memory_mode("vram_magic", "cpu")


def test_model_folder_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        SDVGenPipeline.from_model_dir(tmp_path / "missing")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelLoadError, match=r"lacks the subfolder\(s\) \['vae'\]"):
        SDVGenPipeline.from_model_dir(partial)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = pickled / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="only pickle files"):
        SDVGenPipeline.from_model_dir(pickled)
    with pytest.raises(SDVGenError, match="precision 'fp8'"):
        SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp8")


def test_2b_style_model_is_rejected(tiny_model_dir, tmp_path):
    folder = tmp_path / "sincos"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["use_rotary_positional_embeddings"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="CogVideoX-2B"):
        SDVGenPipeline.from_model_dir(folder)


def test_bf16_pipeline_runs(tiny_model_dir):
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="bf16")
    out = run(pipe, num_inference_steps=2)
    assert pipe.transformer.dtype == torch.bfloat16
    assert out.frames.shape == (1, 5, 3, 48, 64) and torch.isfinite(out.frames).all()


def transformer_output(pipe):
    generator = torch.Generator().manual_seed(3)
    video, text = torch.randn(1, 2, 16, 6, 8, generator=generator), torch.randn(1, 226, 32, generator=generator)
    reference, t = torch.randn(1, 1, 16, 6, 8, generator=generator), torch.tensor([400])
    with torch.no_grad():
        return pipe.transformer(video, text, t, reference_latents=reference).sample


@pytest.mark.parametrize("fuse", [False, True])
def test_failed_set_lora_keeps_the_previous_lora_applied_and_reported(tiny_model_dir, tmp_path, fuse):
    from safetensors.torch import load_file, save_file

    from tiny_lora import write_tiny_lora

    good = write_tiny_lora(tiny_model_dir, tmp_path / "good.safetensors")
    tensors = load_file(good)
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=good, lora_strength=0.5, fuse_lora=fuse)
    expected = transformer_output(pipe)
    for bad_call in (lambda: pipe.set_lora(tmp_path / "nan.safetensors"), lambda: pipe.set_lora(tmp_path / "none.safetensors"),
                     lambda: pipe.set_lora(good, strength=float("nan"))):
        with pytest.raises(SDVGenError):
            bad_call()
        assert pipe.lora_info is not None and pipe.lora_info.path == str(good)
        torch.testing.assert_close(transformer_output(pipe), expected, rtol=0, atol=0)


def test_same_path_replaced_on_disk_is_reloaded(tiny_model_dir, tmp_path):
    from tiny_lora import write_tiny_lora

    path = write_tiny_lora(tiny_model_dir, tmp_path / "lora.safetensors", seed=1)
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=path)
    first = transformer_output(pipe)
    pipe.set_lora(path, strength=1.0)  # unchanged file: no reload, same result
    torch.testing.assert_close(transformer_output(pipe), first, rtol=0, atol=0)
    write_tiny_lora(tiny_model_dir, tmp_path / "lora.safetensors", seed=2)  # replaced (atomic rename: new inode)
    pipe.set_lora(path, strength=1.0)
    expected = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=write_tiny_lora(
        tiny_model_dir, tmp_path / "copy.safetensors", seed=2))
    torch.testing.assert_close(transformer_output(pipe), transformer_output(expected))
    assert not torch.allclose(transformer_output(pipe), first)


@pytest.mark.parametrize("device, message", [
    ("banana", "device 'banana' is not a torch device"),
    ("cuda:7", "no cuda device is available|only \\d+ cuda device"),
])
def test_unknown_or_absent_device_is_refused(tiny_pipe, device, message):
    with pytest.raises(SDVGenError, match=message):
        tiny_pipe.set_memory_mode("on_device", device)
    with pytest.raises(SDVGenError, match="memory mode 'fast'"):
        tiny_pipe.set_memory_mode("fast", "cpu")


def test_image_errors_come_before_the_text_encoder_runs(tiny_pipe):
    calls = []
    handle = tiny_pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        for kwargs, message in (({"fit": "zoom"}, "fit mode 'zoom'"),
                                ({"reference_image": torch.full((3, 32, 32), float("nan"))}, "reference image has NaN")):
            with pytest.raises(SDVGenError, match=message):
                run(tiny_pipe, **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_from_model_dir_checks_settings_before_loading_weights(tiny_model_dir, tmp_path, monkeypatch):
    from sdvgen_core.transformer import SDVGenTransformer3DModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the settings were checked")

    monkeypatch.setattr(SDVGenTransformer3DModel, "from_pretrained", refuse)
    (tmp_path / "short.safetensors").write_bytes(b"\x00" * 4)
    for kwargs, message in (({"scheduler": "ddpm"}, "scheduler 'ddpm'"),
                            ({"lora_path": tmp_path / "none.safetensors"}, "does not exist"),
                            ({"lora_path": tmp_path / "short.safetensors"}, "not a readable safetensors"),
                            ({"lora_path": tmp_path / "short.safetensors", "lora_strength": float("nan")}, "lora_strength")):
        with pytest.raises(SDVGenError, match=message):
            SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", **kwargs)
