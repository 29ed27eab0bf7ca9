"""Wan 2.2 TI2V backbone: reference-frame transformer vs stock diffusers, pipeline, `<cls>`, LoRA, CLI, backbones."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from sdvgen_core.backbones import detect_family, get_backbone, load_pipeline
from sdvgen_core.cli import main
from sdvgen_core.errors import GenerationCancelled, LoraLoadError, ModelLoadError, SDVGenError
from sdvgen_core.lora import WAN_LORA_TARGET_MODULES, read_lora_file
from sdvgen_core.pipeline import MemoryMode, SDVGenPipeline
from sdvgen_core.presets import write_t5_tokenizer
from sdvgen_core.prompts import CLS_TOKEN
from sdvgen_core.wan_latents import denormalize_latents, encode_reference, normalize_latents
from sdvgen_core.wan_pipeline import SDVGenWanPipeline
from sdvgen_core.wan_presets import TinyWanConfig, build_tiny_wan_model
from sdvgen_core.wan_transformer import SDVGenWanTransformer3DModel

from tiny_lora import write_random_lora, write_tiny_lora

SIZE = {"height": 64, "width": 96, "num_frames": 5}  # 2 latent frames of 4 x 6, 6 tokens per frame
TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48, out_channels=48,
    text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
)


@pytest.fixture(scope="module")
def wan_model_dir(tmp_path_factory) -> Path:
    return build_tiny_wan_model(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="module")
def wan_pipe(wan_model_dir) -> SDVGenWanPipeline:
    return SDVGenWanPipeline.from_model_dir(wan_model_dir, dtype="fp32")


@pytest.fixture(scope="module")
def transformers() -> tuple[WanTransformer3DModel, SDVGenWanTransformer3DModel]:
    torch.manual_seed(0)
    stock = WanTransformer3DModel(**TRANSFORMER_CONFIG).eval()
    ours = SDVGenWanTransformer3DModel(**TRANSFORMER_CONFIG).eval()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def _inputs(batch=2, frames=3):
    generator = torch.Generator().manual_seed(3)
    video = torch.randn(batch, 48, frames, 4, 6, generator=generator)
    reference = torch.randn(batch, 48, 1, 4, 6, generator=generator)
    text = torch.randn(batch, 7, 32, generator=generator)
    return video, reference, text, torch.tensor([700.0, 250.0][:batch])


@torch.no_grad()
def test_without_reference_equals_stock_bit_for_bit(transformers):
    stock, ours = transformers
    video, _, text, t = _inputs()
    per_token = t[:, None].expand(-1, 3 * 6)
    assert torch.equal(ours(video, t, text).sample, stock(video, t, text).sample)
    assert torch.equal(ours(video, per_token, text).sample, stock(video, per_token, text).sample)


@pytest.mark.parametrize("mode", ["clean", "video"])
@torch.no_grad()
def test_with_reference_equals_stock_on_concatenated_frames_minus_frame_0(transformers, mode):
    """The pinning test: [reference ; video] through stock Wan with matching per-token timesteps, frame 0 cut."""
    stock, ours = transformers
    video, reference, text, t = _inputs()
    per_token = t[:, None].expand(-1, 3 * 6)
    reference_t = torch.zeros(2, 6) if mode == "clean" else t[:, None].expand(-1, 6)
    expected = stock(torch.cat([reference, video], dim=2), torch.cat([reference_t, per_token], dim=1), text).sample
    got = ours(video, per_token, text, reference_latents=reference, reference_timestep=mode).sample
    assert got.shape == video.shape
    assert torch.equal(got, expected[:, :, 1:])
    # one timestep per sample (Wan 2.1-style call): `video` keeps it scalar, `clean` expands it per token
    scalar_expected = (
        stock(torch.cat([reference, video], dim=2), t, text).sample
        if mode == "video"
        else expected
    )
    got_scalar = ours(video, t, text, reference_latents=reference, reference_timestep=mode).sample
    assert torch.equal(got_scalar, scalar_expected[:, :, 1:])


@torch.no_grad()
def test_reference_changes_the_output_and_the_modes_differ(transformers):
    _, ours = transformers
    video, reference, text, t = _inputs()
    plain = ours(video, t, text).sample
    clean = ours(video, t, text, reference_latents=reference, reference_timestep="clean").sample
    same_t = ours(video, t, text, reference_latents=reference, reference_timestep="video").sample
    assert not torch.allclose(plain, clean) and not torch.allclose(clean, same_t)


def test_rope_positions_reference_is_frame_0(transformers):
    _, ours = transformers
    video, reference, _, _ = _inputs(frames=2)
    cos, sin = ours.reference_rotary_embeddings(torch.cat([reference, video], dim=2))
    stock_cos, _ = ours.rope(torch.zeros(1, 48, 3, 4, 6))  # frames 0, 1, 2 of a 3-frame clip
    assert torch.equal(cos, stock_cos) and cos.shape[1] == 3 * 6
    # the temporal slice of frame 0 is the rotation by angle 0 (cos 1, sin 0), the video starts at frame 1
    t_dim = ours.rope.t_dim
    assert torch.all(cos[0, :6, 0, :t_dim] == 1) and torch.all(sin[0, :6, 0, :t_dim] == 0)
    assert not torch.all(cos[0, 6:12, 0, :t_dim] == 1)
    keep = torch.tensor([0, 5])
    kept_cos, _ = ours.reference_rotary_embeddings(torch.cat([reference, video], dim=2), keep)
    assert torch.equal(kept_cos[:, :2], cos[:, keep]) and torch.equal(kept_cos[:, 2:], cos[:, 6:])


@torch.no_grad()
def test_reference_token_drop_equals_dropping_those_tokens(transformers):
    _, ours = transformers
    video, reference, text, t = _inputs()
    everything = ours(video, t, text, reference_latents=reference, reference_keep_indices=torch.arange(6)).sample
    assert torch.equal(everything, ours(video, t, text, reference_latents=reference).sample)
    dropped = ours(video, t, text, reference_latents=reference, reference_keep_indices=torch.tensor([1, 4])).sample
    assert dropped.shape == video.shape and not torch.allclose(dropped, everything)


def test_bad_reference_and_temporal_patch_are_clear_errors(transformers):
    _, ours = transformers
    video, reference, text, t = _inputs()
    with pytest.raises(SDVGenError, match=r"\[B, C, 1, h, w\]"):
        ours(video, t, text, reference_latents=reference[:, :, :, :2])
    with pytest.raises(SDVGenError, match="reference_timestep|not a valid"):
        ours(video, t, text, reference_latents=reference, reference_timestep="noisy")
    temporal = SDVGenWanTransformer3DModel(**{**TRANSFORMER_CONFIG, "patch_size": (2, 2, 2)})
    with pytest.raises(ModelLoadError, match="temporal patch size of 1"):
        temporal.check_supported()


def test_reference_encoding_is_the_wan_pipeline_normalisation(wan_pipe, subject_image):
    vae = wan_pipe.vae
    pixels = torch.rand(1, 3, 64, 96)
    latents = encode_reference(vae, pixels, generator=torch.Generator().manual_seed(0))
    raw = vae.encode((pixels * 2 - 1).unsqueeze(2)).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 48, 1, 1, 1)
    assert latents.shape == (1, 48, 1, 4, 6)
    torch.testing.assert_close(latents, (raw - mean) / std)
    torch.testing.assert_close(denormalize_latents(vae, normalize_latents(vae, raw)), raw)
    fitted = wan_pipe.encode_reference_image(subject_image, 64, 96, generator=torch.Generator().manual_seed(0))
    assert fitted.shape == (1, 48, 1, 4, 6)


def test_cls_uses_a_spare_umt5_row(wan_pipe, wan_model_dir):
    length = len(wan_pipe.tokenizer) - 1  # the tokenizer before <cls>
    assert wan_pipe.cls_info.token_id == length and wan_pipe.cls_info.row == "existing"
    assert wan_pipe.tokenizer.convert_tokens_to_ids(CLS_TOKEN) == length
    assert wan_pipe.text_encoder.get_input_embeddings().num_embeddings == length + 28
    ids = wan_pipe.tokenizer(f"a {CLS_TOKEN} dog").input_ids
    assert length in ids


def test_cls_adds_one_mean_row_to_a_full_umt5_table(tmp_path):
    length = write_t5_tokenizer(tmp_path / "probe", TinyWanConfig().spm_vocab_size)
    folder = build_tiny_wan_model(tmp_path / "model", TinyWanConfig(table_rows=length))
    from transformers import UMT5EncoderModel

    old_table = UMT5EncoderModel.from_pretrained(folder / "text_encoder").get_input_embeddings().weight
    pipe = SDVGenWanPipeline.from_model_dir(folder, dtype="fp32")
    table = pipe.text_encoder.get_input_embeddings().weight
    assert pipe.cls_info.token_id == length and pipe.cls_info.row == "added-mean"
    assert table.shape[0] == length + 1
    torch.testing.assert_close(table[length], old_table.mean(dim=0))
    torch.testing.assert_close(table[:length], old_table)


@torch.no_grad()
def test_pipeline_without_reference_equals_stock_wan_pipeline(wan_pipe):
    ours = wan_pipe("a <cls> dog runs", **SIZE, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                    output_type="latent").latents
    stock = WanPipeline(
        wan_pipe.tokenizer, wan_pipe.text_encoder, wan_pipe.vae, wan_pipe.scheduler, wan_pipe.transformer,
        expand_timesteps=True,
    )
    expected = stock("a <cls> dog runs", **SIZE, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                     output_type="latent").frames
    assert torch.equal(ours, expected)


def test_sampling_is_deterministic_with_a_seed_and_callbacks_see_every_step(wan_pipe, subject_image):
    seen = []
    run = lambda seed, **kw: wan_pipe(  # noqa: E731
        "a <cls> dog runs", reference_image=subject_image, **SIZE, num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed), output_type="latent", **kw,
    ).latents
    first = run(1, callback=seen.append)
    assert torch.equal(first, run(1)) and not torch.equal(first, run(2))
    assert [s.step for s in seen] == [0, 1, 2] and all(s.total_steps == 3 for s in seen)
    assert torch.equal(seen[-1].latents, first) and seen[0].denoised.shape == first.shape
    assert first.shape == (1, 48, 2, 4, 6)


def test_cancel_stops_sampling(wan_pipe, subject_image):
    steps = []

    def cancel(info):
        steps.append(info.step)
        raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        wan_pipe("a dog", reference_image=subject_image, **SIZE, num_inference_steps=4, callback=cancel)
    assert steps == [0]


def test_euler_and_decode_frame_count(wan_pipe, subject_image):
    wan_pipe.set_scheduler("euler")
    try:
        out = wan_pipe("a dog", reference_image=subject_image, **SIZE, num_inference_steps=2,
                       reference_guidance_scale=1.5, reference_timestep="video")
    finally:
        wan_pipe.set_scheduler("unipc")
    assert out.frames.shape == (1, 5, 3, 64, 96)
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 48}, "multiple of 32"),
        ({"num_frames": 6}, "4k\\+1"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"reference_timestep": "noisy"}, "reference_timestep"),
        ({"reference_guidance_scale": 2.0, "reference_image": None}, "needs a reference"),
    ],
)
def test_bad_generation_arguments(wan_pipe, subject_image, kwargs, message):
    arguments = {**SIZE, "num_inference_steps": 2, "reference_image": subject_image, **kwargs}
    with pytest.raises(SDVGenError, match=message):
        wan_pipe("a dog", **arguments)


def _write_wan_lora(model_dir, path) -> Path:
    transformer = SDVGenWanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    return write_random_lora(transformer, path, seed=7, alpha=8, target_modules=WAN_LORA_TARGET_MODULES)


def test_wan_lora_file_layout_and_equal_outputs_in_ours_and_diffusers(wan_model_dir, tmp_path, subject_image):
    path = _write_wan_lora(wan_model_dir, tmp_path / "wan_lora.safetensors")
    tensors, metadata = read_lora_file(path)
    assert metadata["sdvgen.family"] == "wan22"
    for key in (
        "transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.1.attn2.to_out.0.lora_B.weight",
        "transformer.blocks.0.ffn.net.0.proj.lora_A.weight", "transformer.blocks.0.ffn.net.2.lora_B.weight",
        "transformer.patch_embedding.lora_A.weight", "transformer.condition_embedder.text_embedder.linear_1.lora_A.weight",
    ):
        assert key in tensors, key

    ours = SDVGenWanPipeline.from_model_dir(wan_model_dir, dtype="fp32", lora_path=path)
    assert ours.lora_info.num_modules == len(tensors) // 2
    reference = ours.encode_reference_image(subject_image, 64, 96, generator=torch.Generator().manual_seed(0))
    kwargs = dict(**SIZE, num_inference_steps=2, output_type="latent", reference_latents=reference)
    with_ours = ours("a dog", generator=torch.Generator().manual_seed(0), **kwargs).latents

    other = SDVGenWanPipeline.from_model_dir(wan_model_dir, dtype="fp32")
    without = other("a dog", generator=torch.Generator().manual_seed(0), **kwargs).latents
    WanPipeline.load_lora_weights(other, str(path), adapter_name="diffusers")
    with_diffusers = other("a dog", generator=torch.Generator().manual_seed(0), **kwargs).latents
    assert not torch.allclose(with_ours, without, atol=1e-4)
    torch.testing.assert_close(with_diffusers, with_ours, rtol=1e-4, atol=1e-5)


def test_cross_family_lora_is_refused_naming_the_family(wan_model_dir, tiny_model_dir, tmp_path):
    cogvideox_lora = write_tiny_lora(tiny_model_dir, tmp_path / "cog.safetensors")
    with pytest.raises(LoraLoadError, match="cogvideox backbone.*wan22"):
        SDVGenWanPipeline.from_model_dir(wan_model_dir, dtype="fp32", lora_path=cogvideox_lora)
    wan_lora = _write_wan_lora(wan_model_dir, tmp_path / "wan.safetensors")
    with pytest.raises(LoraLoadError, match="wan22 backbone.*cogvideox"):
        SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=wan_lora)


def test_detect_family_and_backbones(wan_model_dir, tiny_model_dir, tmp_path):
    assert detect_family(wan_model_dir) == "wan22" and detect_family(tiny_model_dir) == "cogvideox"
    wan, cog = get_backbone("wan22"), get_backbone("cogvideox")
    assert (wan.training_objective, cog.training_objective) == ("flow_matching", "v_prediction")
    assert wan.pipeline_class is SDVGenWanPipeline and cog.pipeline_class is SDVGenPipeline
    assert (wan.defaults.guidance_scale, wan.defaults.fps, wan.defaults.size_multiple) == (5.0, 24, 32)
    assert isinstance(load_pipeline(tiny_model_dir, dtype="fp32"), SDVGenPipeline)
    with pytest.raises(SDVGenError, match="not available for Wan2.2"):
        load_pipeline(wan_model_dir, dtype="fp32", scheduler="ddim")
    with pytest.raises(ModelLoadError, match="does not exist"):
        detect_family(tmp_path / "nowhere")
    (tmp_path / "odd" / "transformer").mkdir(parents=True)
    (tmp_path / "odd" / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ModelLoadError, match="FluxTransformer2DModel"):
        detect_family(tmp_path / "odd")


def test_cli_tiny_model_then_generate_with_tiny_wan(tmp_path, subject_image, monkeypatch, capsys, caplog):
    """`tiny-model --family wan22` writes the folder `--preset tiny-wan` then uses from the cache."""
    monkeypatch.setenv("SDVGEN_CACHE", str(tmp_path / "cache"))
    assert main(["tiny-model", "--family", "wan22", str(tmp_path / "cache" / "tiny-wan-model-v1")]) == 0
    assert detect_family(tmp_path / "cache" / "tiny-wan-model-v1") == "wan22"
    subject_image.save(tmp_path / "ref.png")
    out = tmp_path / "wan.mp4"
    caplog.set_level("INFO", logger="sdvgen")
    code = main([
        "generate", "--preset", "tiny-wan", "--ref", str(tmp_path / "ref.png"), "--prompt", "a dog runs",
        "--subject", "dog", "--width", "96", "--height", "64", "--frames", "9", "--steps", "1", "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    assert "building" not in caplog.text and "96x64, 9 frames, 1 steps, cfg 5.0" in caplog.text
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 9
        assert stream.average_rate == 24 and (stream.width, stream.height) == (96, 64)

    capsys.readouterr()
    assert main(["generate", "--preset", "tiny-wan", "--ref", str(tmp_path / "ref.png"), "--prompt", "a dog",
                 "--dynamic-cfg"]) == 2
    assert "--dynamic-cfg is not available for Wan2.2-TI2V-5B" in capsys.readouterr().err


def test_comfyui_copy_has_native_wan_names_that_diffusers_maps_back(wan_model_dir, tmp_path):
    """ComfyUI 0.3.64 maps only native Wan names; diffusers' own native->diffusers converter checks our rename."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    from sdvgen_core.wan_lora import export_wan_lora_for_comfyui

    source = _write_wan_lora(wan_model_dir, tmp_path / "wan.safetensors")
    native_path = export_wan_lora_for_comfyui(source, tmp_path / "wan_comfyui.safetensors")
    ours, _ = read_lora_file(source)
    native, metadata = read_lora_file(native_path)
    assert metadata["sdvgen.family"] == "wan22" and metadata["sdvgen.key_layout"] == "wan-native"
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in native
    assert "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in native
    assert "diffusion_model.text_embedding.0.lora_A.weight" in native and len(native) == len(ours)
    # diffusers converts every native Wan name but the patch embedding (a native file with one is refused, which
    # is why the diffusers layout stays canonical); the rest must come back unchanged
    with pytest.raises(ValueError, match="patch_embedding"):
        _convert_non_diffusers_wan_lora_to_diffusers(dict(native))
    convertible = {k: v for k, v in native.items() if ".patch_embedding." not in k}
    back = _convert_non_diffusers_wan_lora_to_diffusers(convertible)
    expected = {k: v for k, v in ours.items() if ".patch_embedding." not in k}
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    assert torch.equal(
        native["diffusion_model.patch_embedding.lora_A.weight"], ours["transformer.patch_embedding.lora_A.weight"]
    )
    with pytest.raises(LoraLoadError, match="already exists"):
        export_wan_lora_for_comfyui(source, native_path)


def test_shared_lora_controls_and_memory_mode_on_wan(wan_model_dir, tmp_path, caplog):
    """`set_lora` / `set_memory_mode` come from `SDVGenPipelineMixin`: strength 0 and removal give the base model."""
    path = _write_wan_lora(wan_model_dir, tmp_path / "wan.safetensors")
    pipe = SDVGenWanPipeline.from_model_dir(wan_model_dir, dtype="fp32")
    video, reference, _, t = _inputs(batch=1, frames=2)
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def predict():
        return pipe.transformer(video, t, text, reference_latents=reference).sample

    base = predict()
    pipe.set_lora(path, strength=1.0)
    full = predict()
    pipe.set_lora(path, strength=0.0)
    assert torch.equal(predict(), base)
    pipe.set_lora(path, strength=1.0, fuse=True)
    torch.testing.assert_close(predict(), full, rtol=1e-4, atol=1e-5)
    pipe.set_lora(None)
    assert pipe.lora_info is None
    torch.testing.assert_close(predict(), base, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, base, atol=1e-4)
    with caplog.at_level("WARNING"):
        pipe.set_memory_mode("model_offload", "cpu")
    assert pipe.memory_mode.value == "on_device" and "needs an accelerator" in caplog.text


def test_backbone_prompt_encoding_is_the_wan_pipelines(wan_pipe):
    """The trainer's text cache uses `Backbone.encode_prompts`: equal to stock `WanPipeline`'s encoding."""
    prompts = ["a <cls> dog runs  on the beach", "a toy"]
    ours = get_backbone("wan22").encode_prompts(wan_pipe.tokenizer, wan_pipe.text_encoder, prompts, "cpu", torch.float32)
    with torch.no_grad():
        stock = WanPipeline._get_t5_prompt_embeds(wan_pipe, prompts, max_sequence_length=512, device="cpu")
    assert ours.shape == (2, 512, 32) and torch.equal(ours, stock)
    assert torch.all(ours[1, 10:] == 0) and torch.any(ours[0, 0] != 0)


def test_speed_options_run_on_wan(wan_model_dir, subject_image):
    """fp8 storage, group offload and the first-block cache (its own cache context per CFG/reference branch)."""
    def run(pipe):
        return pipe(
            "a <cls> dog runs", reference_image=subject_image, **SIZE, num_inference_steps=3, guidance_scale=5.0,
            reference_guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="latent",
        ).latents

    pipe = SDVGenWanPipeline.from_model_dir(wan_model_dir, dtype="fp32")
    plain = run(pipe)
    pipe.configure_acceleration(cache="first_block", cache_threshold=1e-9)  # nothing is close enough to skip
    assert run(pipe).equal(plain)
    pipe.configure_acceleration(cache="first_block", cache_threshold=10.0)  # every step after the first skips
    skipping = run(pipe)
    assert torch.isfinite(skipping).all() and not skipping.equal(plain)
    assert run(pipe).equal(skipping)  # the cache state is reset between calls: deterministic
    pipe.configure_acceleration(cache="off", weights="fp8")
    pipe.set_memory_mode("group_offload", "cpu")
    assert pipe.memory_mode.value == "on_device"  # the CPU has nothing to offload to
    fp8 = run(pipe)
    assert torch.isfinite(fp8).all()
    assert (fp8 - plain).abs().max() < 0.25 * plain.std()
    pipe._place(MemoryMode.GROUP_OFFLOAD, torch.device("cpu"))  # the CPU as both devices exercises the hooks
    assert run(pipe).equal(fp8)
