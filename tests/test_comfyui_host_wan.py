"""The native Wan 2.2 nodes in a real ComfyUI (skipped unless COMFYUI_ROOT points at a ComfyUI checkout).

    COMFYUI_ROOT=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python python -m pytest tests/test_comfyui_host_wan.py

In-process part (`comfyui_wan_host_checks.py`, run by the host's Python): a tiny native-format Wan 2.2
transformer goes through the core UNETLoader, our LoRA loader (a tiny LoRA written here by sdvgen_core on
diffusers' WanTransformer3DModel; its native-key copy through core LoraLoaderModelOnly) and our subject-reference
patch into the core KSampler; ComfyUI's model on weights renamed from diffusers, patched by our nodes, is checked
against our diffusers-side adapter (SDVGenWanTransformer3DModel) on the same inputs. Server part: the
shipped Wan workflow, converted with the host's /object_info, runs in ComfyUI with the tiny model under the
workflow's file names; only its CLIPLoader and VAELoader are swapped for test-only loaders of tiny stand-ins
(`comfyui_wan_test_nodes.py`, placed in custom_nodes/ for the run and removed afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import av
import pytest

from comfy_workflow import to_api
from conftest import draw_subject
from test_comfyui_host import COMFYUI_ROOT, REPO, RUN_TIMEOUT, WORKFLOWS, place, start_comfyui, stop_comfyui

pytestmark = pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout to run the real-host test")

# The tiny transformer of comfyui_wan_host_checks.py in diffusers' layout (same shapes as its native one).
TINY_WAN_DIFFUSERS = dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=48,
                          out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6)
LORA_STRENGTH = 0.75  # the host checks load the LoRA at this strength too


def tiny_diffusers_wan(seed: int):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN_DIFFUSERS).eval()


def write_diffusers_reference(models: Path, path: Path, lora: Path) -> None:
    """A stock diffusers tiny Wan 2.2, its weights renamed to ComfyUI's native keys (for UNETLoader), and on fixed
    inputs: the stock prediction, and our diffusers-side adapter's (SDVGenWanTransformer3DModel on the same
    weights with `lora` loaded by sdvgen_core at LORA_STRENGTH and a reference latent, both reference_timestep
    modes). The host checks that ComfyUI's model, and ComfyUI's model patched by our nodes, predict the same."""
    import torch
    from safetensors.torch import save_file

    from sdvgen_core.lora import load_lora
    from sdvgen_core.wan_lora import native_weight_name
    from sdvgen_core.wan_transformer import SDVGenWanTransformer3DModel

    transformer = tiny_diffusers_wan(seed=1)
    native = {native_weight_name(key): value.contiguous() for key, value in transformer.state_dict().items()}
    assert len(native) == len(transformer.state_dict())
    (models / "diffusion_models").mkdir(parents=True)
    save_file(native, str(models / "diffusion_models" / "tiny_wan22_from_diffusers.safetensors"))
    generator = torch.Generator().manual_seed(2)
    inputs = {"latents": torch.randn(1, 48, 3, 2, 4, generator=generator), "timestep": torch.tensor([700.0]),
              "context": torch.randn(1, 7, 4096, generator=generator),
              # the cross-check's inputs: a model-space reference latent, a batch of 2 at two noise levels
              "reference": torch.randn(1, 48, 1, 2, 4, generator=generator),
              "video": torch.randn(2, 48, 3, 2, 4, generator=generator), "video_timestep": torch.tensor([700.0, 250.0]),
              "video_context": torch.randn(2, 7, 4096, generator=generator)}
    with torch.no_grad():
        outputs = {"velocity": transformer(hidden_states=inputs["latents"], timestep=inputs["timestep"],
                                           encoder_hidden_states=inputs["context"], return_dict=False)[0]}
        ours = SDVGenWanTransformer3DModel.from_config(transformer.config).eval()
        ours.load_state_dict(transformer.state_dict())
        load_lora(ours, lora, strength=LORA_STRENGTH)
        for mode in ("video", "clean"):
            outputs[f"adapter_{mode}"] = ours(
                inputs["video"], inputs["video_timestep"], inputs["video_context"],
                reference_latents=inputs["reference"].expand(2, -1, -1, -1, -1), reference_timestep=mode,
            ).sample
    save_file({**inputs, **outputs}, str(path))


def write_tiny_wan_lora(path: Path) -> tuple[Path, int]:
    """Our Wan LoRA (rank 4, alpha 8, random non-zero weights) on the tiny model, saved by sdvgen_core in the
    diffusers key layout, and its native-key copy for core LoraLoaderModelOnly; returns that copy and the
    module count."""
    from sdvgen_core.lora import WAN_LORA_TARGET_MODULES
    from sdvgen_core.wan_lora import export_wan_lora_for_comfyui
    from tiny_lora import write_random_lora

    transformer = tiny_diffusers_wan(seed=0)
    write_random_lora(transformer, path, seed=3, alpha=8, target_modules=WAN_LORA_TARGET_MODULES, std=0.05)
    native = export_wan_lora_for_comfyui(path, path.with_name(f"{path.stem}_comfyui.safetensors"))
    return native, sum(".lora_A." in name for name, _ in transformer.named_parameters())


@pytest.fixture(scope="module")
def host_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("comfyui-wan")
    lora = work / "sdvgen_wan22_lora.safetensors"
    native_lora, modules = write_tiny_wan_lora(lora)
    write_diffusers_reference(work / "models", work / "diffusers_reference.safetensors", lora)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run(
        [python, str(Path(__file__).with_name("comfyui_wan_host_checks.py")), str(Path(COMFYUI_ROOT).resolve()),
         str(REPO), str(work), str(lora), str(native_lora), str(LORA_STRENGTH)],
        cwd=work, capture_output=True, text=True, timeout=900,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stdout[-4000:] + run.stderr[-8000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    print(json.dumps(results, indent=1))  # the measured numbers, shown with -s
    results["written_lora_modules"] = modules
    results["work"], results["lora"] = str(work), str(lora)
    return results


def test_tiny_native_model_is_detected_as_wan22(host_results):
    assert host_results["detected"] == ["WAN22", 48, "WanModel"]


def test_comfyuis_model_on_weights_renamed_from_diffusers_predicts_as_diffusers(host_results):
    result = host_results["diffusers_vs_native"]
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["max_error"] <= 1e-4 * result["scale"], result


def test_core_lora_loader_takes_the_native_copy_and_ours_the_diffusers_file_identically(host_results):
    modules = host_results["written_lora_modules"]
    # per block: self- and cross-attention q, k, v, o and the two FFN layers; plus patch and text embeddings
    assert modules == host_results["lora_modules"] == 2 * 10 + 3
    assert host_results["core_mapped_modules"] == 0  # ComfyUI 0.3.64 has no diffusers-Wan LoRA key map
    assert host_results["native_copy_mapped_modules"] == modules  # ...but maps every key of the native copy
    assert host_results["converted_mapped_modules"] == modules
    # the patched weights are W + strength * B @ A for every module, through either loader, and the same
    assert host_results["core_loader_weight_max_error"] < 1e-5
    assert host_results["lora_weight_max_error"] < 1e-5
    assert host_results["loaders_differ_at"] == []


@pytest.mark.parametrize("mode", ["video", "clean"])
def test_patched_prediction_equals_the_core_model_on_reference_and_video(host_results, mode):
    result = host_results["equivalence"][mode]
    assert result["shape"] == [2, 48, 3, 2, 4]  # frames 1..T only
    assert result["max_error"] <= 1e-4 * result["scale"], result
    assert result["differs_from_unpatched"] > 1e-3  # the reference really enters the model


@pytest.mark.parametrize("mode", ["video", "clean"])
def test_patched_native_prediction_equals_our_diffusers_adapter(host_results, mode):
    """The issue's cross-check: ComfyUI's model on diffusers' weights, with our native LoRA copy through core
    LoraLoaderModelOnly and our reference patch, predicts what SDVGenWanTransformer3DModel with the diffusers-layout
    LoRA predicts on the same reference latent, video, timesteps and text."""
    result = host_results["native_vs_diffusers_adapter"][mode]
    assert result["shape"] == [2, 48, 3, 2, 4]
    assert result["max_error"] <= 1e-4 * result["scale"], result
    assert result["lora_changes_prediction"] > 1e-3 and result["reference_changes_prediction"] > 1e-3
    # the modes really differ, so each is pinned to its own diffusers-side counterpart
    assert host_results["native_vs_diffusers_adapter"]["modes_differ_by"] > 100 * result["max_error"]


def test_ksampler_samples_the_patched_model_with_lora_other_wrappers_and_cfg(host_results):
    result = host_results["ksampler"]
    assert result["shape"] == [2, 48, 3, 2, 4] and result["finite"]
    # the other extension's wrapper (added before ours) still ran on every call (3 steps x one CFG batch, per
    # sample), around ours: it saw the video's 3 latent frames, ours added the reference inside it
    assert result["other_wrapper_frames"] == [3] and result["other_wrapper_calls"] == 2 * 3
    # deterministic CPU runs: any difference is the reference's effect (small with a random tiny model)
    assert result["reference_changes_video"] > 1e-5 and result["patch_changes_video"] > 1e-3
    # ComfyUI loads the model with memory for the reference frame too (4 latent frames; its per-call check of
    # whether cond and uncond fit in one batch still sees the 3 of the latent), and only on the patched model
    assert 4 in result["memory_frames_patched"] and result["memory_frames_plain"] == [3]
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


WORKFLOW = "sdvgen_wan22_subject_to_video"
WIDTH, HEIGHT, LENGTH, STEPS = 64, 32, 9, 3
STAND_INS = {"CLIPLoader": "SDVGenTestTinyUMT5Loader", "VAELoader": "SDVGenTestPoolingVAELoader"}


@pytest.fixture(scope="module")
def wan_comfyui(host_results, tmp_path_factory):
    """ComfyUI with the pack, the test-only loaders, and the tiny model and LoRA under the workflow's names."""
    root = Path(COMFYUI_ROOT).resolve()
    work = tmp_path_factory.mktemp("comfyui-wan-server")
    workflow = json.loads((WORKFLOWS / f"{WORKFLOW}.json").read_text())
    files = {node["type"]: node["widgets_values"][0] for node in workflow["nodes"]
             if node["type"] in ("UNETLoader", "SDVGenWanLoraLoader")}
    created: list[Path] = []
    process = None
    try:
        extension, test_nodes = (f"{prefix}_{uuid.uuid4().hex[:8]}" for prefix in ("sdvgen_wan_host_test", "sdvgen_wan_test_nodes"))
        place(root / "custom_nodes" / extension, created).symlink_to(REPO, target_is_directory=True)
        folder = place(root / "custom_nodes" / test_nodes, created)
        folder.mkdir()
        (folder / "__init__.py").symlink_to(Path(__file__).with_name("comfyui_wan_test_nodes.py"))
        (folder / "comfyui_wan_standins.py").symlink_to(Path(__file__).with_name("comfyui_wan_standins.py"))
        model = Path(host_results["work"]) / "models" / "diffusion_models" / "tiny_wan22_ti2v.safetensors"
        shutil.copyfile(model, place(root / "models" / "diffusion_models" / files["UNETLoader"], created))
        shutil.copyfile(host_results["lora"], place(root / "models" / "loras" / files["SDVGenWanLoraLoader"], created))
        for name in ("input", "user"):
            (work / name).mkdir()
        draw_subject(size=(120, 90), mode="RGBA").save(work / "input" / "subject.png")
        process, server = start_comfyui(root, os.environ.get("COMFYUI_PYTHON", sys.executable), work,
                                        [extension, test_nodes])
        yield server
    finally:
        stop_comfyui(process)
        for path in reversed(created):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)


@pytest.fixture(scope="module")
def wan_prompt(wan_comfyui):
    """The shipped workflow in the API format of this host, at CPU size, with the stand-in loaders."""
    info = wan_comfyui.get("/object_info")
    assert "SDVGenWanSubjectReference" in info and "SDVGenTestTinyUMT5Loader" in info, wan_comfyui.log_tail()
    prompt = to_api(json.loads((WORKFLOWS / f"{WORKFLOW}.json").read_text()), info)
    for entry in prompt.values():
        required = info[entry["class_type"]]["input"]["required"]
        assert set(required) <= set(entry["inputs"]), entry
        if entry["class_type"] in STAND_INS:
            entry.update(class_type=STAND_INS[entry["class_type"]], inputs={})
        elif entry["class_type"] == "SDVGenWanSubjectReference":
            entry["inputs"].update(width=WIDTH, height=HEIGHT, length=LENGTH)
        elif entry["class_type"] == "KSampler":
            entry["inputs"].update(steps=STEPS)
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    (node_id,) = [i for i, entry in prompt.items() if entry["class_type"] == class_type]
    return node_id


def test_wan_workflow_runs_in_comfyui_with_progress_and_previews(wan_comfyui, wan_prompt):
    seen_progress, seen_previews = len(wan_comfyui.events.progress), len(wan_comfyui.events.previews)
    entry = wan_comfyui.wait(wan_comfyui.queue(wan_prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1) + wan_comfyui.log_tail()
    (video,) = entry["outputs"][node_of(wan_prompt, "SaveVideo")]["images"]
    with av.open(str(wan_comfyui.output / video["subfolder"] / video["filename"])) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    assert len(frames) == LENGTH and frames[0].size == (WIDTH, HEIGHT)
    (text,) = entry["outputs"][node_of(wan_prompt, "PreviewAny")]["text"]
    assert "<cls> robot" in text
    sampler = node_of(wan_prompt, "KSampler")
    time.sleep(1)  # messages are sent asynchronously
    steps = [p["value"] for p in wan_comfyui.events.progress[seen_progress:] if p["node"] == sampler]
    assert steps == list(range(1, STEPS + 1))
    assert len(wan_comfyui.events.previews[seen_previews:]) == STEPS  # Wan 2.2 latent previews of the video frames


def test_cancel_stops_the_ksampler_on_the_patched_model(wan_comfyui, wan_prompt):
    prompt = json.loads(json.dumps(wan_prompt))
    sampler = node_of(prompt, "KSampler")
    prompt[sampler]["inputs"].update(steps=500, seed=11)
    seen = len(wan_comfyui.events.progress)
    prompt_id = wan_comfyui.queue(prompt)
    deadline = time.monotonic() + RUN_TIMEOUT
    while len([p for p in wan_comfyui.events.progress[seen:] if p["node"] == sampler]) < 2:
        assert time.monotonic() < deadline, wan_comfyui.log_tail()
        time.sleep(0.05)
    wan_comfyui.post("/interrupt", {})
    entry = wan_comfyui.wait(prompt_id)
    messages = dict(entry["status"]["messages"])
    assert messages["execution_interrupted"]["node_type"] == "KSampler"
    assert max(p["value"] for p in wan_comfyui.events.progress[seen:] if p["node"] == sampler) < 100
