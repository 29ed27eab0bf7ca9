"""The native Wan 2.2 nodes' host-free logic (the real-host behaviour is in test_comfyui_host_wan.py)."""

from __future__ import annotations

import types

import pytest
import torch

import nodes
from nodes.wan import WanCLSTextEncode, WanLoraLoader, WanSubjectReference
from nodes.wan_patch import ReferenceTokensWrapper, insert_token_for_marker, wan22_latent_shape
from sdvgen_core import LoraLoadError, SDVGenError
from sdvgen_core.wan_lora import diffusers_wan_lora_to_native, native_weight_name
from sdvgen_core.wan_transformer import DEFAULT_REFERENCE_TIMESTEP, ReferenceTimestep

WAN_NODES = (WanSubjectReference, WanCLSTextEncode, WanLoraLoader)


@pytest.mark.parametrize("node", WAN_NODES, ids=lambda node: node.__name__)
def test_every_input_has_a_tooltip_and_the_nodes_are_registered(node):
    spec = node.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (_, *options) in spec.get(section, {}).items():
            assert options and options[0].get("tooltip"), f"{node.__name__}.{name}"
    assert node.CATEGORY == "sdvgen" and node in nodes.NODE_CLASS_MAPPINGS.values()


@pytest.mark.parametrize(
    "width, height, length, batch, problem",
    [
        (1280, 704, 121, 1, None),
        (32, 32, 1, 64, None),
        (1280, 720, 121, 1, "height must be a positive multiple of 32"),
        (1270, 704, 121, 1, "width must be a positive multiple of 32"),
        (1280, 704, 120, 1, "length must be 4k + 1"),
        (1280, 704, 121, 0, "batch_size must be 1..64"),
    ],
)
def test_subject_reference_validates_sizes_before_running(width, height, length, batch, problem):
    result = WanSubjectReference.VALIDATE_INPUTS(width=width, height=height, length=length, batch_size=batch)
    assert result is True if problem is None else problem in result


def test_lora_loader_rejects_nan_strength():
    assert WanLoraLoader.VALIDATE_INPUTS(strength_model=1.0) is True
    assert "strength_model" in WanLoraLoader.VALIDATE_INPUTS(strength_model=float("nan"))


def test_latent_shape_is_wan22s():
    assert wan22_latent_shape(2, 1280, 704, 121) == (2, 48, 31, 44, 80)


def per_frame_model(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
    """Stand-in diffusion model whose output mixes frames and depends on each frame's timestep."""
    assert timestep.shape == x.shape[:1] + x.shape[2:3]
    return x * timestep[:, None, :, None, None] + x.mean(dim=2, keepdim=True) + context.mean()


@pytest.mark.parametrize("clean", [False, True])
@pytest.mark.parametrize("timestep_shape", ["batch", "per_frame"])
def test_wrapper_runs_the_model_on_reference_then_video_and_returns_the_video(clean, timestep_shape):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 48, 1, 2, 4, generator=generator)
    video = torch.randn(2, 48, 3, 2, 4, generator=generator, dtype=torch.float64)
    context = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    if timestep_shape == "batch":
        timestep = torch.tensor([700.0, 20.0], dtype=torch.float64)
        per_frame = timestep[:, None].expand(2, 3)
    else:  # a denoise mask makes per-frame timesteps (e.g. a clean first frame)
        per_frame = timestep = torch.tensor([[0.0, 700.0, 700.0], [0.0, 20.0, 20.0]], dtype=torch.float64)
    reference_t = torch.zeros(2, 1, dtype=torch.float64) if clean else per_frame.amax(dim=1, keepdim=True)

    out = ReferenceTokensWrapper(reference, clean)(per_frame_model, video, timestep, context, None, None, {})

    joint = torch.cat([reference.double().expand(2, -1, -1, -1, -1), video], dim=2)
    expected = per_frame_model(joint, torch.cat([reference_t, per_frame], dim=1), context, None, None, {})[:, :, 1:]
    assert out.dtype == video.dtype and out.shape == video.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_wrapper_refuses_a_latent_of_another_size_before_sampling():
    wrapper = ReferenceTokensWrapper(torch.zeros(1, 48, 1, 2, 4), clean=False)
    message = "latent being sampled is 64x64 but the subject reference was made for 64x32"
    with pytest.raises(SDVGenError, match=message):
        wrapper(per_frame_model, torch.zeros(1, 48, 3, 4, 4), torch.ones(1), torch.zeros(1, 2, 8), None, None, {})
    with pytest.raises(SDVGenError, match=message):
        wrapper.prepare_sampling(None, "model", (1, 48, 3, 4, 4), {})


def test_sampling_is_prepared_for_the_reference_frame():
    wrapper = ReferenceTokensWrapper(torch.zeros(1, 48, 1, 2, 4), clean=False)
    calls = []
    result = wrapper.prepare_sampling(lambda *args, **kwargs: calls.append((args, kwargs)) or "prepared", "model",
                                      (2, 48, 3, 2, 4), {"positive": []}, model_options={"x": 1})
    assert result == "prepared" and calls == [(("model", [2, 48, 4, 2, 4], {"positive": []}), {"model_options": {"x": 1}})]


def test_cls_marker_pieces_become_one_token_and_the_list_is_padded_back():
    # "a toy <cls> robot" with "<cls>" as the pieces 7, 8, 9; end 1, pad 0, min length 8
    tokens = [[(3, 1.0), (4, 1.0), (7, 1.2), (8, 1.2), (9, 1.2), (5, 1.0), (1, 1.0), (0, 1.0)]]
    out = insert_token_for_marker(tokens, [7, 8, 9], 256300, pad_token=0, min_length=8)
    assert out == [[(3, 1.0), (4, 1.0), (256300, 1.2), (5, 1.0), (1, 1.0), (0, 1.0), (0, 1.0), (0, 1.0)]]
    long = [[(3, 1.0)] * 10 + [(7, 1.0), (8, 1.0), (9, 1.0), (1, 1.0)]]  # over min length: not padded
    assert len(insert_token_for_marker(long, [7, 8, 9], 256300, 0, 8)[0]) == 12
    with pytest.raises(SDVGenError, match="<cls> was not found"):
        insert_token_for_marker([[(3, 1.0), (1, 1.0)]], [7, 8, 9], 256300, 0, 8)


def test_cls_node_is_for_the_wan_text_encoder_only():
    cogvideox_like = types.SimpleNamespace(tokenizer=types.SimpleNamespace(clip_name="t5xxl"))
    with pytest.raises(SDVGenError, match="UMT5-XXL"):
        WanCLSTextEncode().encode(cogvideox_like, "a toy robot", "robot")


def test_diffusers_wan_lora_keys_become_comfyuis_native_names():
    down, up = torch.zeros(4, 128), torch.zeros(128, 4)
    converted = diffusers_wan_lora_to_native({
        "transformer.blocks.3.attn1.to_out.0.lora_A.weight": down,
        "transformer.blocks.3.attn2.to_k.lora_B.weight": up,
        "transformer.blocks.0.ffn.net.0.proj.lora_A.weight": down,
        "transformer.condition_embedder.text_embedder.linear_2.lora_B.weight": up,
        "transformer.patch_embedding.lora_A.weight": down,
    })
    assert sorted(converted) == [
        "diffusion_model.blocks.0.ffn.0.lora_A.weight",
        "diffusion_model.blocks.3.cross_attn.k.lora_B.weight",
        "diffusion_model.blocks.3.self_attn.o.lora_A.weight",
        "diffusion_model.patch_embedding.lora_A.weight",
        "diffusion_model.text_embedding.2.lora_B.weight",
    ]
    assert converted["diffusion_model.blocks.0.ffn.0.lora_A.weight"] is down


def test_a_cogvideox_lora_is_a_clear_error():
    with pytest.raises(LoraLoadError, match="transformer_blocks.0.attn1.to_q.lora_A.weight.*CogVideoX"):
        diffusers_wan_lora_to_native({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1)})


def test_every_diffusers_wan_weight_has_one_native_name():
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=48, out_channels=48,
        text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    names = {key: native_weight_name(key) for key in transformer.state_dict()}
    assert len(set(names.values())) == len(names)
    assert names["blocks.1.norm2.weight"] == "blocks.1.norm3.weight"
    assert names["blocks.1.scale_shift_table"] == "blocks.1.modulation"
    assert names["scale_shift_table"] == "head.modulation"
    assert names["condition_embedder.time_proj.bias"] == "time_projection.1.bias"


def test_node_offers_the_cores_reference_timesteps_with_the_cores_default():
    choices, options = WanSubjectReference.INPUT_TYPES()["required"]["reference_timestep"]
    assert sorted(choices) == sorted(mode.value for mode in ReferenceTimestep)
    assert options["default"] == DEFAULT_REFERENCE_TIMESTEP.value == "clean"


def test_validation_leaves_linked_inputs_to_the_run():
    assert WanSubjectReference.VALIDATE_INPUTS(width=None, height=704, length=121, batch_size=1) is True
    with pytest.raises(SDVGenError, match="length must be 4k \\+ 1"):
        WanSubjectReference().apply(None, None, torch.zeros(1, 8, 8, 3), 64, 64, 8, 1, "video")
