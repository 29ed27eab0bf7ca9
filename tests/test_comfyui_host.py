"""The shipped workflows run in a real ComfyUI (skipped unless COMFYUI_ROOT points at a ComfyUI checkout).

    COMFYUI_ROOT=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy/venv/bin/python python -m pytest tests/test_comfyui_host.py

COMFYUI_PYTHON is the interpreter of that ComfyUI (default: this one); it needs requirements.txt installed.
The test links this repository into `custom_nodes/`, writes the tiny random model and tiny LoRAs into
`models/` under the names the workflows use (it refuses to run rather than overwrite files that are
already there), starts ComfyUI on 127.0.0.1 with --cpu and only this extension, turns every workflow
into the API format with the host's /object_info, shrinks size, frames and steps for the CPU, queues it
and checks the saved video and the progress/preview messages. Everything it placed is removed afterwards;
inputs, outputs, temp and user files live in a temporary folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import av
import pytest
from PIL import Image, ImageSequence

from comfy_t5 import wrapper_style_folder, write_comfy_t5
from comfy_workflow import CORE_NODES, combo_choices, ordered_inputs, to_api
from conftest import draw_subject
from tiny_lora import write_tiny_lora

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")
pytestmark = pytest.mark.skipif(not COMFYUI_ROOT, reason="set COMFYUI_ROOT to a ComfyUI checkout to run the real-host test")

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
MODEL_NAME = "CogVideoX-5b"
LORA_NAMES = ("sdvgen_lora.safetensors", "pytorch_lora_weights_transformer.safetensors")
# As the CogVideoX node pack downloads it (no text_encoder/, tokenizer/), with a T5 file in models/text_encoders
# and a LoRA in the pack's models/CogVideo/loras.
WRAPPER_MODEL_NAME = "CogVideoX-5b-sdvgen-host-test-wrapper"
T5_FILE_NAME = "sdvgen_host_test_t5xxl_fp8_e4m3fn_scaled.safetensors"
COGVIDEO_LORA_NAME = "sdvgen_host_test_cogvideo_lora.safetensors"
WIDTH, HEIGHT, FRAMES, STEPS = 64, 48, 9, 3  # small enough for the CPU, still 3 latent frames
START_TIMEOUT, RUN_TIMEOUT = 300, 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyUI:
    def __init__(self, port: int, process: subprocess.Popen, log: Path, output: Path) -> None:
        self.url, self.process, self.log, self.output = f"http://127.0.0.1:{port}", process, log, output
        self.port, self.client_id = port, uuid.uuid4().hex
        self.events: EventListener | None = None

    def listen(self) -> EventListener:
        """Start collecting the progress and preview messages of the prompts queued from now on."""
        self.events = EventListener(self.port, self.client_id)
        self.events.start()
        return self.events

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_status(self, path: str, payload: dict) -> tuple[int, dict | None]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        return status, json.loads(body) if body else None

    def post(self, path: str, payload: dict):
        status, body = self.post_status(path, payload)
        assert status == 200, f"POST {path} -> {status}: {body}"
        return body

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT} s:\n{self.log_tail()}")


class EventListener(threading.Thread):
    """Minimal websocket client (stdlib only) collecting what ComfyUI sends to one client id.

    Keeps `progress` messages and the JPEG previews (binary event 1, image type 1) the sampler's progress
    bar sends; the server sends unmasked frames and, with this client declaring no features, old-style previews.
    """

    def __init__(self, port: int, client_id: str) -> None:
        super().__init__(daemon=True)
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.connection.sendall(
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.stream = self.connection.makefile("rb")
        status = self.stream.readline()
        assert b" 101 " in status, status
        while self.stream.readline() not in (b"\r\n", b""):
            pass
        self.connection.settimeout(None)
        self.progress: list[dict] = []
        self.previews: list[Image.Image] = []

    def frame(self) -> tuple[int, bytes]:
        first, second = self.stream.read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", self.stream.read(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self.stream.read(8))[0]
        return first & 0x0F, self.stream.read(length)

    def run(self) -> None:
        try:
            while True:
                opcode, payload = self.frame()
                if opcode == 1:
                    message = json.loads(payload)
                    if message["type"] == "progress":
                        self.progress.append(message["data"])
                elif opcode == 2 and struct.unpack(">II", payload[:8]) == (1, 1):
                    self.previews.append(Image.open(io.BytesIO(payload[8:])))
                elif opcode == 8:
                    return
        except (OSError, ValueError):
            return


def write_host_t5(model_dir: Path, path: Path) -> None:
    """The tiny model's T5 with a table as long as T5-XXL's (32128 rows), so ComfyUI's own T5 tokenizer fits it,
    as a ComfyUI fp8-scaled file."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(model_dir / "text_encoder")
    config.vocab_size = 32128
    torch.manual_seed(0)
    write_comfy_t5(T5EncoderModel(config), path, "fp8_e4m3fn_scaled")


def place(path: Path, created: list[Path]) -> Path:
    """Reserve `path` (and any folders made for it) for removal afterwards; skip rather than overwrite."""
    if path.exists() or path.is_symlink():
        pytest.skip(f"{path} already exists; the real-host test never overwrites it (move it away to run the test)")
    missing = path.parent
    while not missing.parent.exists():
        missing = missing.parent
    if not missing.exists():
        created.append(missing)
    path.parent.mkdir(parents=True, exist_ok=True)
    created.append(path)
    return path


def start_comfyui(root: Path, python: str, work: Path, extensions: list[str]) -> tuple[subprocess.Popen, ComfyUI]:
    """ComfyUI on a free local port with --cpu and only `extensions` (folders in custom_nodes/), listening."""
    port = free_port()
    log = work / "comfyui.log"
    process = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--preview-method", "auto",
         "--disable-all-custom-nodes", "--whitelist-custom-nodes", *extensions, "--disable-auto-launch",
         "--input-directory", str(work / "input"), "--output-directory", str(work / "output"),
         "--temp-directory", str(work / "temp"), "--user-directory", str(work / "user")],
        cwd=root, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    server = ComfyUI(port, process, log, work / "output")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise AssertionError(f"ComfyUI exited at start:\n{server.log_tail()}")
        try:
            server.get("/system_stats")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                process.terminate()
                raise AssertionError(f"ComfyUI did not start:\n{server.log_tail()}") from None
            time.sleep(1)
    server.listen()
    return process, server


def stop_comfyui(process: subprocess.Popen | None) -> None:
    if process is not None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    root = Path(COMFYUI_ROOT).resolve()
    assert (root / "main.py").is_file(), f"COMFYUI_ROOT={root} is not a ComfyUI checkout (no main.py)"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    work = tmp_path_factory.mktemp("comfyui-host")
    created: list[Path] = []
    process = None
    try:
        extension = f"sdvgen_host_test_{uuid.uuid4().hex[:8]}"
        place(root / "custom_nodes" / extension, created).symlink_to(REPO, target_is_directory=True)
        model_dir = place(root / "models" / "CogVideo" / MODEL_NAME, created)
        subprocess.run([sys.executable, "-m", "sdvgen_core", "tiny-model", str(model_dir)], cwd=REPO, check=True,
                       capture_output=True)
        for seed, name in enumerate(LORA_NAMES, start=1):
            write_tiny_lora(model_dir, place(root / "models" / "loras" / name, created), seed=seed)
        write_tiny_lora(model_dir, place(root / "models" / "CogVideo" / "loras" / COGVIDEO_LORA_NAME, created), seed=9)
        wrapper_style_folder(model_dir, place(root / "models" / "CogVideo" / WRAPPER_MODEL_NAME, created))
        write_host_t5(model_dir, place(root / "models" / "text_encoders" / T5_FILE_NAME, created))
        (work / "input").mkdir()
        (work / "user").mkdir()
        draw_subject(size=(120, 90), mode="RGBA").save(work / "input" / "subject.png")

        process, server = start_comfyui(root, python, work, [extension])
        yield server
    finally:
        stop_comfyui(process)
        for path in reversed(created):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)


@pytest.fixture(scope="module")
def object_info(comfyui):
    info = comfyui.get("/object_info")
    assert "SDVGenLoadLoRA" in info, f"the extension did not load:\n{comfyui.log_tail()}"
    return info


def test_host_lists_our_nodes_and_tiny_files(object_info):
    assert object_info["SDVGenLoadLoRA"]["display_name"] == "Load SDV LoRA"
    loader = object_info["SDVGenLoadLoRA"]["input"]["required"]
    assert {MODEL_NAME, WRAPPER_MODEL_NAME} <= set(loader["model"][0])
    assert {*LORA_NAMES, COGVIDEO_LORA_NAME} <= set(loader["lora"][0])
    assert len(loader["lora"][0]) == len(set(loader["lora"][0]))
    text_encoders = object_info["SDVGenLoadLoRA"]["input"]["optional"]["text_encoder"][0]
    assert text_encoders[0] == "from model folder" and T5_FILE_NAME in text_encoders
    assert object_info["SDVGenDualTaskSampler"]["output"] == ["SDVGEN_LATENT"]


def test_core_nodes_listed_in_the_ci_test_match_the_host(object_info):
    for node_type, ours in CORE_NODES.items():
        host = object_info[node_type]
        assert host["output"] == ours["output"], node_type
        host_inputs = [(name, kind if not isinstance(kind, list) and kind != "COMBO" else "COMBO")
                       for name, kind, _ in ordered_inputs(host)]
        our_inputs = [(name, kind if not isinstance(kind, list) and kind != "COMBO" else "COMBO")
                      for name, kind, _ in ordered_inputs(ours)]
        assert host_inputs == our_inputs, node_type
        for (name, kind, options), (_, host_kind, host_options) in zip(ordered_inputs(ours), ordered_inputs(host)):
            if combo_choices(kind, options):
                assert combo_choices(kind, options) == combo_choices(host_kind, host_options), f"{node_type}.{name}"
            for key in ("min", "max", "image_upload"):
                assert options.get(key) == host_options.get(key), f"{node_type}.{name}.{key}"


def shrink(prompt: dict) -> dict:
    """The same graph at CPU size."""
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] == "SDVGenSubjectReferenceEncode":
            inputs.update(width=WIDTH, height=HEIGHT)
        elif entry["class_type"] == "SDVGenDualTaskSampler":
            inputs.update(frames=FRAMES, steps=STEPS)
    return prompt


def saved_files(comfyui, entry: dict, node_type: str) -> list[Path]:
    files = []
    for node_id, output in entry["outputs"].items():
        if entry["prompt_class_types"][node_id] == node_type:
            for item in output.get("images", []):
                files.append(comfyui.output / item["subfolder"] / item["filename"])
    return files


@pytest.mark.parametrize(
    "name, saver, width",
    [
        ("sdvgen_subject_to_video", "SaveVideo", WIDTH),
        ("sdvgen_identity_strength_comparison", "SaveAnimatedWEBP", 2 * WIDTH + 16),  # side by side, 16 px apart
        ("sdvgen_released_checkpoint", "SaveVideo", WIDTH),
    ],
)
def test_workflow_runs_in_comfyui(comfyui, object_info, name, saver, width):
    prompt = shrink(to_api(json.loads((WORKFLOWS / f"{name}.json").read_text()), object_info))
    seen_progress, seen_previews = len(comfyui.events.progress), len(comfyui.events.previews)
    prompt_id = comfyui.queue(prompt)
    entry = comfyui.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1) + comfyui.log_tail()
    entry["prompt_class_types"] = {node_id: node["class_type"] for node_id, node in prompt.items()}
    (path,) = saved_files(comfyui, entry, saver)
    if saver == "SaveVideo":
        with av.open(str(path)) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
    else:
        with Image.open(path) as image:
            frames = [frame.copy() for frame in ImageSequence.Iterator(image)]
    assert len(frames) == FRAMES and frames[0].size == (width, HEIGHT), (path, len(frames), frames[0].size)
    if name == "sdvgen_subject_to_video":
        (text,) = [o["text"] for i, o in entry["outputs"].items() if entry["prompt_class_types"][i] == "PreviewAny"]
        assert "<cls> robot" in text[0]

    # the sampler's progress bar went step by step to the end, with a latent preview per step
    samplers = {i for i, node in prompt.items() if node["class_type"] == "SDVGenDualTaskSampler"}
    time.sleep(1)  # messages are sent asynchronously
    steps = [(p["node"], p["value"], p["max"]) for p in comfyui.events.progress[seen_progress:] if p["node"] in samplers]
    assert steps == [(node, value, STEPS) for node in sorted(samplers, key=lambda i: steps.index((i, 1, STEPS)))
                     for value in range(1, STEPS + 1)], steps
    previews = comfyui.events.previews[seen_previews:]
    assert len(previews) == STEPS * len(samplers)
    assert all(preview.format == "JPEG" and preview.size[0] * HEIGHT == preview.size[1] * WIDTH for preview in previews)


def test_cancel_stops_the_sampler(comfyui, object_info):
    prompt = shrink(to_api(json.loads((WORKFLOWS / "sdvgen_released_checkpoint.json").read_text()), object_info))
    (sampler,) = [i for i, node in prompt.items() if node["class_type"] == "SDVGenDualTaskSampler"]
    prompt[sampler]["inputs"].update(steps=500, seed=7)  # long enough to be mid-sampling when cancelled
    seen = len(comfyui.events.progress)
    prompt_id = comfyui.queue(prompt)
    deadline = time.monotonic() + RUN_TIMEOUT

    def sampler_steps():
        return [p["value"] for p in comfyui.events.progress[seen:] if p["node"] == sampler]

    while len(sampler_steps()) < 2:
        assert time.monotonic() < deadline, comfyui.log_tail()
        time.sleep(0.05)
    comfyui.post("/interrupt", {})
    entry = comfyui.wait(prompt_id)
    messages = dict(entry["status"]["messages"])
    assert "execution_interrupted" in messages, entry["status"]
    assert messages["execution_interrupted"]["node_type"] == "SDVGenDualTaskSampler"
    assert max(sampler_steps()) < 100  # stopped right away, not after the 500 steps
    # the host samples again afterwards (a new seed, so the sampler really runs)
    prompt[sampler]["inputs"].update(steps=STEPS, seed=8)
    assert comfyui.wait(comfyui.queue(prompt))["status"]["status_str"] == "success"


def subject_to_video_prompt(object_info) -> dict:
    return shrink(to_api(json.loads((WORKFLOWS / "sdvgen_subject_to_video.json").read_text()), object_info))


def node_of(prompt: dict, class_type: str) -> str:
    (node_id,) = [i for i, node in prompt.items() if node["class_type"] == class_type]
    return node_id


def test_wrapper_folder_with_the_single_file_text_encoder_runs(comfyui, object_info):
    """The node pack's folder (no text_encoder/, tokenizer/) + a T5 file + ComfyUI's own T5 tokenizer."""
    prompt = subject_to_video_prompt(object_info)
    loader = node_of(prompt, "SDVGenLoadLoRA")
    prompt[loader]["inputs"].update(model=WRAPPER_MODEL_NAME, text_encoder=T5_FILE_NAME, lora=COGVIDEO_LORA_NAME)
    entry = comfyui.wait(comfyui.queue(prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1) + comfyui.log_tail()
    (text,) = [o["text"] for i, o in entry["outputs"].items() if prompt[i]["class_type"] == "PreviewAny"]
    assert "<cls> robot" in text[0]


def test_wrapper_folder_without_a_text_encoder_names_both_fixes(comfyui, object_info):
    prompt = subject_to_video_prompt(object_info)
    prompt[node_of(prompt, "SDVGenLoadLoRA")]["inputs"].update(model=WRAPPER_MODEL_NAME)
    entry = comfyui.wait(comfyui.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    error = dict(entry["status"]["messages"])["execution_error"]
    assert error["node_type"] == "SDVGenLoadLoRA" and error["exception_type"].endswith("ModelLoadError")
    assert "models/text_encoders" in error["exception_message"]
    assert "text_encoder/ and tokenizer/" in error["exception_message"]


@pytest.mark.parametrize("class_type, inputs, error_type, marked", [
    ("SDVGenDualTaskSampler", {"frames": 48}, "custom_validation_failed", {"frames": "frames=48 must be 4k+1"}),
    ("SDVGenDualTaskSampler", {"frames": 53}, "custom_validation_failed", {"frames": "frames=53 must be 4k+1"}),
    ("SDVGenSubjectReferenceEncode", {"width": 700}, "custom_validation_failed",
     {"width": "width=700 must be a multiple of 16", "height": "width=700 must be a multiple of 16"}),
    ("SDVGenLoadLoRA", {"lora": "missing.safetensors"}, "value_not_in_list", {"lora": "missing.safetensors"}),
    ("SDVGenLoadLoRA", {"lora_strength": float("nan")}, "custom_validation_failed",
     {"lora_strength": "lora_strength=nan is not a finite number"}),
])
def test_bad_settings_are_refused_at_validation_on_their_widget(comfyui, object_info, class_type, inputs, error_type,
                                                                marked):
    prompt = subject_to_video_prompt(object_info)
    node = node_of(prompt, class_type)
    prompt[node]["inputs"].update(inputs)
    status, body = comfyui.post_status("/prompt", {"prompt": prompt, "client_id": comfyui.client_id})
    # 400 when no output survives; 200 when ComfyUI still runs the outputs that do not depend on the refused
    # node (e.g. the prompt preview), without the refused node's outputs.
    assert status in (200, 400), body
    errors = body["node_errors"][node]["errors"]
    assert {error["extra_info"]["input_name"] for error in errors} == set(marked), errors
    for error in errors:
        assert error["type"] == error_type
        assert marked[error["extra_info"]["input_name"]] in error["details"], error
    assert set(body["node_errors"]) == {node}  # nothing else blamed
    if status == 200:
        entry = comfyui.wait(body["prompt_id"])
        assert not set(entry["outputs"]) & set(body["node_errors"][node]["dependent_outputs"])
