"""LoRA files: the authors' release format, strength, fusing, our writer, diffusers' loader, and bad files."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file

from sdvgen_core.errors import LoraLoadError, SDVGenError
from sdvgen_core.lora import fuse_lora, is_fused, load_lora, save_lora, set_lora_strength, unfuse_lora
from sdvgen_core.transformer import SDVGenTransformer3DModel

# The spec's target list, written out here rather than imported, so the test pins it.
RELEASE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj", "text_proj", "norm1.linear", "norm2.linear", "ff.net.2"]
RANK, ALPHA = 8, 4  # the release's alpha/rank = 0.5 at a tiny rank
HEIGHT, WIDTH, FRAMES = 48, 64, 2


def make_release_lora(model_dir, path, seed=1):
    """A LoRA file in the release's format: PEFT keys, `transformer.` prefix, no alpha, no metadata."""
    model = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.1, target_modules=RELEASE_TARGETS), model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    state = get_peft_model_state_dict(model)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def release_lora(tiny_model_dir, tmp_path_factory):
    return make_release_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "pytorch_lora_weights_transformer.safetensors")


def fresh(model_dir):
    return SDVGenTransformer3DModel.from_pretrained(model_dir, subfolder="transformer").eval()


def rope(model, frames):
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        SimpleNamespace(vae_scale_factor_spatial=8, transformer=model), HEIGHT, WIDTH, frames, "cpu"
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, FRAMES, 16, HEIGHT // 8, WIDTH // 8, generator=g),
        torch.randn(1, 1, 16, HEIGHT // 8, WIDTH // 8, generator=g),
        torch.randn(1, 226, 32, generator=g),
        torch.tensor([500]),
    )


def manually_merged_stock(model_dir, lora_path, scale):
    """Independent computation: W + scale * B @ A written into a stock diffusers model by hand."""
    model = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer").eval()
    modules = dict(model.named_modules())
    with safe_open(str(lora_path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for key, lora_a in tensors.items():
            if ".lora_A." not in key:
                continue
            lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = modules[key.removeprefix("transformer.").split(".lora_A.")[0]]
            if lora_a.ndim == 4:  # conv: A is the 2x2 stride-2 conv, B a 1x1 conv
                delta = torch.einsum("or,rikl->oikl", lora_b[:, :, 0, 0], lora_a)
            else:
                delta = lora_b @ lora_a
            module.weight += scale * delta
    return model


def test_release_file_has_the_spec_layout(release_lora, tiny_model_dir):
    with safe_open(str(release_lora), "pt") as f:
        keys = list(f.keys())
    layers = fresh(tiny_model_dir).config.num_layers
    assert len(keys) == 2 * (8 * layers + 2)
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.1.ff.net.0.proj.lora_B.weight" in keys
    assert "transformer.patch_embed.proj.lora_A.weight" in keys
    assert "transformer.patch_embed.text_proj.lora_A.weight" in keys


@torch.no_grad()
def test_release_lora_loads_fully_and_matches_manual_merge(release_lora, tiny_model_dir):
    model = fresh(tiny_model_dir)
    info = load_lora(model, release_lora)
    layers = model.config.num_layers
    assert (info.num_modules, info.rank, info.alpha, info.alpha_source) == (8 * layers + 2, RANK, ALPHA, "release-default")
    with safe_open(str(release_lora), "pt") as f:
        file_keys = {k.removeprefix("transformer.") for k in f.keys()}
    assert set(get_peft_model_state_dict(model, adapter_name="sdvgen")) == file_keys  # no missing, no unexpected

    video, reference, text, t = batch()
    reference_model = manually_merged_stock(tiny_model_dir, release_lora, ALPHA / RANK)
    expected_t2v = reference_model(video, text, t, image_rotary_emb=rope(reference_model, FRAMES)).sample
    torch.testing.assert_close(model(video, text, t).sample, expected_t2v, rtol=1e-4, atol=1e-5)
    joint = torch.cat([reference, video], dim=1)
    expected_ref = reference_model(joint, text, t, image_rotary_emb=rope(reference_model, FRAMES + 1)).sample[:, 1:]
    torch.testing.assert_close(model(video, text, t, reference_latents=reference).sample, expected_ref, rtol=1e-4, atol=1e-5)
    base = fresh(tiny_model_dir)(video, text, t, reference_latents=reference).sample
    assert (base - expected_ref).abs().max() > 1e-3  # the LoRA really changes the output


@torch.no_grad()
def test_strength(release_lora, tiny_model_dir):
    video, reference, text, t = batch()
    base = fresh(tiny_model_dir)(video, text, t, reference_latents=reference).sample
    model = fresh(tiny_model_dir)
    load_lora(model, release_lora, strength=0.0)
    torch.testing.assert_close(model(video, text, t, reference_latents=reference).sample, base, rtol=0, atol=1e-6)
    set_lora_strength(model, 0.7)
    expected = manually_merged_stock(tiny_model_dir, release_lora, 0.7 * ALPHA / RANK)
    joint = torch.cat([reference, video], dim=1)
    expected_out = expected(joint, text, t, image_rotary_emb=rope(expected, FRAMES + 1)).sample[:, 1:]
    torch.testing.assert_close(model(video, text, t, reference_latents=reference).sample, expected_out, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_fused_equals_unfused(release_lora, tiny_model_dir):
    video, reference, text, t = batch()
    model = fresh(tiny_model_dir)
    load_lora(model, release_lora, strength=0.8)
    unfused = model(video, text, t, reference_latents=reference).sample
    model.fuse_lora(adapter_names=["sdvgen"])
    assert is_fused(model)
    fused = model(video, text, t, reference_latents=reference).sample
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)
    set_lora_strength(model, 0.0)  # rescaling a fused model unfuses, rescales and fuses again
    base = fresh(tiny_model_dir)(video, text, t, reference_latents=reference).sample
    torch.testing.assert_close(model(video, text, t, reference_latents=reference).sample, base, rtol=1e-4, atol=1e-5)
    model.unfuse_lora()
    assert not is_fused(model)


@torch.no_grad()
def test_reloading_over_a_fused_lora_leaves_no_residue(release_lora, tiny_model_dir, tmp_path):
    video, reference, text, t = batch()
    model = fresh(tiny_model_dir)
    load_lora(model, release_lora)
    model.fuse_lora(adapter_names=["sdvgen"])
    other = make_release_lora(tiny_model_dir, tmp_path / "other.safetensors", seed=7)
    load_lora(model, other)
    expected = fresh(tiny_model_dir)
    load_lora(expected, other)
    torch.testing.assert_close(model(video, text, t, reference_latents=reference).sample,
                               expected(video, text, t, reference_latents=reference).sample, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_writer_round_trip_and_header(release_lora, tiny_model_dir, tmp_path):
    video, reference, text, t = batch()
    source = fresh(tiny_model_dir)
    load_lora(source, release_lora)
    expected = source(video, text, t, reference_latents=reference).sample
    out = save_lora(source, tmp_path / "ours.safetensors", dtype=torch.float32,
                    extra_metadata={"sdvgen.base_model": "tiny"})
    with safe_open(str(out), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert len(keys) == 2 * (8 * source.config.num_layers + 2)
    assert float(metadata["sdvgen.alpha"]) == ALPHA and metadata["sdvgen.alpha_folded"] == "true"
    assert metadata["sdvgen.base_model"] == "tiny"
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == RANK
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind

    target = fresh(tiny_model_dir)
    info = load_lora(target, out)
    assert info.alpha_source == "sdvgen"
    torch.testing.assert_close(target(video, text, t, reference_latents=reference).sample, expected, rtol=1e-5, atol=1e-6)

    bf16 = save_lora(source, tmp_path / "ours-bf16.safetensors")  # default dtype bf16, like the release
    target_bf16 = fresh(tiny_model_dir)
    load_lora(target_bf16, bf16)
    torch.testing.assert_close(target_bf16(video, text, t, reference_latents=reference).sample, expected, rtol=0.05, atol=0.02)


@torch.no_grad()
def test_writer_output_loads_in_diffusers(release_lora, tiny_model_dir, tmp_path):
    video, _, text, t = batch()
    ours = fresh(tiny_model_dir)
    load_lora(ours, release_lora)
    path = save_lora(ours, tmp_path / "for-diffusers.safetensors", dtype=torch.float32)

    state = CogVideoXPipeline.lora_state_dict(str(path))
    assert len(state) == 2 * (8 * ours.config.num_layers + 2)
    stock_pipe = CogVideoXPipeline.from_pretrained(tiny_model_dir)
    stock_pipe.load_lora_weights(str(path), adapter_name="sdvgen")
    stock = stock_pipe.transformer.eval()
    expected = ours(video, text, t).sample
    got = stock(video, text, t, image_rotary_emb=rope(stock, FRAMES)).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def model(tiny_model_dir):
    return fresh(tiny_model_dir)


def test_pickle_file_is_refused_and_never_unpickled(model, tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "lora.safetensors"
    path.write_bytes(pickle.dumps({"transformer.x.lora_A.weight": _Exploit(str(marker))}))
    with pytest.raises(LoraLoadError, match="not a readable safetensors file"):
        load_lora(model, path)
    assert not marker.exists()


def test_missing_file(model, tmp_path):
    with pytest.raises(LoraLoadError, match="does not exist"):
        load_lora(model, tmp_path / "nope.safetensors")


def test_file_without_lora_keys(model, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"transformer.proj_out.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(LoraLoadError, match="holds no LoRA tensors"):
        load_lora(model, path)


@pytest.mark.parametrize(
    "module, a_shape, b_shape, message",
    [
        ("single_transformer_blocks.0.attn.to_q", (4, 32), (32, 4),
         r"for another model: key 'transformer\.single_transformer_blocks\.0"),
        ("transformer_blocks.0.attn1.to_q", (4, 3072), (3072, 4),
         r"shape mismatch at 'transformer\.transformer_blocks\.0\.attn1\.to_q\.lora_A"),
        ("transformer_blocks.0.attn1.to_k", (8, 32), (32, 4),
         r"rank/shape mismatch at 'transformer\.transformer_blocks\.0\.attn1\.to_k\.lora_B"),
    ],
    ids=["another-model", "shape", "rank"],
)
def test_mismatched_lora_names_first_offending_key(model, tmp_path, module, a_shape, b_shape, message):
    path = tmp_path / "mismatch.safetensors"
    save_file({
        f"transformer.{module}.lora_A.weight": torch.zeros(a_shape),
        f"transformer.{module}.lora_B.weight": torch.zeros(b_shape),
    }, str(path))
    with pytest.raises(LoraLoadError, match=message):
        load_lora(model, path)


def test_kohya_style_file(model, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file({
        "lora_unet_blocks_0_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_blocks_0_to_q.alpha": torch.tensor(4.0),
        "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
    }, str(path))
    with pytest.raises(LoraLoadError, match="non-LoRA tensor"):
        load_lora(model, path)


def rewrite_lora(source, path, edit_tensors=lambda t: t, edit_metadata=lambda m: m):
    with safe_open(str(source), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(edit_tensors(tensors), str(path), metadata=edit_metadata(dict(metadata or {})))
    return path


def with_nan(tensors, key_index=5):
    key = sorted(tensors)[key_index]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = float("nan")
    return tensors


def test_nan_lora_is_refused_at_load_and_leaves_the_model_alone(release_lora, model, tmp_path):
    bad = rewrite_lora(release_lora, tmp_path / "nan.safetensors", with_nan)
    with safe_open(str(bad), "pt") as f:
        first_bad = next(k for k in sorted(f.keys()) if not torch.isfinite(f.get_tensor(k)).all())
    with pytest.raises(LoraLoadError, match=f"nan.safetensors.*NaN or infinite values at '{first_bad}'"):
        load_lora(model, bad)
    assert not getattr(model, "peft_config", {})  # never got into the model, so it can never be fused


@pytest.mark.parametrize(
    "edit_tensors, edit_metadata, message",
    [
        (lambda t: {k: v for k, v in t.items() if "transformer_blocks.1." not in k}, lambda m: m,
         r"header says it holds \d+ LoRA modules but the file has \d+"),
        (lambda t: t, lambda m: {**m, "lora_adapter_metadata": "{not json"}, "header entry 'lora_adapter_metadata' is unusable"),
        (lambda t: t, lambda m: {**m, "lora_adapter_metadata": '{"transformer.lora_alpha": NaN}'}, "not a positive finite number"),
    ],
    ids=["fewer-modules-than-header", "broken-metadata", "nan-alpha"],
)
def test_header_that_disagrees_with_the_file(model, tiny_model_dir, tmp_path, edit_tensors, edit_metadata, message):
    from tiny_lora import write_tiny_lora

    source = write_tiny_lora(tiny_model_dir, tmp_path / "ours.safetensors")
    bad = rewrite_lora(source, tmp_path / "bad.safetensors", edit_tensors, edit_metadata)
    with pytest.raises(LoraLoadError, match=f"bad.safetensors.*{message}"):
        load_lora(model, bad)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), 11.0])
def test_bad_strength_is_refused(release_lora, model, strength):
    with pytest.raises(SDVGenError, match="LoRA strength"):
        load_lora(model, release_lora, strength=strength)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_then_unfuse_or_remove_restores_the_base_weights_exactly(release_lora, tiny_model_dir, dtype):
    model = fresh(tiny_model_dir).to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    load_lora(model, release_lora, strength=0.9)
    base_names = {k.replace(".base_layer", "") for k in model.state_dict() if "lora_" not in k}
    for strength in (0.9, 1.7, -0.3):  # re-fusing at other strengths must not drift either
        set_lora_strength(model, strength)
        fuse_lora(model)
        assert is_fused(model)
    unfuse_lora(model)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(state) == base_names == set(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    fuse_lora(model)
    load_lora(model, release_lora, strength=0.0)  # replacing a fused adapter unfuses through the backup too
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(state[k], original[k]) for k in original)


@torch.no_grad()
def test_fusing_that_overflows_is_refused_and_changes_nothing(release_lora, tiny_model_dir, tmp_path):
    """Finite LoRA values whose product overflows fp16 when merged: refused, base weights untouched, not fused."""
    huge = rewrite_lora(release_lora, tmp_path / "huge.safetensors", lambda t: {k: v * 3000 for k, v in t.items()})
    model = fresh(tiny_model_dir).to(torch.float16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    load_lora(model, huge)
    with pytest.raises(LoraLoadError, match="fusing the LoRA gives NaN/inf weights"):
        fuse_lora(model)
    assert not is_fused(model)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(state[k], original[k]) for k in original)
