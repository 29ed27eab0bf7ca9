"""Single-file T5 encoders (ComfyUI's text_encoders layouts) against the diffusers-folder encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from comfy_t5 import LAYOUTS, dequantised_state, wrapper_style_folder, write_comfy_t5

from sdvgen_core.errors import ModelLoadError
from sdvgen_core.pipeline import SDVGenPipeline
from sdvgen_core.prompts import CLS_TOKEN, encode_prompts
from sdvgen_core.text_encoder import load_t5_encoder_file, load_t5_tokenizer

PROMPTS = ["a <cls> dog runs in the garden", "the red car drives on a wet road"]
COMFY_TOKENIZER = Path("/tmp/comfyui-base/comfy/text_encoders/t5_tokenizer")
# Largest embedding error allowed, relative to the largest embedding value, for a file stored in each layout
# and computed in fp32 (fp16 keeps 11 significant bits, bf16 8, fp8 e4m3 only 4: ~6% per weight, compounding over layers).
TOLERANCE = {"fp32": 0.0, "fp16": 1e-3, "bf16": 1e-2, "fp8_e4m3fn": 0.2, "fp8_e4m3fn_scaled": 0.2}


@pytest.fixture(scope="module")
def folder_encoder(tiny_model_dir):
    return T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder", torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_t5_tokenizer(tiny_model_dir / "tokenizer")


def embed(tokenizer, encoder):
    return encode_prompts(tokenizer, encoder, PROMPTS, "cpu", torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_single_file_matches_the_folder_encoder(folder_encoder, tokenizer, tmp_path, layout, prefix):
    path = tmp_path / f"t5xxl_{layout}.safetensors"
    file_state = write_comfy_t5(folder_encoder, path, layout, prefix)
    loaded = load_t5_encoder_file(path, torch.float32)
    assert loaded.config.d_model == folder_encoder.config.d_model
    assert loaded.config.num_layers == folder_encoder.config.num_layers
    assert loaded.config.num_heads == folder_encoder.config.num_heads
    assert loaded.config.vocab_size == folder_encoder.config.vocab_size

    # Exactly what the file means: the folder model with the file's dequantised weights put in by hand.
    by_hand = T5EncoderModel(folder_encoder.config).eval()
    by_hand.load_state_dict(dequantised_state(file_state, prefix), strict=False)
    by_hand.tie_weights()
    torch.testing.assert_close(embed(tokenizer, loaded), embed(tokenizer, by_hand), atol=1e-5, rtol=1e-5)
    # And within the storage precision of the original fp32 encoder.
    reference = embed(tokenizer, folder_encoder)
    error = ((embed(tokenizer, loaded) - reference).abs().max() / reference.abs().max()).item()
    assert error <= TOLERANCE[layout], (layout, error)


def test_compute_precision_is_the_chosen_one(folder_encoder, tmp_path):
    path = tmp_path / "t5.safetensors"
    write_comfy_t5(folder_encoder, path, "fp8_e4m3fn_scaled")
    assert {p.dtype for p in load_t5_encoder_file(path, torch.bfloat16).parameters()} == {torch.bfloat16}


def test_xxl_config_is_read_from_the_key_shapes(tmp_path):
    """The real T5-XXL shapes, written as a header-only check through a meta model (no 9 GB of weights)."""
    from sdvgen_core.text_encoder import t5_config_from_shapes

    xxl = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = T5EncoderModel(xxl)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    config = t5_config_from_shapes(shapes, tmp_path)
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(config, field) == getattr(xxl, field), field
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"


def test_bad_text_encoder_files_are_named(folder_encoder, tmp_path):
    not_t5 = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(not_t5))
    with pytest.raises(ModelLoadError, match="not a T5 encoder"):
        load_t5_encoder_file(not_t5, torch.float32)
    pointer = tmp_path / "t5xxl_fp16.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9787841024\n")
    with pytest.raises(ModelLoadError, match="Git-LFS pointer"):
        load_t5_encoder_file(pointer, torch.float32)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"\0" * 2000)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_t5_encoder_file(broken, torch.float32)
    truncated = tmp_path / "truncated.safetensors"
    state = write_comfy_t5(folder_encoder, truncated, "fp16")
    state.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
    save_file(state, str(truncated))
    with pytest.raises(ModelLoadError, match="lacks the weight 'encoder.block.1.layer.1.DenseReluDense.wo.weight'"):
        load_t5_encoder_file(truncated, torch.float32)


@pytest.fixture(scope="module")
def wrapper_model(tiny_model_dir, tmp_path_factory):
    """Wrapper-style folder, a T5 file beside it and the tokenizer elsewhere (as the host ships one)."""
    root = tmp_path_factory.mktemp("wrapper")
    folder = wrapper_style_folder(tiny_model_dir, root / "CogVideoX-5b")
    t5_file = root / "t5xxl_fp16.safetensors"
    write_comfy_t5(T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder"), t5_file, "fp32")
    return folder, t5_file, tiny_model_dir / "tokenizer"


def test_wrapper_folder_with_a_t5_file_samples_like_the_full_folder(tiny_pipe, wrapper_model):
    folder, t5_file, tokenizer_dir = wrapper_model
    pipe = SDVGenPipeline.from_model_dir(folder, dtype="fp32", text_encoder_file=t5_file,
                                         fallback_tokenizer_dir=tokenizer_dir)
    assert pipe.cls_info == tiny_pipe.cls_info
    assert pipe.tokenizer.convert_tokens_to_ids(CLS_TOKEN) == pipe.cls_info.token_id
    row = pipe.cls_info.token_id
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[row],
                               tiny_pipe.text_encoder.get_input_embeddings().weight[row])
    kwargs = dict(prompt=PROMPTS[0], height=48, width=64, num_frames=5, num_inference_steps=2, output_type="latent")
    expected = tiny_pipe(generator=torch.Generator().manual_seed(1), **kwargs).latents
    torch.testing.assert_close(pipe(generator=torch.Generator().manual_seed(1), **kwargs).latents, expected)


def test_wrapper_folder_without_a_text_encoder_fails_before_loading(wrapper_model, monkeypatch):
    folder, t5_file, _ = wrapper_model

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the folder was refused")

    monkeypatch.setattr("sdvgen_core.pipeline.SDVGenTransformer3DModel.from_pretrained", no_load)
    monkeypatch.setattr("sdvgen_core.pipeline.load_t5_encoder_file", no_load)
    with pytest.raises(ModelLoadError) as error:
        SDVGenPipeline.from_model_dir(folder)
    message = str(error.value)
    assert "models/text_encoders" in message and "text_encoder/ and tokenizer/" in message
    with pytest.raises(ModelLoadError, match="no tokenizer/"):
        SDVGenPipeline.from_model_dir(folder, text_encoder_file=t5_file)


@pytest.mark.skipif(not COMFY_TOKENIZER.is_dir(), reason="needs ComfyUI's shipped T5 tokenizer")
def test_comfyui_tokenizer_gets_cls_on_the_checkpoints_unused_row(tmp_path):
    """ComfyUI's T5 tokenizer (32100 tokens) with a T5 table of 32128 rows: <cls> is id 32100, an existing row."""
    from sdvgen_core.prompts import add_cls_token

    tokenizer = load_t5_tokenizer(COMFY_TOKENIZER)
    encoder = T5EncoderModel(T5Config(vocab_size=32128, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                      feed_forward_proj="gated-gelu"))
    path = tmp_path / "t5.safetensors"
    write_comfy_t5(encoder, path, "fp8_e4m3fn_scaled")
    loaded = load_t5_encoder_file(path, torch.float32)
    info = add_cls_token(tokenizer, loaded)
    assert (info.token_id, info.row) == (32100, "existing")
    assert loaded.get_input_embeddings().num_embeddings == 32128
    assert tokenizer("a <cls> dog").input_ids.count(32100) == 1


def test_cli_runs_a_wrapper_folder_with_a_text_encoder_file(wrapper_model, tmp_path, capsys):
    from PIL import Image

    from sdvgen_core.cli import main

    folder, t5_file, tokenizer_dir = wrapper_model
    ref = tmp_path / "subject.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(ref)
    out = tmp_path / "video.mp4"
    common = ["generate", "--model", str(folder), "--ref", str(ref), "--prompt", "a dog runs", "--subject", "dog",
              "--width", "64", "--height", "48", "--frames", "5", "--steps", "1", "--out", str(out)]
    assert main(common) == 2
    assert "models/text_encoders" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--text-encoder", str(t5_file), "--tokenizer", str(tokenizer_dir)]) == 0
    assert out.stat().st_size > 0
