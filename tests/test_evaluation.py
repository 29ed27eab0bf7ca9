"""The evaluation harness: eval set file, resumable generation, each metric against an independent computation,
reports, `sdvgen evaluate` end to end on the tiny preset with tiny encoders."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdvgen_core.cli import main
from sdvgen_core.errors import SDVGenError
from sdvgen_core.evaluation.evalset import EvalSetError, load_eval_set, make_demo_set
from sdvgen_core.evaluation.generation import generate_videos, video_paths
from sdvgen_core.evaluation.metrics import (ClipScorer, DinoScorer, EncoderLoadError, central_frames, dynamic_degree,
                                            dynamic_thresholds, is_dynamic, load_amt, load_raft, motion_smoothness,
                                            top_flow_magnitude)
from sdvgen_core.evaluation.report import format_table, summarize
from sdvgen_core.evaluation.tiny_encoders import build_tiny_clip, build_tiny_dino


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return build_tiny_dino(tmp_path_factory.mktemp("dino"))


def random_frames(count=6, height=40, width=56, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def write_set(folder, text: str, name="set.yaml"):
    path = folder / name
    path.write_text(text)
    return path


# ----- eval set -----

def test_yaml_and_jsonl_sets_read_alike_with_cls_placement(tmp_path):
    yaml_path = write_set(tmp_path, """
cls_placement: before_subject
subjects:
  - {name: dog, reference: refs/dog.png, subject: dog, prompts: ["a dog runs", "a <cls> dog swims"], seed: 7}
  - {name: mug, reference: refs/mug.png, mask: refs/mug_mask.png, subject: mug, prompts: ["a mug spins"]}
""")
    jsonl_path = write_set(tmp_path, "\n".join(json.dumps(entry) for entry in [
        {"name": "dog", "reference": "refs/dog.png", "subject": "dog", "prompts": ["a dog runs", "a <cls> dog swims"],
         "seed": 7},
        {"name": "mug", "reference": "refs/mug.png", "mask": "refs/mug_mask.png", "subject": "mug",
         "prompts": ["a mug spins"]}]), "set.jsonl")
    from_yaml, from_jsonl = load_eval_set(yaml_path), load_eval_set(jsonl_path)
    assert [v.video_id for v in from_yaml.videos] == ["dog__p0", "dog__p1", "mug__p0"]
    first = from_yaml.videos[1]
    assert first.prompt == "a dog swims"  # the CLIP-T text never carries <cls>
    assert first.generation_prompt == "a <cls> dog swims"
    assert first.seed == 7 and from_yaml.videos[2].seed is None
    assert from_yaml.videos[2].mask == tmp_path / "refs/mug_mask.png"
    # JSONL has no cls_placement: the protocol's prefix
    assert [v.generation_prompt for v in from_jsonl.videos] == ["<cls> a dog runs", "<cls> a dog swims", "<cls> a mug spins"]
    assert [v.prompt for v in from_jsonl.videos] == [v.prompt for v in from_yaml.videos]


@pytest.mark.parametrize("body, message", [
    ("subjects: []", "has no subjects"),
    ("subjects:\n  - {name: a, reference: r.png, subject: x, prompts: [p], colour: red}", "unknown keys ['colour']"),
    ("subjects:\n  - {name: a, reference: r.png, subject: x, prompts: [p]}\n  - {name: a, reference: r.png, subject: x, prompts: [p]}", "used twice"),
    ("subjects:\n  - {name: a, reference: r.png, subject: x, prompts: []}", "`prompts` must be"),
    ("subjects:\n  - {name: a, reference: r.png, subject: x, prompts: [p], seed: -1}", "`seed` must be"),
    ("cls_placement: suffix\nsubjects: []", "cls_placement 'suffix'"),
    ("subjects:\n  - {name: a, reference: r.png, subject: cat, prompts: [a dog runs]}\ncls_placement: before_subject", "'cat' does not occur"),
])
def test_bad_eval_sets_are_refused_by_name(tmp_path, body, message):
    with pytest.raises(SDVGenError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_eval_set(write_set(tmp_path, body))


def test_missing_set_file_is_named(tmp_path):
    with pytest.raises(EvalSetError, match="nope.yaml"):
        load_eval_set(tmp_path / "nope.yaml")


# ----- CLIP / DINO against independent computations -----

class FeaturesAsTensors(torch.nn.Module):
    """torchmetrics 1.9 expects transformers 4's tensors from get_*_features; transformers 5 returns outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        output = self.model.get_image_features(*args, **kwargs)
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_text_features(self, *args, **kwargs):
        output = self.model.get_text_features(*args, **kwargs)
        return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_clip_t_equals_torchmetrics_clip_score(clip_dir):
    from torchmetrics.functional.multimodal import clip_score

    scorer = ClipScorer(clip_dir)
    frames = random_frames()
    images = [torch.from_numpy(frame).permute(2, 0, 1) for frame in frames]
    texts = ["a red ball rolls on the table", "qqqq", "a dog"]
    ours = [scorer.clip_t(frames, text) for text in texts]
    # torchmetrics clamps a negative mean to 0, so the random tiny model must give some positive scores
    assert any(score > 0.01 for score in ours)
    for text, score in zip(texts, ours):
        reference = clip_score(images, [text] * len(frames),
                               model_name_or_path=lambda: (FeaturesAsTensors(scorer.model), scorer.processor))
        assert max(score, 0.0) == pytest.approx(reference.item() / 100, abs=1e-5)


def test_clip_i_equals_a_direct_computation(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    scorer = ClipScorer(clip_dir)
    frames, reference = random_frames(seed=1), random_frames(1, 64, 48, seed=2)[0]
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        def embed(images):
            pixels = processor(images=[Image.fromarray(image) for image in images], return_tensors="pt").pixel_values
            features = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            return features / features.norm(dim=-1, keepdim=True)
        direct = (embed(frames) @ embed([reference]).T).mean().item()
    assert scorer.clip_i(frames, reference) == pytest.approx(direct, abs=1e-5)


def test_dino_i_equals_a_direct_computation(dino_dir):
    from transformers import ViTModel

    scorer = DinoScorer(dino_dir)
    model = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def cls_tokens(images: list[Image.Image]) -> torch.Tensor:
        arrays = []
        for image in images:  # torchvision-style Resize(32, bicubic) + CenterCrop(32), written with PIL
            width, height = image.size
            scale = 32 / min(width, height)
            image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
            left, top = (image.size[0] - 32) // 2, (image.size[1] - 32) // 2
            arrays.append((np.asarray(image.crop((left, top, left + 32, top + 32))) / 255.0 - mean) / std)
        with torch.no_grad():
            tokens = model(pixel_values=torch.tensor(np.stack(arrays)).permute(0, 3, 1, 2).float()).last_hidden_state
        return torch.nn.functional.normalize(tokens[:, 0], dim=-1)

    # At the model's size on the short side only the centre crop acts: equal to float precision.
    frames, reference = random_frames(4, 32, 48, seed=3), random_frames(1, 48, 32, seed=4)[0]
    direct = (cls_tokens([Image.fromarray(f) for f in frames]) @ cls_tokens([Image.fromarray(reference)]).T).mean()
    assert scorer.dino_i(frames, reference) == pytest.approx(direct.item(), abs=1e-5)
    # Larger images are resized first: antialiased bicubic agrees with PIL's bicubic up to rounding.
    smooth = np.stack([np.asarray(Image.fromarray(f).resize((96, 64), Image.BILINEAR)) for f in random_frames(3, 8, 12)])
    direct = (cls_tokens([Image.fromarray(f) for f in smooth]) @ cls_tokens([Image.fromarray(smooth[0])]).T).mean()
    assert scorer.dino_i(smooth, smooth[0]) == pytest.approx(direct.item(), abs=2e-3)


def test_central_frames():
    frames = np.arange(49)
    assert central_frames(frames).tolist() == list(range(16, 32))
    assert central_frames(np.arange(10)).tolist() == list(range(10))


# ----- dynamic degree (VBench RAFT protocol) -----

def phase_correlation_flow(image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
    """A flow estimator for whole-frame translations: the shift from phase correlation, the same at every pixel."""
    assert image1.shape[-2] % 8 == 0 and image1.shape[-1] % 8 == 0  # the protocol pads to multiples of 8
    a, b = torch.fft.fft2(image1.mean(1)), torch.fft.fft2(image2.mean(1))
    cross = b * a.conj()
    peak = torch.fft.ifft2(cross / cross.abs().clamp_min(1e-9)).real[0]
    height, width = peak.shape
    dy, dx = divmod(int(peak.argmax()), width)
    dy, dx = (dy - height if dy > height // 2 else dy), (dx - width if dx > width // 2 else dx)
    return torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1).expand(1, 2, height, width)


def shifting_video(shifts: list[int], size=64, seed=0) -> np.ndarray:
    texture = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.stack([np.roll(texture, int(offset), axis=1) for offset in np.cumsum([0, *shifts])])


def test_top_flow_magnitude_matches_vbench_formula():
    flow = torch.randn(1, 2, 24, 40)
    radius = np.sqrt((flow[0].numpy() ** 2).sum(0)).flatten()
    expected = np.mean(np.abs(np.sort(-radius))[: int(radius.size * 0.05)])
    assert top_flow_magnitude(flow) == pytest.approx(expected, rel=1e-6)


def test_dynamic_degree_separates_moving_from_static():
    # 64 px: threshold 6 * 64 / 256 = 1.5 px; 17 frames need round(4 * 17 / 16) = 4 pairs above it.
    assert dynamic_thresholds(64, 64, 17) == (1.5, 4)
    assert dynamic_thresholds(480, 720, 49) == (11.25, 12)
    moving, static = shifting_video([3] * 16), shifting_video([0] * 16)
    is_moving, scores = dynamic_degree(moving, phase_correlation_flow)
    assert is_moving and scores == pytest.approx([3.0] * 16)
    assert dynamic_degree(static, phase_correlation_flow) == (False, [0.0] * 16)
    # exactly the needed count of moving pairs is dynamic, one fewer is not
    assert dynamic_degree(shifting_video([2] * 4 + [0] * 12), phase_correlation_flow)[0]
    assert not dynamic_degree(shifting_video([2] * 3 + [0] * 13), phase_correlation_flow)[0]
    # slow motion below the threshold is static; a 60 px video is padded to 64 for the estimator
    assert not dynamic_degree(shifting_video([1] * 16), phase_correlation_flow)[0]
    assert dynamic_degree(shifting_video([3] * 16, size=64)[:, 2:62, 2:62], phase_correlation_flow)[0]
    # 24 fps is read at 8 fps: every third frame, so three 1 px steps make one 3 px pair
    assert dynamic_degree(shifting_video([1] * 48), phase_correlation_flow, fps=24)[1] == pytest.approx([3.0] * 16)
    assert is_dynamic([2.0, 2.0, 0.0], 1.5, 2) and not is_dynamic([2.0, 1.5, 0.0], 1.5, 2)


# ----- motion smoothness (VBench AMT protocol) -----

def linear_interpolator(frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
    assert frame0.shape[-2] % 16 == 0 and frame0.shape[-1] % 16 == 0  # the protocol pads to multiples of 16
    return (frame0 + frame1) / 2


@pytest.mark.parametrize("count", [17, 16])
def test_motion_smoothness_of_a_linear_video_is_one(count):
    gradient = np.linspace(0, 120, 40)[None, :, None].round()
    frames = np.stack([np.broadcast_to(gradient + 3 * t, (30, 40, 3)) for t in range(count)]).astype(np.uint8)
    assert motion_smoothness(frames, linear_interpolator) == 1.0


def test_motion_smoothness_equals_vbench_computation_on_a_jerky_video():
    frames = random_frames(9, 30, 40, seed=5)
    # VBench: interpolate the even frames, compare each prediction (uint8, truncated) with the odd frame
    even = frames[::2].astype(np.float32) / np.float32(255)  # float32 like VBench's tensors
    predicted = [((a + b) / np.float32(2) * np.float32(255)).clip(0, 255).astype(np.uint8) for a, b in zip(even[:-1], even[1:])]
    errors = [np.abs(p.astype(int) - o.astype(int)).mean() for p, o in zip(predicted, frames[1::2])]
    expected = (255 - np.mean(errors)) / 255
    assert motion_smoothness(frames, linear_interpolator) == pytest.approx(expected, abs=1e-6)
    assert expected < 0.9


def test_raft_and_amt_loaders_say_what_is_missing(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, weights)
    with pytest.raises(EncoderLoadError, match="must be an existing .safetensors"):
        load_raft(tmp_path / "raft.pth")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(EncoderLoadError, match="torchvision cannot be imported"):
        load_raft(weights)
    monkeypatch.setitem(sys.modules, "vbench", None)
    with pytest.raises(EncoderLoadError, match="AMT-S network from the `vbench` package"):
        load_amt(weights)


def test_torchvision_raft_loads_from_safetensors(tmp_path):
    optical_flow = pytest.importorskip("torchvision.models.optical_flow")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(optical_flow.raft_small(weights=None).state_dict(), tmp_path / "raft_small.safetensors")
    flow = load_raft(tmp_path / "raft_small.safetensors")
    moving, scores = dynamic_degree(shifting_video([3] * 4, size=128), flow)
    assert isinstance(moving, bool) and len(scores) == 4


# ----- generation: resume, bad references -----

def tiny_set(tmp_path, names=("ball", "box")):
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    lines = ["subjects:"]
    for index, name in enumerate(names):
        Image.new("RGB", (48, 32), (40 * index, 100, 200)).save(refs / f"{name}.png")
        lines.append(f"  - {{name: {name}, reference: refs/{name}.png, subject: {name}, "
                     f"prompts: [a {name} rolls, a {name} spins]}}")
    return load_eval_set(write_set(tmp_path, "\n".join(lines)))


class CountingGenerator:
    def __init__(self):
        self.calls = []

    def __call__(self, video, reference, mask, seed):
        self.calls.append((video.video_id, seed))
        value = (len(self.calls) * 20 % 200) / 255
        return torch.full((5, 3, 32, 48), value)


SETTINGS = {"height": 32, "width": 48, "frames": 5, "steps": 1, "fit": "crop", "cfg": 6.0}


def test_resume_skips_finished_videos_and_redoes_broken_ones(tmp_path):
    eval_set, out = tiny_set(tmp_path), tmp_path / "run"
    generator = CountingGenerator()
    first = generate_videos(eval_set, out, generator, SETTINGS, base_seed=42)
    assert sorted(first.generated) == sorted(v.video_id for v in eval_set.videos) and len(generator.calls) == 4
    assert {seed for _, seed in generator.calls} == {42}
    generator.calls.clear()
    again = generate_videos(eval_set, out, generator, SETTINGS, base_seed=42)
    assert generator.calls == [] and len(again.skipped) == 4
    # a truncated mp4 and an mp4 whose sidecar never got written (interrupted) are made again
    truncated, _ = video_paths(out, "ball__p1")
    truncated.write_bytes(truncated.read_bytes()[:200])
    video_paths(out, "box__p0")[1].unlink()
    generate_videos(eval_set, out, generator, SETTINGS, base_seed=42)
    assert sorted(video_id for video_id, _ in generator.calls) == ["ball__p1", "box__p0"]
    with pytest.raises(SDVGenError, match=r"other settings \(differing: cfg\)"):
        generate_videos(eval_set, out, generator, {**SETTINGS, "cfg": 5.0}, base_seed=42)
    with pytest.raises(SDVGenError, match=r"differing: seed"):
        generate_videos(eval_set, out, generator, SETTINGS, base_seed=1)
    Image.new("RGB", (48, 32), (0, 0, 0)).save(tmp_path / "refs" / "box.png")  # another photo, same name
    with pytest.raises(SDVGenError, match=r"box__p0 made with other settings \(differing: reference_sha256\)"):
        generate_videos(eval_set, out, generator, SETTINGS, base_seed=42)


def test_bad_references_fail_only_their_own_videos(tmp_path):
    eval_set = tiny_set(tmp_path, names=("ball", "missing", "corrupt"))
    (tmp_path / "refs" / "missing.png").unlink()
    (tmp_path / "refs" / "corrupt.png").write_bytes(b"not a png at all")
    generator = CountingGenerator()
    result = generate_videos(eval_set, tmp_path / "run", generator, SETTINGS, base_seed=0)
    assert sorted(result.generated) == ["ball__p0", "ball__p1"]
    assert "missing.png" in result.failed["missing__p0"] and "does not exist" in result.failed["missing__p1"]
    assert "corrupt.png" in result.failed["corrupt__p0"] and "cannot be read" in result.failed["corrupt__p0"]


# ----- reports -----

def test_a_metric_without_encoder_is_skipped_not_zero():
    rows = [{"status": "ok", "clip_t": 0.3, "clip_i": None, "dino_i": None, "motion_smoothness": None,
             "dynamic_degree": 1.0}, {"status": "ok", "clip_t": 0.2, "clip_i": None, "dino_i": None,
                                      "motion_smoothness": None, "dynamic_degree": 0.0},
            {"status": "failed: x", "clip_t": None}]
    summary = summarize(rows)
    assert summary == {"clip_t": pytest.approx(0.25), "clip_i": None, "dino_i": None, "motion_smoothness": None,
                       "dynamic_degree": 0.5}
    table = format_table({"run": summary}, {"dino_i": "skipped: no --dino given"})
    assert "| run | 25.0 | skipped | skipped | skipped | 50.0 |" in table and "DINO-I: skipped: no --dino" in table


# ----- `sdvgen evaluate` end to end -----

TINY_RUN = ["--preset", "tiny", "--width", "32", "--height", "32", "--frames", "5", "--steps", "1"]


def test_evaluate_cli_end_to_end_with_compare(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDVGEN_CACHE", str(tmp_path / "cache"))
    demo = tmp_path / "demo"
    assert main(["evaluate", "--make-demo-set", str(demo)]) == 0
    set_file, encoders = demo / "eval_set.yaml", demo / "encoders"
    (demo / "references" / "blue_box.png").write_bytes(b"\x89PNG broken")
    common = ["--set", str(set_file), "--clip", str(encoders / "clip"), "--dino", str(encoders / "dino"), *TINY_RUN]
    assert main(["evaluate", "--out", str(tmp_path / "a"), *common]) == 2  # blue_box failed, red_ball scored
    err = capsys.readouterr().err
    assert "blue_box__p0" in err and "blue_box.png" in err
    rows = list(csv.DictReader(open(tmp_path / "a" / "per_video.csv")))
    assert [row["status"] for row in rows] == ["ok", "ok", *(2 * [rows[2]["status"]])]
    assert rows[2]["status"].startswith("failed") and rows[0]["dino_i"] and rows[0]["motion_smoothness"] == ""
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert report["summary"]["clip_t"] == pytest.approx(np.mean([float(r["clip_t"]) for r in rows[:2]]))
    assert report["summary"]["dynamic_degree"] is None and "--raft" in report["skipped"]["dynamic_degree"]
    assert Image.open(tmp_path / "a" / "contact_sheet.png").size[1] > 4 * 120
    # scoring again without generating (no model): same CLIP-T, DINO-I now skipped
    assert main(["evaluate", "--out", str(tmp_path / "a"), "--set", str(set_file), "--metrics-only",
                 "--clip", str(encoders / "clip")]) == 2
    rescored = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert rescored["summary"]["clip_t"] == pytest.approx(report["summary"]["clip_t"], abs=1e-6)
    assert rescored["summary"]["dino_i"] is None and rescored["settings"] == report["settings"]

    make_demo_set(tmp_path / "fixed", with_encoders=False)  # a readable blue_box again, same names
    fixed = ["--set", str(tmp_path / "fixed" / "eval_set.yaml"), "--clip", str(encoders / "clip"),
             "--dino", str(encoders / "dino"), *TINY_RUN]
    assert main(["evaluate", "--out", str(tmp_path / "b"), *fixed, "--cfg", "2"]) == 0
    assert main(["evaluate", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    compare = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert compare["settings_changed"] == {"cfg": [6.0, 2.0]} and compare["videos"] == 4
    assert "| B - A |" in (tmp_path / "c" / "compare.md").read_text()
    assert Image.open(tmp_path / "c" / "compare_sheet.png").size[0] > Image.open(tmp_path / "a" / "contact_sheet.png").size[0]


def test_evaluate_refuses_bad_options_early(tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path / "x"), "--set", str(tmp_path / "none.yaml"), "--preset", "tiny"]) == 2
    assert "none.yaml" in capsys.readouterr().err
    make_demo_set(tmp_path / "demo", with_encoders=False)
    args = ["evaluate", "--out", str(tmp_path / "x"), "--set", str(tmp_path / "demo" / "eval_set.yaml")]
    assert main(args) == 2 and "--model DIR or --preset tiny" in capsys.readouterr().err
    assert main([*args, "--preset", "tiny", "--clip", str(tmp_path / "noclip")]) == 2
    assert "CLIP folder" in capsys.readouterr().err and not (tmp_path / "x" / "videos").exists()


def test_evaluate_takes_every_generate_option():
    import argparse

    from sdvgen_core.evaluation.cli import PER_VIDEO_OPTIONS, _generate_parser, add_evaluate_parser

    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]
    generate_dests = {action.dest for action in _generate_parser()._actions} - PER_VIDEO_OPTIONS
    assert generate_dests <= {action.dest for action in evaluate._actions}
    parsed = parser.parse_args(["evaluate", "--lora-strength", "0.5", "--fuse-lora", "--scheduler", "dpm"])
    assert (parsed.lora_strength, parsed.fuse_lora, parsed.scheduler) == (0.5, True, "dpm")
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--model", "m", "--preset", "tiny"])
