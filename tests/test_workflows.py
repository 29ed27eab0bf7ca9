"""Every shipped workflow checked against the node definitions, as ComfyUI's frontend and server read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_workflow import (
    CORE_NODES,
    VIRTUAL_NODES,
    check_widget_value,
    is_widget,
    node_info_from_class,
    ordered_inputs,
    to_api,
    types_match,
    widget_values_by_name,
)

import nodes

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
# Dropdowns over the user's files: any file name is valid in a shared workflow.
FILE_COMBOS = ("model", "lora", "image", "unet_name", "clip_name", "vae_name", "lora_name")
# Where each core Wan loader's file goes (the note must say it).
WAN_FILE_FOLDERS = {"UNETLoader": ("unet_name", "models/diffusion_models"), "CLIPLoader": ("clip_name", "models/text_encoders"),
                    "VAELoader": ("vae_name", "models/vae"), "SDVGenWanLoraLoader": ("lora_name", "models/loras")}


@pytest.fixture(scope="module")
def object_info(tmp_path_factory):
    ours = {node_id: node_info_from_class(cls) for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items()}
    assert not set(ours) & set(CORE_NODES)
    return {**CORE_NODES, **ours}


def test_the_workflows_ship():
    assert [path.name for path in WORKFLOWS] == [
        "sdvgen_identity_strength_comparison.json", "sdvgen_released_checkpoint.json", "sdvgen_subject_to_video.json",
        "sdvgen_wan22_subject_to_video.json",
    ]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_matches_the_node_definitions(path, object_info):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes_by_id) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes_by_id)
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])

    for node in workflow["nodes"]:
        where = f"{path.name} node {node['id']} ({node['type']})"
        if node["type"] in VIRTUAL_NODES:
            assert len(node["widgets_values"]) == 1 and isinstance(node["widgets_values"][0], str), where
            continue
        assert node["type"] in object_info, f"{where}: unknown node type"
        info = object_info[node["type"]]
        values = widget_values_by_name(node, info)
        sockets = []
        for name, kind, options in ordered_inputs(info):
            if is_widget(kind, options):
                check_widget_value(kind, options, values[name], f"{where}.{name}", FILE_COMBOS)
            else:
                sockets.append((name, kind, name in info["input"]["required"]))
        assert [(s["name"], s["type"]) for s in node["inputs"]] == [(name, kind) for name, kind, _ in sockets], where
        for (name, _, required), socket in zip(sockets, node["inputs"]):
            assert socket["link"] is not None or not required, f"{where}: required input {name!r} is not connected"
        assert [output["type"] for output in node["outputs"]] == info["output"], where

    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        output = nodes_by_id[source]["outputs"][slot]
        socket = nodes_by_id[target]["inputs"][target_slot]
        assert link_id in output["links"] and socket["link"] == link_id, f"{path.name} link {link_id}"
        assert kind == output["type"] and types_match(output["type"], socket["type"]), (
            f"{path.name} link {link_id}: {output['type']} -> {socket['type']} recorded as {kind}"
        )

    prompt = to_api(workflow, object_info)
    for node_id, entry in prompt.items():
        missing = set(object_info[entry["class_type"]]["input"]["required"]) - set(entry["inputs"])
        assert not missing, f"{path.name} node {node_id}: {missing}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_is_ready_to_share(path, object_info):
    """Real-size defaults, a core save node, and notes telling the user what to load where."""
    workflow = json.loads(path.read_text())
    by_type = {}
    for node in workflow["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    for sampler in by_type.get("SDVGenDualTaskSampler", []):
        values = widget_values_by_name(sampler, object_info["SDVGenDualTaskSampler"])
        assert (values["frames"], values["steps"], values["cfg"]) == (49, 50, 6.0)
    for encode in by_type.get("SDVGenSubjectReferenceEncode", []):
        values = widget_values_by_name(encode, object_info["SDVGenSubjectReferenceEncode"])
        assert (values["width"], values["height"]) == (720, 480)
    assert by_type.keys() & {"SaveVideo", "SaveAnimatedWEBP"}
    notes = " ".join(node["widgets_values"][0] for kind in VIRTUAL_NODES for node in by_type.get(kind, []))
    for loader in by_type.get("SDVGenLoadLoRA", []):
        values = widget_values_by_name(loader, object_info["SDVGenLoadLoRA"])
        assert values["lora"] in notes and "models/loras" in notes
        assert f"models/CogVideo/{values['model']}" in notes
    # Wan 2.2 TI2V-5B: its pipeline's defaults (50 steps, CFG 5, 1280x704, 121 frames), files named in the note
    for sampler in by_type.get("KSampler", []):
        values = widget_values_by_name(sampler, object_info["KSampler"])
        assert (values["steps"], values["cfg"], values["denoise"]) == (50, 5.0, 1.0)
    for reference in by_type.get("SDVGenWanSubjectReference", []):
        values = widget_values_by_name(reference, object_info["SDVGenWanSubjectReference"])
        assert (values["width"], values["height"], values["length"], values["reference_timestep"]) == (1280, 704, 121, "clean")
    for node_type, (widget, folder) in WAN_FILE_FOLDERS.items():
        for loader in by_type.get(node_type, []):
            assert widget_values_by_name(loader, object_info[node_type])[widget] in notes and folder in notes, node_type
