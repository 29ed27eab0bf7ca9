"""Generating every video of an eval set, resumably.

Each video is written atomically to `videos/<id>.mp4`; only then is the sidecar `videos/<id>.json`
written, holding the settings, the seed and the mp4's size and SHA-256. A video counts as finished only
when its sidecar matches the mp4 on disk, so an interrupted or truncated video is made again, and a
folder made with other settings is refused instead of being mixed into the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..cli import GenerationPlan
from ..errors import SDVGenError
from ..files import atomic_output
from ..reference import prepare_reference_image
from ..video import write_mp4
from .evalset import EvalSet, EvalVideo
from .media import read_image

logger = logging.getLogger(__name__)

# (video, reference image, subject mask or None, seed) -> frames `[T, 3, H, W]` in 0..1
VideoGenerator = Callable[[EvalVideo, Image.Image, "Image.Image | None", int], torch.Tensor]

# Options of `sdvgen generate` that change nothing in the pixels; left out of the settings record.
_NOT_SETTINGS = {"device", "memory_mode", "verbose", "command", "seed", "fps"}


def generation_settings(args: argparse.Namespace, option_names: list[str], plan: GenerationPlan) -> dict:
    """Everything among the `sdvgen generate` options that decides the pixels, with the backbone's defaults resolved."""
    settings = {name: getattr(args, name) for name in option_names if name not in _NOT_SETTINGS}
    settings.update(
        family=plan.backbone.family, precision=plan.precision, cfg=plan.guidance_scale,
        height=plan.settings["height"], width=plan.settings["width"], frames=plan.settings["num_frames"],
        steps=plan.settings["num_inference_steps"],
    )
    for name in ("model", "lora"):
        if settings.get(name):
            settings[name] = str(Path(settings[name]).resolve())
    return settings


def pipeline_generator(args: argparse.Namespace, plan: GenerationPlan) -> VideoGenerator:
    """A VideoGenerator running the SDV-Gen pipeline with the run's settings (loaded on the first call)."""
    state: dict = {}

    def generate(video: EvalVideo, reference: Image.Image, mask: Image.Image | None, seed: int) -> torch.Tensor:
        if "pipe" not in state:
            state["pipe"] = plan.load_pipeline(args)
        pipe = state["pipe"]
        latents = pipe(
            video.generation_prompt, reference_image=reference, subject_mask=mask,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **plan.call_options(args),
        ).latents
        return pipe.decode(latents, tiled=args.tiled_decode)[0]

    return generate


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digest(path: Path | None) -> str | None:
    return _sha256(path) if path is not None and path.is_file() else None


def video_record(video: EvalVideo, seed: int, settings: dict) -> dict:
    """What a finished video's sidecar must say (besides the mp4's size and hash): a changed reference or
    mask file counts as a change of settings."""
    return {"video_id": video.video_id, "generation_prompt": video.generation_prompt, "seed": seed,
            "reference_sha256": _file_digest(video.reference), "mask_sha256": _file_digest(video.mask),
            "settings": settings}


def video_paths(out_dir: Path, video_id: str) -> tuple[Path, Path]:
    return out_dir / "videos" / f"{video_id}.mp4", out_dir / "videos" / f"{video_id}.json"


def read_sidecar(out_dir: Path, video_id: str) -> dict | None:
    """The sidecar of a finished video, or None when the video is missing, unfinished or truncated."""
    mp4, sidecar = video_paths(out_dir, video_id)
    if not sidecar.is_file() or not mp4.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    mp4_info = record.get("mp4", {})
    if mp4.stat().st_size != mp4_info.get("bytes") or _sha256(mp4) != mp4_info.get("sha256"):
        return None
    return record


@dataclass
class GenerationResult:
    generated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # video id -> message naming the input at fault
    seconds: float = 0.0


_RECORD_KEYS = ("seed", "generation_prompt", "reference_sha256", "mask_sha256")


def _comparable(record: dict) -> dict:
    return {**record.get("settings", {}), **{key: record.get(key) for key in _RECORD_KEYS}}


def _settings_difference(old: dict, new: dict) -> list[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def reference_path(out_dir: Path, subject_name: str) -> Path:
    return out_dir / "references" / f"{subject_name}.png"


def _prepare_references(eval_set: EvalSet, out_dir: Path, settings: dict, result: GenerationResult) -> dict:
    """Read each subject's reference (and mask) once; write what the model sees to references/<subject>.png."""
    prepared: dict[str, tuple[Image.Image, Image.Image | None]] = {}
    errors: dict[str, str] = {}
    for video in eval_set.videos:
        name = video.subject_name
        if name in prepared or name in errors:
            continue
        try:
            image = read_image(video.reference, f"reference of subject {name!r}")
            mask = read_image(video.mask, f"mask of subject {name!r}", mode="L") if video.mask else None
            fitted = prepare_reference_image(image, settings["height"], settings["width"], settings["fit"], mask)
        except SDVGenError as error:
            errors[name] = str(error)
            logger.error("%s; its videos are left out", error)
            continue
        target = reference_path(out_dir, name)
        with atomic_output(target) as tmp_name:
            pixels = (fitted[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels).save(tmp_name, format="PNG")
        prepared[name] = (image, mask)
    for video in eval_set.videos:
        if video.subject_name in errors:
            result.failed[video.video_id] = errors[video.subject_name]
    return prepared


def generate_videos(
    eval_set: EvalSet,
    out_dir: str | Path,
    generate: VideoGenerator,
    settings: dict,
    base_seed: int,
    fps: int = 8,
) -> GenerationResult:
    """Make every video of the set that is not finished yet; a bad reference fails only its own videos."""
    out_dir = Path(out_dir)
    result = GenerationResult()
    pending = []
    for video in eval_set.videos:
        seed = base_seed if video.seed is None else video.seed
        record = read_sidecar(out_dir, video.video_id)
        if record is None:
            pending.append((video, seed))
            continue
        differences = _settings_difference(_comparable(record), _comparable(video_record(video, seed, settings)))
        if differences:
            raise SDVGenError(
                f"{out_dir} already holds {video.video_id} made with other settings (differing: "
                f"{', '.join(differences)}); use another --out folder for these settings"
            )
        result.skipped.append(video.video_id)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    references = _prepare_references(eval_set, out_dir, settings, result)
    pending = [(video, seed) for video, seed in pending if video.video_id not in result.failed]
    if result.skipped:
        logger.info("%d of %d videos already finished in %s", len(result.skipped), len(eval_set.videos), out_dir)
    started = time.perf_counter()
    progress = tqdm(pending, desc="generating", unit="video", total=len(pending))
    for video, seed in progress:
        progress.set_postfix_str(video.video_id)
        image, mask = references[video.subject_name]
        video_started = time.perf_counter()
        frames = generate(video, image, mask, seed)
        mp4, sidecar = video_paths(out_dir, video.video_id)
        # Pending means no sidecar vouches for the mp4: whatever is there is this run's unfinished video.
        write_mp4(frames, mp4, fps=fps, overwrite=True)
        record = video_record(video, seed, settings)
        record.update(prompt=video.prompt, frames=int(frames.shape[0]), fps=fps,
                      seconds=round(time.perf_counter() - video_started, 2),
                      mp4={"bytes": mp4.stat().st_size, "sha256": _sha256(mp4)})
        with atomic_output(sidecar) as tmp_name:
            Path(tmp_name).write_text(json.dumps(record, indent=2))
        result.generated.append(video.video_id)
    progress.close()
    result.seconds = time.perf_counter() - started
    return result
