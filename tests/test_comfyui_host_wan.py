"""The native Wan 2.2 nodes in a real ComfyUI (skipped unless COMFYUI_ROOT points at a ComfyUI checkout).

    COMFYUI_ROOT=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python python -m pytest tests/test_comfyui_host_wan.py

In-process part (`comfyui_wan_host_checks.py`, run by the host's Python): a tiny native-format Wan 2.2
transformer goes through the core UNETLoader, our LoRA loader (a tiny LoRA written here with peft on
diffusers' WanTransformer3DModel) and our subject-reference patch into the core KSampler. Server part: the
shipped Wan workflow converts to the API format against the host's /object_info (the server fixture and
the core-node check are the ones of test_comfyui_host.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_workflow import to_api
from test_comfyui_host import COMFYUI_ROOT, REPO, WORKFLOWS, comfyui, object_info  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout to run the real-host test")

# The tiny transformer of comfyui_wan_host_checks.py in diffusers' layout (same shapes as its native one).
TINY_WAN_DIFFUSERS = dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=48,
                          out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "patch_embedding",
                "condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2"]


def write_tiny_wan_lora(path: Path) -> int:
    """A rank-4 LoRA with non-zero up weights in the diffusers key layout; returns its module count."""
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**TINY_WAN_DIFFUSERS)
    transformer = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), transformer)
    state = {f"transformer.{key}": value.contiguous() for key, value in get_peft_model_state_dict(transformer).items()}
    save_file(state, str(path))
    return len(state) // 2


@pytest.fixture(scope="module")
def host_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("comfyui-wan")
    lora = work / "sdvgen_wan22_lora.safetensors"
    modules = write_tiny_wan_lora(lora)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run(
        [python, str(Path(__file__).with_name("comfyui_wan_host_checks.py")), str(Path(COMFYUI_ROOT).resolve()),
         str(REPO), str(work), str(lora)],
        cwd=work, capture_output=True, text=True, timeout=900,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stdout[-4000:] + run.stderr[-8000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    print(json.dumps(results, indent=1))  # the measured numbers, shown with -s
    results["written_lora_modules"] = modules
    return results


def test_tiny_native_model_is_detected_as_wan22(host_results):
    assert host_results["detected"] == ["WAN22", 48, "WanModel"]


def test_core_cannot_map_the_diffusers_lora_but_our_loader_maps_every_key(host_results):
    modules = host_results["written_lora_modules"]
    # per block: self- and cross-attention q, k, v, o and the two FFN layers; plus patch and text embeddings
    assert modules == host_results["lora_modules"] == 2 * 10 + 3
    assert host_results["core_mapped_modules"] == 0  # ComfyUI 0.3.64 has no diffusers-Wan LoRA key map
    assert host_results["converted_mapped_modules"] == modules
    # the patched weights are W + strength * B @ A for every module, as ComfyUI applies them
    assert host_results["lora_weight_max_error"] < 1e-5


@pytest.mark.parametrize("mode", ["video", "clean"])
def test_patched_prediction_equals_the_core_model_on_reference_and_video(host_results, mode):
    result = host_results["equivalence"][mode]
    assert result["shape"] == [2, 48, 3, 2, 4]  # frames 1..T only
    assert result["max_error"] <= 1e-4 * result["scale"], result
    assert result["differs_from_unpatched"] > 1e-3  # the reference really enters the model


def test_ksampler_samples_the_patched_model_with_lora_other_wrappers_and_cfg(host_results):
    result = host_results["ksampler"]
    assert result["shape"] == [2, 48, 3, 2, 4] and result["finite"]
    # the other extension's wrapper (added before ours) still ran on every call (3 steps x one CFG batch, per
    # sample), around ours: it saw the video's 3 latent frames, ours added the reference inside it
    assert result["other_wrapper_frames"] == [3] and result["other_wrapper_calls"] == 2 * 3
    # deterministic CPU runs: any difference is the reference's effect (small with a random tiny model)
    assert result["reference_changes_video"] > 1e-5 and result["patch_changes_video"] > 1e-3
    assert host_results["reapplied_wrappers"] == 1
    assert "subject reference was made for 64x32" in host_results["wrong_size_error"]


def test_cls_is_umt5s_spare_row_inserted_before_the_subject(host_results):
    result = host_results["cls"]
    assert result["encoded"] == "a toy <cls> robot walks through a snowy forest"
    assert result["rows"] == 256384 and result["cls_id"] < result["rows"]
    assert result["cls_count"] == 1 and result["cls_index"] == result["subject_index"]
    assert result["token_count"] == result["expected_count"]
    assert result["max_error_vs_direct"] < 1e-6
    assert result["row_changes_output"] > 1e-4


def test_wan_workflow_converts_against_the_host_object_info(object_info):  # noqa: F811
    workflow = json.loads((WORKFLOWS / "sdvgen_wan22_subject_to_video.json").read_text())
    prompt = to_api(workflow, object_info)
    types = {entry["class_type"] for entry in prompt.values()}
    assert {"UNETLoader", "CLIPLoader", "VAELoader", "KSampler", "VAEDecode", "SDVGenWanSubjectReference",
            "SDVGenWanCLSTextEncode", "SDVGenWanLoraLoader"} <= types
    for entry in prompt.values():
        required = object_info[entry["class_type"]]["input"]["required"]
        assert set(required) <= set(entry["inputs"]), entry
