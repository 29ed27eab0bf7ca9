"""Speed/memory options on the tiny model: fp8 weights, group offload, compiled blocks, attention dispatch, step cache.

Each option is checked against the plain (fp32, on-device, eager, uncached) computation, with the reference
tokens and with a LoRA. Compilation uses a counting `eager`-style backend: it runs dynamo's capture (where
recompiles are decided) without Inductor's code generation, which would take minutes per test on 2 cores.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from sdvgen_core import acceleration
from sdvgen_core.attention import DispatchCogVideoXAttnProcessor
from sdvgen_core.errors import SDVGenError
from sdvgen_core.pipeline import MemoryMode, SDVGenPipeline

from conftest import draw_subject
from tiny_lora import write_tiny_lora

SMALL = {"height": 48, "width": 64, "num_frames": 5, "num_inference_steps": 4}
PROMPT = "a <cls> dog runs on the beach"
# fp8 e4m3 has a 3-bit mantissa (relative step 2^-3 at worst, ~2^-4 typical); over the tiny model's layers the
# output moves by a few percent of its scale. Stated tolerance: max-abs error <= 15% of the output's std.
FP8_TOLERANCE = 0.15


def transformer_inputs(seed=0, batch=1, frames=2):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, frames, 16, 6, 8, generator=g)
    reference = torch.randn(batch, 1, 16, 6, 8, generator=g)
    text = torch.randn(batch, 226, 32, generator=g)
    return video, text, torch.full((batch,), 500), reference


def predict(pipe, video, text, timestep, reference):
    with torch.no_grad():
        return pipe.transformer(video, text, timestep, reference_latents=reference).sample


def generate(pipe, seed=0, **kwargs):
    settings = {**SMALL, "reference_image": draw_subject(), **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="latent", **settings).latents


@pytest.fixture
def pipe(tiny_model_dir):
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_memory_mode("on_device", "cpu")
    return pipe


@pytest.fixture(scope="module")
def lora(tiny_model_dir, tmp_path_factory):
    return write_tiny_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def assert_fp8_close(actual, expected):
    error = (actual - expected).abs().max().item()
    assert error <= FP8_TOLERANCE * expected.std().item(), f"fp8 error {error} vs output std {expected.std().item()}"
    assert error > 0  # the weights really were quantised


@torch.no_grad()
def test_dispatch_processor_is_bit_equal_to_stock_with_reference_tokens(pipe):
    args = transformer_inputs(batch=2)
    pipe.transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
    stock = predict(pipe, *args)
    pipe.configure_acceleration(attention="sdpa")
    pipe.transformer.set_attn_processor(DispatchCogVideoXAttnProcessor())
    assert all(isinstance(p, DispatchCogVideoXAttnProcessor) for p in pipe.transformer.attn_processors.values())
    torch.testing.assert_close(predict(pipe, *args), stock, rtol=0, atol=0)
    no_reference = (*args[:3], None)
    dispatched = predict(pipe, *no_reference)
    pipe.transformer.set_attn_processor(CogVideoXAttnProcessor2_0())
    torch.testing.assert_close(dispatched, predict(pipe, *no_reference), rtol=0, atol=0)


@torch.no_grad()
def test_fp8_weights_close_to_full_precision_with_lora_unfused_and_fused(tiny_model_dir, lora):
    args = transformer_inputs()
    full = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=lora, lora_strength=0.7)
    expected = predict(full, *args)
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32")
    pipe.set_memory_mode("on_device", "cpu")
    pipe.configure_acceleration(weights="fp8")
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn1.to_q.weight.dtype == torch.float8_e4m3fn  # stored in fp8 ...
    assert block.norm1.linear.weight.dtype == torch.float32  # ... modulation/norm kept, as diffusers' skip patterns say
    assert pipe.transformer.patch_embed.proj.weight.dtype == torch.float32
    assert pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn

    pipe.set_lora(lora, strength=0.7)
    assert block.attn1.to_q.lora_A["sdvgen"].weight.dtype == torch.float32  # LoRA in the compute precision
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    unfused = predict(pipe, *args)
    assert_fp8_close(unfused, expected)
    stored = block.attn1.to_q.base_layer.weight.float().clone()

    pipe.set_lora(lora, strength=0.7, fuse=True)  # fused: fp8(W8 + delta)
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    fused = predict(pipe, *args)
    assert_fp8_close(fused, expected)
    assert (fused - unfused).abs().max() > 0  # the delta was quantised with the weight

    pipe.set_lora(lora, strength=0.7, fuse=False)  # unmerge in the compute precision, stored in fp8 again
    restored = block.attn1.to_q.base_layer.weight.float()
    torch.testing.assert_close(restored, stored, rtol=0, atol=0)  # exact: unfused fp8 weights were kept
    # The LoRA-targeted modulation layers stay fp32 and are unmerged by subtraction: fp32 round-off only.
    torch.testing.assert_close(predict(pipe, *args), unfused, rtol=0, atol=1e-5)
    pipe.set_lora(lora, strength=0.3, fuse=True)
    pipe.set_lora(lora, strength=0.7, fuse=True)  # strength change while fused: exact unfuse, re-fuse
    torch.testing.assert_close(predict(pipe, *args), fused, rtol=0, atol=1e-5)
    with pytest.raises(SDVGenError, match="reload the model"):
        pipe.configure_acceleration(weights="precision")


@torch.no_grad()
def test_group_offload_equals_on_device_with_lora_fp8_and_reference(tiny_model_dir, lora):
    """CPU as both devices runs diffusers' block-level group offloading hooks (no GPU on the test machine)."""
    args = transformer_inputs()
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=lora, lora_strength=0.5)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_memory_mode("on_device", "cpu")
    pipe.configure_acceleration(weights="fp8")
    expected_step = predict(pipe, *args)
    expected_video = generate(pipe, num_inference_steps=2)

    pipe._place(MemoryMode.GROUP_OFFLOAD, torch.device("cpu"))
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    assert _is_group_offload_enabled(pipe.transformer) and _is_group_offload_enabled(pipe.text_encoder)
    torch.testing.assert_close(predict(pipe, *args), expected_step, rtol=0, atol=0)
    torch.testing.assert_close(generate(pipe, num_inference_steps=2), expected_video, rtol=0, atol=0)

    pipe.set_lora(lora, strength=1.0)  # a LoRA change under group offload: hooks off, weights change, hooks back
    assert pipe.memory_mode is MemoryMode.GROUP_OFFLOAD and _is_group_offload_enabled(pipe.transformer)
    changed = predict(pipe, *args)
    pipe._place(MemoryMode.ON_DEVICE, torch.device("cpu"))
    assert not _is_group_offload_enabled(pipe.transformer)
    torch.testing.assert_close(changed, predict(pipe, *args), rtol=0, atol=0)
    assert (changed - expected_step).abs().max() > 1e-4


def counting_backend():
    compiles = []

    def backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    return backend, compiles


@torch.no_grad()
def test_compiled_blocks_equal_eager_and_do_not_recompile_on_strength_reference_prompt(pipe, lora):
    import torch._dynamo

    torch._dynamo.reset()
    pipe.set_lora(lora, strength=0.5)
    video, text, timestep, reference = transformer_inputs()
    eager = predict(pipe, video, text, timestep, reference)
    backend, compiles = counting_backend()
    pipe.configure_acceleration(compile="blocks", compile_backend=backend)
    assert all(block._compiled_call_impl is not None for block in pipe.transformer.transformer_blocks)
    torch.testing.assert_close(predict(pipe, video, text, timestep, reference), eager, rtol=1e-5, atol=1e-6)
    compiled_once = len(compiles)
    assert compiled_once > 0

    pipe.set_lora(lora, strength=0.9)  # strength: a tensor value, not a new graph
    at_09 = predict(pipe, video, text, timestep, reference)
    other_reference, other_text = transformer_inputs(seed=1)[3], transformer_inputs(seed=1)[1]
    predict(pipe, video, text, timestep, other_reference)
    predict(pipe, video, other_text, torch.full((1,), 300), reference)
    assert len(compiles) == compiled_once
    predict(pipe, *transformer_inputs(frames=3)[:3], None)  # another size (and no reference) may compile anew
    assert len(compiles) > compiled_once
    pipe.configure_acceleration(compile="off")
    torch.testing.assert_close(at_09, predict(pipe, video, text, timestep, reference), rtol=1e-5, atol=1e-6)
    assert (at_09 - eager).abs().max() > 1e-4  # the new strength did reach the compiled graph


def test_peft_float_scaling_would_recompile(pipe, lora):
    """Why `hold_lora_scalings_in_tensors` exists: with PEFT's float scaling a strength change recompiles."""
    import torch._dynamo

    torch._dynamo.reset()
    pipe.set_lora(lora, strength=0.5)
    backend, compiles = counting_backend()
    pipe.transformer.compile_repeated_blocks(backend=backend, dynamic=False)
    args = transformer_inputs()
    predict(pipe, *args)
    before = len(compiles)
    pipe.transformer.set_adapters(["sdvgen"], weights=[0.9])
    predict(pipe, *args)
    assert len(compiles) > before
    acceleration._uncompile(pipe.transformer)


def count_block_runs(pipe):
    runs = {"first": 0, "last": 0}
    blocks = pipe.transformer.transformer_blocks
    blocks[0].attn1.register_forward_hook(lambda *a: runs.__setitem__("first", runs["first"] + 1))
    blocks[-1].attn1.register_forward_hook(lambda *a: runs.__setitem__("last", runs["last"] + 1))
    return runs


@torch.no_grad()
def test_first_block_cache_close_deterministic_and_skips(pipe, lora):
    pipe.set_lora(lora, strength=0.5)
    steps = 10
    uncached = generate(pipe, num_inference_steps=steps)
    runs = count_block_runs(pipe)
    pipe.configure_acceleration(cache="first_block", cache_threshold=0.3)
    cached = generate(pipe, num_inference_steps=steps)
    assert runs["first"] == steps and 0 < runs["last"] < steps, runs  # some steps skipped the remaining blocks
    torch.testing.assert_close(generate(pipe, num_inference_steps=steps), cached, rtol=0, atol=0)
    relative = ((cached - uncached).abs().max() / uncached.abs().max()).item()
    assert 0 < relative < 0.5
    pipe.configure_acceleration(cache="off")
    torch.testing.assert_close(generate(pipe, num_inference_steps=steps), uncached, rtol=0, atol=0)


@torch.no_grad()
def test_cache_keeps_the_reference_guidance_branch_apart(pipe):
    """The reference-free branch (batch 1, no reference tokens) runs in its own cache context: two states, each
    holding residuals of its own branch, never one branch's cache serving the other."""
    steps = 6
    uncached = generate(pipe, num_inference_steps=steps, reference_guidance_scale=2.0)
    pipe.configure_acceleration(cache="first_block", cache_threshold=0.3)
    head_hook = pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    seen = []

    def inspect(info):
        states = head_hook.state_manager._state_cache
        seen.append({name: tuple(state.head_block_residual.shape) for name, state in states.items()})

    cached = generate(pipe, num_inference_steps=steps, reference_guidance_scale=2.0, callback=inspect)
    video_tokens = 2 * 3 * 4  # 5 frames -> 2 latent frames of 6x8 latents in 2x2 patches; the reference adds 12
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    assert seen[0] == {"cfg_batch": (2, video_tokens + 12, width), "no_reference": (1, video_tokens, width)}
    assert all(step == seen[0] for step in seen)
    assert head_hook.state_manager._state_cache == {}  # reset after the call: nothing leaks into the next video
    torch.testing.assert_close(generate(pipe, num_inference_steps=steps, reference_guidance_scale=2.0), cached,
                               rtol=0, atol=0)
    assert ((cached - uncached).abs().max() / uncached.abs().max()).item() < 0.5


def test_memory_mode_auto_is_silent_on_cpu_and_picks_by_gpu_memory(pipe, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING):
        pipe.set_memory_mode("auto", "cpu")
        assert pipe.memory_mode is MemoryMode.ON_DEVICE and caplog.text == ""
        pipe.set_memory_mode("model_offload", "cpu")
        pipe.set_memory_mode("group_offload", "cpu")
    assert caplog.text.count("needs an accelerator") == 1  # once per loaded pipeline
    for gib, mode in ((80, "on_device"), (24, "model_offload"), (16, "group_offload"), (8, "group_offload")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, gib=gib: type("P", (), {"total_memory": gib * 2**30}))
        assert acceleration.resolve_memory_mode("auto", torch.device("cuda")) == mode
    assert acceleration.resolve_memory_mode("sequential_offload", torch.device("cuda")) == "sequential_offload"


@pytest.mark.parametrize(
    "options, device, message",
    [
        ({"attention": "flash"}, "cpu", "attention 'flash' needs a CUDA GPU"),
        ({"attention": "sage"}, "cuda", "sageattention"),
        ({"attention": "flash"}, "cuda", "flash-attn"),
        ({"attention": "magic"}, "cpu", "attention 'magic' is not one of"),
        ({"weights": "int4"}, "cpu", "weights 'int4' is not one of"),
        ({"cache": "first_block", "cache_threshold": float("nan")}, "cpu", "cache threshold"),
        ({"blocks_per_group": 0}, "cpu", "blocks per group"),
    ],
)
def test_bad_combinations_are_refused_naming_the_option(options, device, message):
    config = acceleration.with_options(acceleration.AccelerationConfig(), **options)
    with pytest.raises(SDVGenError, match=message):
        acceleration.check_acceleration(config, device, torch.bfloat16)


def test_compile_without_a_compiler_and_unknown_options(pipe, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(SDVGenError, match="compile 'blocks' on cpu needs a C\\+\\+ compiler"):
        pipe.configure_acceleration(compile="blocks")
    assert pipe.acceleration.compile == "off"
    with pytest.raises(SDVGenError, match="unknown acceleration option"):
        pipe.configure_acceleration(turbo=True)


@torch.no_grad()
def test_all_options_together_with_lora_and_reference_guidance(tiny_model_dir, lora):
    plain = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32", lora_path=lora, lora_strength=0.5)
    plain.set_progress_bar_config(disable=True)
    expected = generate(plain, reference_guidance_scale=1.5, num_inference_steps=2)
    pipe = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_memory_mode("on_device", "cpu")
    backend, compiles = counting_backend()
    pipe.configure_acceleration(weights="fp8", compile="blocks", compile_backend=backend, cache="first_block",
                                cache_threshold=0.01, blocks_per_group=2)
    pipe.transformer.set_attn_processor(DispatchCogVideoXAttnProcessor())
    pipe._place(MemoryMode.GROUP_OFFLOAD, torch.device("cpu"))
    pipe.set_lora(lora, strength=0.5, fuse=True)
    first = generate(pipe, reference_guidance_scale=1.5, num_inference_steps=2)
    assert ((first - expected).abs().max() / expected.abs().max()).item() < FP8_TOLERANCE
    compiled = len(compiles)
    pipe.set_lora(lora, strength=0.5, fuse=True)
    torch.testing.assert_close(generate(pipe, reference_guidance_scale=1.5, num_inference_steps=2), first,
                               rtol=0, atol=1e-5)
    assert len(compiles) == compiled


def test_choice_lists_mirror_the_core():
    from nodes import types
    from sdvgen_core import acceleration_options as options
    from sdvgen_core.attention import ATTENTION_BACKENDS

    assert types.WEIGHTS == list(options.WEIGHTS) and types.COMPILE_MODES == list(options.COMPILE_MODES)
    assert types.CACHES == list(options.CACHES) and types.ATTENTION_NAMES == list(options.ATTENTION_NAMES)
    assert list(ATTENTION_BACKENDS) == list(options.ATTENTION_NAMES)
    assert list(options.MEMORY_MODES) == [mode.value for mode in MemoryMode] == types.MEMORY_MODES
    assert options.DEFAULT_CACHE_THRESHOLD == acceleration.AccelerationConfig.cache_threshold


@pytest.fixture
def node_models(tmp_path, tiny_model_dir, lora, monkeypatch):
    from nodes import host
    from nodes.loader import PIPELINE_CACHE

    (tmp_path / "CogVideo").mkdir()
    (tmp_path / "CogVideo" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "tiny.safetensors").symlink_to(lora)
    monkeypatch.setenv(host.MODELS_DIR_ENV, str(tmp_path))
    yield tmp_path
    PIPELINE_CACHE.clear()


def test_load_node_applies_the_options_and_refuses_bad_ones_before_loading(node_models, monkeypatch, caplog):
    from nodes.loader import LoadSDVLoRA

    node = LoadSDVLoRA()
    spec = LoadSDVLoRA.INPUT_TYPES()
    assert spec["required"]["memory_mode"][1]["default"] == "auto"
    assert all(options.get("tooltip") for _, options in spec["optional"].values())
    loads = []
    original = SDVGenPipeline.from_model_dir.__func__
    monkeypatch.setattr(SDVGenPipeline, "from_model_dir",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    with pytest.raises(SDVGenError, match="attention 'flash' needs a CUDA GPU"):
        node.load("tiny", "tiny.safetensors", 1.0, "fp32", "auto", False, attention="flash")
    assert loads == []  # refused before anything loaded

    with caplog.at_level(logging.WARNING):
        (model,) = node.load("tiny", "tiny.safetensors", 1.0, "fp32", "auto", False, weights="fp8",
                             cache="first_block", cache_threshold=0.2, blocks_per_group=2)
    assert caplog.text == ""  # auto on a CPU is silent
    pipe = model.pipeline()
    assert pipe.acceleration.weights == "fp8" and pipe.acceleration.cache == "first_block"
    assert pipe.acceleration.cache_threshold == 0.2 and pipe.transformer.is_cache_enabled
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    (plain,) = node.load("tiny", "tiny.safetensors", 1.0, "fp32", "auto", False, weights="fp8")
    assert plain.pipeline() is pipe and not pipe.transformer.is_cache_enabled  # same base: options re-applied only
    assert len(loads) == 1


@pytest.fixture
def cli_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SDVGEN_CACHE", str(tmp_path_factory.getbasetemp() / "sdvgen-cache"))


def test_cli_flags(tmp_path, cli_cache, capsys, caplog, monkeypatch):
    from sdvgen_core.cli import main

    ref = tmp_path / "subject.png"
    draw_subject().save(ref)
    out = tmp_path / "video.mp4"
    common = ["generate", "--preset", "tiny", "--ref", str(ref), "--prompt", "a dog runs", "--out", str(out),
              "--frames", "5", "--width", "64", "--height", "48", "--steps", "3"]
    loads = []
    original = SDVGenPipeline.from_model_dir.__func__
    monkeypatch.setattr(SDVGenPipeline, "from_model_dir",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    assert main([*common, "--attention", "sage"]) == 2
    assert "attention 'sage' needs a CUDA GPU" in capsys.readouterr().err
    assert main([*common, "--cache", "first_block", "--cache-threshold", "-1"]) == 2
    assert "cache threshold -1.0 must be a positive number" in capsys.readouterr().err
    assert loads == [] and not out.exists()
    with caplog.at_level(logging.WARNING):
        assert main([*common, "--weights", "fp8", "--cache", "first_block", "--cache-threshold", "0.2",
                     "--memory-mode", "auto"]) == 0
    assert out.is_file() and "needs an accelerator" not in caplog.text
