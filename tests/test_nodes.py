"""The ComfyUI nodes called directly (no ComfyUI): tiny models in a temporary models folder.

Node outputs are checked against the pipeline called by hand with the same settings, host services
(progress bar, previews, cancel, memory) against stand-in `comfy.*` modules recording what they get.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import time
import types
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import T5EncoderModel

from comfy_t5 import wrapper_style_folder, write_comfy_t5
from conftest import draw_subject
from tiny_lora import write_tiny_lora

import nodes
from nodes import host
from nodes.conditioning import CLSPrompt, SubjectReferenceEncode
from nodes.loader import PIPELINE_CACHE, LoadSDVLoRA
from nodes.preview import fit_latent_to_rgb
from nodes.sampling import DualTaskSampler, SDVGenDecode
from nodes.types import FIT_MODES, MEMORY_MODES, PRECISIONS, SCHEDULERS
from sdvgen_core import FitMode, MemoryMode, SDVGenError, encode_reference, insert_cls, prepare_reference_image
from sdvgen_core.errors import LoraLoadError, ModelLoadError
from sdvgen_core.pipeline import DTYPES
from sdvgen_core.pipeline import SCHEDULERS as CORE_SCHEDULERS
from sdvgen_core.pipeline import SDVGenPipeline

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FRAMES, STEPS = 64, 48, 5, 2
PROMPT, SUBJECT = "a red ball rolls on the grass", "ball"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("models")
    (root / "CogVideo").mkdir()
    (root / "CogVideo" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    write_tiny_lora(tiny_model_dir, root / "loras" / "sdvgen" / "tiny.safetensors")
    return root


@pytest.fixture
def models(models_root, monkeypatch):
    monkeypatch.setenv(host.MODELS_DIR_ENV, str(models_root))
    yield models_root
    PIPELINE_CACHE.clear()


def load(lora="sdvgen/tiny.safetensors", strength=1.0, precision="fp32", fuse=False):
    return LoadSDVLoRA().load("tiny", lora, strength, precision, "on_device", fuse)[0]


def comfy_image(pil: Image.Image) -> torch.Tensor:
    """As ComfyUI's Load Image makes it: `[1, H, W, 3]` float 0..1."""
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


def run_graph(model, image=None, mask=None, seed=3, cfg=6.0, reference_guidance=0.0, scheduler="ddim"):
    conditioning, _ = CLSPrompt().encode(model, PROMPT, SUBJECT, "blurry")["result"]
    reference, _ = SubjectReferenceEncode().encode(
        model, comfy_image(draw_subject()) if image is None else image, WIDTH, HEIGHT, "crop", mask
    )
    (latent,) = DualTaskSampler().sample(
        model, conditioning, reference, FRAMES, STEPS, cfg, reference_guidance, seed, scheduler, False
    )
    return latent


def reference_latents_by_hand(pipe, image, subject_mask=None):
    fitted = prepare_reference_image(image, HEIGHT, WIDTH, fit="crop", subject_mask=subject_mask)
    return encode_reference(pipe.vae, fitted, generator=torch.Generator().manual_seed(0))


def test_importing_the_pack_like_comfyui_does_not_import_torch():
    # ComfyUI imports the extension folder as a package named after its path; the node definitions
    # (INPUT_TYPES) must be buildable without torch too, so starting ComfyUI stays fast.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('custom_nodes_x_sdvgen', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)\n"
        "assert 'torch' not in sys.modules, 'import'\n"
        "[cls.INPUT_TYPES() for cls in pack.NODE_CLASS_MAPPINGS.values()]\n"
        "assert 'torch' not in sys.modules, 'INPUT_TYPES'\n"
        "assert pack.nodes.core.sdvgen_core.__name__ == 'custom_nodes_x_sdvgen.sdvgen_core'\n"
        "print(sorted(pack.NODE_DISPLAY_NAME_MAPPINGS.values()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(
        ["CLS Prompt", "Dual-Task Sampler", "Load SDV LoRA", "SDV-Gen Decode", "SDV-Gen Wan CLS Text Encode",
         "SDV-Gen Wan LoRA Loader", "SDV-Gen Wan Subject Reference", "Subject Reference Encode"]
    )


def test_choice_lists_mirror_the_core():
    assert PRECISIONS == ["auto", *DTYPES]
    assert MEMORY_MODES == [mode.value for mode in MemoryMode]
    assert FIT_MODES == [mode.value for mode in FitMode]
    assert SCHEDULERS == list(CORE_SCHEDULERS)


def test_node_definitions_are_complete(models):
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert cls.CATEGORY == "sdvgen"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        assert callable(getattr(cls, cls.FUNCTION))
        for name, (kind, options) in {**spec["required"], **spec.get("optional", {})}.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], f"{node_id}.{name}"
            if isinstance(kind, list):
                assert options.get("default", kind[0]) in kind
        for socket in cls.RETURN_TYPES:  # the native Wan nodes feed core nodes
            assert socket.startswith("SDVGEN_") or socket in ("IMAGE", "STRING") or node_id.startswith("SDVGenWan")
    frames = DualTaskSampler.INPUT_TYPES()["required"]["frames"][1]
    assert (frames["min"], frames["step"], frames["max"] % 4) == (1, 4, 1)
    for name in ("width", "height"):
        size = SubjectReferenceEncode.INPUT_TYPES()["required"][name][1]
        assert size["step"] == size["min"] == 16 and size["default"] % 16 == 0
    assert DualTaskSampler.INPUT_TYPES()["required"]["seed"][1]["control_after_generate"] is True


def test_loader_dropdowns_list_model_folders_and_loras(models, tmp_path):
    required = LoadSDVLoRA.INPUT_TYPES()["required"]
    assert required["model"][0] == ["tiny"]
    assert required["lora"][0] == ["none", "sdvgen/tiny.safetensors"]
    (models / "diffusers" / "vendor").mkdir(parents=True)
    (models / "diffusers" / "vendor" / "other").symlink_to(models / "CogVideo" / "tiny", target_is_directory=True)
    (models / "diffusers" / "not-a-model").mkdir()
    try:
        assert LoadSDVLoRA.INPUT_TYPES()["required"]["model"][0] == ["tiny", "vendor/other"]
    finally:
        (models / "diffusers" / "vendor" / "other").unlink()


def test_loras_are_listed_from_both_lora_folders_without_duplicates(models):
    """models/loras and models/CogVideo/loras (the CogVideoX node pack's folder): each file once."""
    cogvideo_loras = models / "CogVideo" / "loras"
    cogvideo_loras.mkdir()
    try:
        write_tiny_lora(models / "CogVideo" / "tiny", cogvideo_loras / "wrapper_style.safetensors")
        (cogvideo_loras / "sdvgen").mkdir()
        # The same file reached through both folders, and a different file under a label already taken.
        (cogvideo_loras / "same.safetensors").symlink_to(models / "loras" / "sdvgen" / "tiny.safetensors")
        write_tiny_lora(models / "CogVideo" / "tiny", cogvideo_loras / "sdvgen" / "tiny.safetensors")
        files = host.lora_files()
        assert list(files) == ["sdvgen/tiny.safetensors", "cogvideox_loras/sdvgen/tiny.safetensors",
                               "wrapper_style.safetensors"]
        assert files["cogvideox_loras/sdvgen/tiny.safetensors"] == cogvideo_loras / "sdvgen" / "tiny.safetensors"
        assert LoadSDVLoRA.INPUT_TYPES()["required"]["lora"][0] == ["none", *sorted(files)]
        assert LoadSDVLoRA.INPUT_TYPES()["required"]["model"][0] == ["tiny"]  # loras/ is no model folder
        model = load(lora="wrapper_style.safetensors")
        assert Path(PIPELINE_CACHE.pipeline.lora_info.path) == cogvideo_loras / "wrapper_style.safetensors"
        del model
    finally:
        shutil.rmtree(cogvideo_loras)


def test_missing_files_say_where_to_put_them(models):
    with pytest.raises(ModelLoadError, match="'CogVideoX-5b' not found") as error:
        LoadSDVLoRA().load("CogVideoX-5b", "none", 1.0, "fp32", "on_device", False)
    assert str(models / "CogVideo") in str(error.value)
    with pytest.raises(LoraLoadError, match="not found") as error:
        LoadSDVLoRA().load("tiny", "missing.safetensors", 1.0, "fp32", "on_device", False)
    assert str(models / "loras") in str(error.value) and str(models / "CogVideo" / "loras") in str(error.value)
    with pytest.raises(ModelLoadError, match="text encoder file 't5xxl.safetensors' not found") as error:
        LoadSDVLoRA().load("tiny", "none", 1.0, "fp32", "on_device", False, "t5xxl.safetensors")
    assert str(models / "text_encoders") in str(error.value)


def comfy_validation_errors(cls, **inputs) -> dict[str, str]:
    """What ComfyUI 0.3.64 reports for `inputs` (execution.py validate_inputs): a failed VALIDATE_INPUTS is
    attached to each input named in its signature, `{input_name: details}`; inputs outside the signature are
    left to ComfyUI's own checks and not passed."""
    names = inspect.signature(cls.VALIDATE_INPUTS).parameters
    result = cls.VALIDATE_INPUTS(**{name: inputs[name] for name in names})
    return {} if result is True else {name: f"{name} - {result}" for name in names}


@pytest.mark.parametrize("width, height, marked", [
    (720, 480, None), (16, 2048, None), (700, 480, "width=700"), (720, 470, "height=470"),
    (8, 480, "width=8"), (724, 480, "width=724"), (720, 488, "height=488"), (712, 472, "width=712 and height=472"),
])
def test_video_size_is_validated_before_running(width, height, marked):
    errors = comfy_validation_errors(SubjectReferenceEncode, width=width, height=height, fit="crop")
    if marked is None:
        assert errors == {}
    else:
        assert set(errors) == {"width", "height"}  # one concern: ComfyUI marks both sides of the size
        assert all(f"{marked} must be a multiple of 16" in message for message in errors.values())


@pytest.mark.parametrize("frames, ok", [(1, True), (5, True), (49, True), (2, False), (48, False), (50, False),
                                        (53, False), (0, False)])
def test_frames_are_validated_before_running(frames, ok):
    errors = comfy_validation_errors(DualTaskSampler, frames=frames, steps=2, cfg=6.0, reference_guidance=0.0)
    if ok:
        assert errors == {}
    else:
        assert list(errors) == ["frames"] and f"frames={frames} must be 4k+1" in errors["frames"]
    if frames == 48:
        assert "nearest are 45 and 49" in errors["frames"]


@pytest.mark.parametrize("cls, name, others", [
    (LoadSDVLoRA, "lora_strength", {"model": "tiny", "lora": "none"}),
    (SDVGenDecode, "tile_overlap", {"tile_height": 240, "tile_width": 360}),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_on_their_own_input(cls, name, others, value):
    assert comfy_validation_errors(cls, **{name: value}, **others) == {name: f"{name} - {name}={value} is not a finite number"}
    assert comfy_validation_errors(cls, **{name: 0.25}, **others) == {}


def test_cls_prompt_subject_is_validated_before_running():
    assert comfy_validation_errors(CLSPrompt, prompt=PROMPT, subject=SUBJECT, negative_prompt="") == {}
    errors = comfy_validation_errors(CLSPrompt, prompt=PROMPT, subject="giraffe", negative_prompt="")
    assert set(errors) == {"prompt", "subject"} and "'giraffe' does not occur in the prompt" in errors["subject"]
    assert "prompt is empty" in comfy_validation_errors(CLSPrompt, prompt="  ", subject="", negative_prompt="")["prompt"]
    assert comfy_validation_errors(CLSPrompt, prompt=None, subject="giraffe", negative_prompt="") == {}  # linked


def test_non_finite_guidance_stops_the_sampler_before_sampling(models):
    model = load(lora="none")
    conditioning, _ = CLSPrompt().encode(model, PROMPT, SUBJECT, "")["result"]
    reference, _ = SubjectReferenceEncode().encode(model, comfy_image(draw_subject()), WIDTH, HEIGHT, "crop")
    with pytest.raises(SDVGenError, match="reference_guidance=nan is not a finite number"):
        DualTaskSampler().sample(model, conditioning, reference, FRAMES, STEPS, 6.0, float("nan"), 0, "ddim", False)


def test_text_encoder_files_are_listed_and_a_wrapper_folder_samples_with_one(models, tiny_model_dir, monkeypatch):
    """A CogVideoX-pack folder (no text_encoder/, tokenizer/) + a T5 file from models/text_encoders or models/clip."""
    encoder = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder")
    write_comfy_t5(encoder, models / "text_encoders" / "t5xxl_fp16.safetensors", "fp32")
    write_comfy_t5(encoder, models / "clip" / "t5xxl_fp8_e4m3fn_scaled.safetensors", "fp8_e4m3fn_scaled")
    wrapper = wrapper_style_folder(tiny_model_dir, models / "CogVideo" / "CogVideoX-5b")
    try:
        choices = LoadSDVLoRA.INPUT_TYPES()["optional"]["text_encoder"][0]
        assert choices == ["from model folder", "t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"]
        with pytest.raises(ModelLoadError, match="models/text_encoders and choose it as the text encoder"):
            LoadSDVLoRA().load("CogVideoX-5b", "none", 1.0, "fp32", "on_device", False)
        assert PIPELINE_CACHE.pipeline is None
        # Outside ComfyUI there is no host tokenizer: the tiny model's stands in for comfy/text_encoders/t5_tokenizer.
        monkeypatch.setattr(host, "t5_tokenizer_dir", lambda: tiny_model_dir / "tokenizer")
        model = LoadSDVLoRA().load("CogVideoX-5b", "sdvgen/tiny.safetensors", 1.0, "fp32", "on_device", False,
                                   "t5xxl_fp16.safetensors")[0]
        assert model.base.text_encoder == models / "text_encoders" / "t5xxl_fp16.safetensors"
        from_file = run_graph(model).latents
        PIPELINE_CACHE.clear()
        expected = run_graph(load()).latents
        torch.testing.assert_close(from_file, expected)
        scaled = LoadSDVLoRA().load("CogVideoX-5b", "sdvgen/tiny.safetensors", 1.0, "fp32", "on_device", False,
                                    "t5xxl_fp8_e4m3fn_scaled.safetensors")[0]
        assert run_graph(scaled).latents.shape == expected.shape
    finally:
        PIPELINE_CACHE.clear()
        shutil.rmtree(wrapper)
        shutil.rmtree(models / "text_encoders")
        shutil.rmtree(models / "clip")


def test_loading_again_reuses_the_model_and_loaders_share_one_base(models):
    first = load(strength=1.0)
    pipe = PIPELINE_CACHE.pipeline
    assert first.pipeline() is pipe and load(strength=1.0) == first
    second = load(strength=0.25)
    assert PIPELINE_CACHE.pipeline is pipe and second.pipeline() is pipe
    assert load(lora="none").pipeline().lora_info is None and PIPELINE_CACHE.pipeline is pipe
    bf16 = load(precision="bf16")
    assert PIPELINE_CACHE.pipeline is not pipe and PIPELINE_CACHE.pipeline.transformer.dtype == torch.bfloat16
    assert bf16.pipeline() is PIPELINE_CACHE.pipeline


def test_model_is_freed_when_comfyui_drops_the_loader_outputs(models):
    import gc
    import weakref

    handle = load(strength=1.0)
    pipe = weakref.ref(PIPELINE_CACHE.pipeline)
    del handle
    gc.collect()
    assert pipe() is None and PIPELINE_CACHE.pipeline is None  # only node outputs kept it alive
    assert load(strength=1.0).pipeline() is PIPELINE_CACHE.pipeline  # and it loads again when asked


def test_graph_equals_the_pipeline_called_by_hand(models):
    strong, weak = load(strength=1.0), load(strength=0.3)
    weak_latent = run_graph(weak)
    strong_latent = run_graph(strong)  # after the weak loader changed the shared model
    assert run_graph(weak).latents.equal(weak_latent.latents)

    pipe = SDVGenPipeline.from_model_dir(
        models / "CogVideo" / "tiny", dtype="fp32", lora_path=models / "loras" / "sdvgen" / "tiny.safetensors",
        lora_strength=1.0,
    )
    expected = pipe(
        insert_cls(PROMPT, SUBJECT), reference_latents=reference_latents_by_hand(pipe, draw_subject()),
        negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS,
        guidance_scale=6.0, generator=torch.Generator().manual_seed(3), output_type="latent",
    ).latents
    torch.testing.assert_close(strong_latent.latents, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weak_latent.latents, expected, atol=1e-3)
    # fused with strength 0.3 again matches: fuse is a speed setting, not a different model
    fused = run_graph(load(strength=0.3, fuse=True))
    torch.testing.assert_close(fused.latents, weak_latent.latents, rtol=1e-3, atol=1e-4)


def test_a_lora_file_replaced_on_disk_is_loaded_again(models):
    name = "replaced.safetensors"
    path = models / "loras" / name
    write_tiny_lora(models / "CogVideo" / "tiny", path, seed=1)
    try:
        before_id = LoadSDVLoRA.IS_CHANGED(lora=name, model="tiny", lora_strength=1.0)
        before = run_graph(load(lora=name)).latents
        time.sleep(0.01)  # a new modification time even on coarse clocks
        write_tiny_lora(models / "CogVideo" / "tiny", path.with_suffix(".tmp"), seed=2).replace(path)
        assert LoadSDVLoRA.IS_CHANGED(lora=name, model="tiny", lora_strength=1.0) != before_id  # ComfyUI re-runs it
        handle = load(lora=name)
        after = run_graph(handle).latents
        assert not torch.allclose(after, before, atol=1e-4)
        assert handle.pipeline().lora_info.is_file(path)
    finally:
        path.unlink()
    assert LoadSDVLoRA.IS_CHANGED(lora="none", model="tiny") is None


def test_a_bad_lora_fails_on_the_loader_and_leaves_no_half_state(models):
    good = run_graph(load()).latents
    broken = models / "loras" / "broken.safetensors"
    save_file({"not_a_lora": torch.zeros(2)}, str(broken))
    try:
        with pytest.raises(LoraLoadError, match="broken.safetensors"):
            load(lora="broken.safetensors")
    finally:
        broken.unlink()
    assert run_graph(load()).latents.equal(good)
    assert not torch.allclose(run_graph(load(lora="none")).latents, good, atol=1e-3)  # the LoRA is really off


def test_cls_prompt_shows_and_encodes_the_final_prompt(models):
    model = load()
    out = CLSPrompt().encode(model, "  a red ball rolls on the grass ", "ball", "")
    conditioning, text = out["result"]
    assert text == "a red <cls> ball rolls on the grass" and out["ui"]["text"] == [text]
    pipe = model.pipeline()
    torch.testing.assert_close(conditioning.prompt_embeds, pipe._get_t5_prompt_embeds(text))
    torch.testing.assert_close(conditioning.negative_prompt_embeds, pipe._get_t5_prompt_embeds(""))
    assert CLSPrompt().encode(model, "a ball", "", "")["result"][1] == "<cls> a ball"
    with pytest.raises(SDVGenError, match="'cat' does not occur"):
        CLSPrompt().encode(model, "a ball", "cat", "")
    with pytest.raises(SDVGenError, match="prompt is empty"):
        CLSPrompt().encode(model, "  ", "", "")


def test_reference_uses_the_first_image_and_load_image_masks(models):
    model = load()
    encode = SubjectReferenceEncode().encode
    rgba = draw_subject(mode="RGBA")
    image = comfy_image(rgba)
    batch = torch.cat([image, torch.zeros_like(image)])
    reference, fitted = encode(model, batch, WIDTH, HEIGHT, "crop")
    assert fitted.shape == (1, HEIGHT, WIDTH, 3) and (reference.width, reference.height) == (WIDTH, HEIGHT)
    torch.testing.assert_close(reference.latents, reference_latents_by_hand(model.pipeline(), image[0].permute(2, 0, 1)))

    # Load Image's MASK is 1 - alpha (1 = background): the node must blank exactly the transparent part.
    alpha = torch.from_numpy(np.asarray(rgba, dtype=np.float32)[:, :, 3] / 255.0)
    masked, masked_fitted = encode(model, image, WIDTH, HEIGHT, "crop", (1.0 - alpha)[None])
    by_hand = reference_latents_by_hand(model.pipeline(), rgba)
    torch.testing.assert_close(masked.latents, by_hand)
    assert masked_fitted[0, 0, 0].tolist() == [1.0, 1.0, 1.0]  # corner is background: blanked to white
    # an image without alpha gets a 64x64 all-zero mask from Load Image: nothing is blanked
    unmasked, _ = encode(model, image, WIDTH, HEIGHT, "crop", torch.zeros(1, 64, 64))
    torch.testing.assert_close(unmasked.latents, reference.latents)
    with pytest.raises(SDVGenError, match="multiples of 16"):
        encode(model, image, 70, HEIGHT, "crop")


def test_reference_node_refuses_nan_and_reads_odd_ranges(models):
    model = load()
    encode = SubjectReferenceEncode().encode
    image = comfy_image(draw_subject())
    reference, _ = encode(model, image, WIDTH, HEIGHT, "crop")
    scaled, _ = encode(model, image * 255.0, WIDTH, HEIGHT, "crop")  # a node that outputs 0..255 values
    torch.testing.assert_close(scaled.latents, reference.latents)
    poisoned = image.clone()
    poisoned[0, 5, 5, 1] = float("nan")
    with pytest.raises(SDVGenError, match="reference image has NaN"):
        encode(model, poisoned, WIDTH, HEIGHT, "crop")
    with pytest.raises(SDVGenError, match="mask has NaN"):
        encode(model, image, WIDTH, HEIGHT, "crop", torch.full((1, 64, 64), float("nan")))


def test_decode_returns_comfy_frames(models):
    model = load()
    latent = run_graph(model)
    (frames,) = SDVGenDecode().decode(model, latent, False, 240, 360, 0.2)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    torch.testing.assert_close(frames, model.pipeline().decode(latent.latents)[0].permute(0, 2, 3, 1))
    (tiled,) = SDVGenDecode().decode(model, latent, True, 64, 64, 0.25)
    assert tiled.shape == frames.shape


def test_inputs_from_another_model_are_refused(models):
    model = load()
    latent = run_graph(model)
    other = type(model)(base=type(model.base)(Path("/elsewhere"), "fp32", "cpu"), lora=model.lora, memory_mode="on_device")
    with pytest.raises(SDVGenError, match="connect the same Load SDV LoRA"):
        SDVGenDecode().decode(other, latent, False, 240, 360, 0.2)


class FakeInterrupt(Exception):
    pass


@pytest.fixture
def fake_host(monkeypatch):
    """Stand-ins for the `comfy` modules the nodes use, recording the calls."""
    record = types.SimpleNamespace(bars=[], interrupt_after=None, checks=0, emptied=0, unloaded=0)

    class ProgressBar:
        def __init__(self, total):
            self.total, self.updates = total, []
            record.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total, preview))

    def throw_exception_if_processing_interrupted():
        record.checks += 1
        if record.interrupt_after is not None and record.checks > record.interrupt_after:
            raise FakeInterrupt()

    class LatentPreviewMethod(Enum):
        NoPreviews = "none"
        Auto = "auto"

    management = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"),
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
        soft_empty_cache=lambda: setattr(record, "emptied", record.emptied + 1),
        unload_all_models=lambda: setattr(record, "unloaded", record.unloaded + 1),
        should_use_bf16=lambda device=None, **_: device.type == "cuda",
        should_use_fp16=lambda device=None, **_: device.type == "cuda",
    )
    cli_args = types.SimpleNamespace(
        LatentPreviewMethod=LatentPreviewMethod,
        args=types.SimpleNamespace(preview_method=LatentPreviewMethod.Auto, preview_size=128),
    )
    for name, module in {"comfy": types.SimpleNamespace(), "comfy.utils": types.SimpleNamespace(ProgressBar=ProgressBar),
                         "comfy.model_management": management, "comfy.cli_args": cli_args}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return record


def test_progress_previews_and_cancel_through_the_host(models, fake_host):
    model = load(lora="none", precision="auto")  # auto on the host's CPU device: fp32
    assert fake_host.unloaded == 1 and PIPELINE_CACHE.base.precision == "fp32"
    run_graph(model)
    bar = fake_host.bars[-1]
    assert bar.total == STEPS and [(v, t) for v, t, _ in bar.updates] == [(1, STEPS), (2, STEPS)]
    kind, image, size = bar.updates[-1][2]
    assert (kind, size) == ("JPEG", 128) and image.size == (WIDTH // 8, HEIGHT // 8)

    fake_host.checks, fake_host.interrupt_after, emptied = 0, 1, fake_host.emptied
    with pytest.raises(FakeInterrupt):
        run_graph(model)
    assert fake_host.checks == 2  # stopped in the step callback right after the second step
    assert fake_host.emptied == emptied + 1
    assert len(fake_host.bars[-1].updates) == 1


def test_preview_map_is_fitted_to_the_vae():
    # A VAE whose latent is an exact affine function of the colour: the fit must recover its inverse.
    mix = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    offset = torch.randn(16, generator=torch.Generator().manual_seed(1))

    class LinearVAE(torch.nn.Module):
        config = types.SimpleNamespace(scaling_factor=0.5)

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def encode(self, video):
            latent = torch.einsum("bcthw,cl->blthw", video, mix) + offset[None, :, None, None, None]
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=latent[:, :, :, ::8, ::8] * 2.0))

    factors = fit_latent_to_rgb(LinearVAE())
    rgb = torch.rand(10, 3) * 2 - 1
    latents = rgb @ mix + offset  # the scaling factor 0.5 undoes the * 2.0
    torch.testing.assert_close(latents @ factors[:-1] + factors[-1], rgb, atol=1e-4, rtol=1e-4)
