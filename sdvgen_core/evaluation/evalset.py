"""The eval set file: subjects (reference image, optional mask, subject word, prompts, optional seed).

YAML (`subjects:` list, optional `cls_placement`) or JSONL (one subject per line). Paths are relative to
the file. Every (subject, prompt) pair is one video, named `<subject name>__p<prompt index>`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SDVGenError
from ..prompts import CLS_TOKEN, insert_cls

CLS_PLACEMENTS = ("prefix", "before_subject")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SUBJECT_KEYS = {"name", "reference", "mask", "subject", "prompts", "seed"}


class EvalSetError(SDVGenError):
    """The eval set file cannot be used."""


@dataclass(frozen=True)
class EvalVideo:
    """One video of the set: what to generate and what to score it against."""

    video_id: str
    subject_name: str
    reference: Path
    mask: Path | None
    subject: str
    prompt: str  # as written in the set, without <cls>: the CLIP-T text
    generation_prompt: str  # with <cls> placed as the set says
    seed: int | None  # None: the run's --seed


@dataclass(frozen=True)
class EvalSet:
    path: Path
    videos: list[EvalVideo]
    cls_placement: str

    @property
    def subject_count(self) -> int:
        return len({video.subject_name for video in self.videos})


def prompt_without_cls(prompt: str) -> str:
    """The prompt as CLIP-T reads it: `<cls>` removed, spaces normalised."""
    return " ".join(prompt.replace(CLS_TOKEN, " ").split())


def _read_entries(path: Path) -> tuple[list[dict], dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise EvalSetError(f"eval set {path}: line {number} is not JSON ({error.msg})") from None
        return entries, {}
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise EvalSetError(f"eval set {path}: expected a .yaml, .yml or .jsonl file")
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise EvalSetError(f"eval set {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("subjects"), list):
        raise EvalSetError(f"eval set {path}: expected a mapping with a `subjects:` list")
    return data["subjects"], {key: value for key, value in data.items() if key != "subjects"}


def load_eval_set(path: str | os.PathLike) -> EvalSet:
    """Read and check an eval set file (structure only; images are opened when they are used)."""
    path = Path(path)
    if not path.is_file():
        raise EvalSetError(f"eval set file {str(path)!r} does not exist")
    entries, options = _read_entries(path)
    unknown_options = set(options) - {"cls_placement"}
    if unknown_options:
        raise EvalSetError(f"eval set {path}: unknown top-level keys {sorted(unknown_options)}; "
                           "expected `subjects` and optionally `cls_placement`")
    cls_placement = options.get("cls_placement", "prefix")
    if cls_placement not in CLS_PLACEMENTS:
        raise EvalSetError(f"eval set {path}: cls_placement {cls_placement!r} is not one of {list(CLS_PLACEMENTS)}")
    if not entries:
        raise EvalSetError(f"eval set {path} has no subjects")
    videos: list[EvalVideo] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"eval set {path}, subject {index + 1}"
        if not isinstance(entry, dict):
            raise EvalSetError(f"{where}: expected a mapping with name, reference, subject, prompts")
        unknown = set(entry) - _SUBJECT_KEYS
        if unknown:
            raise EvalSetError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(_SUBJECT_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise EvalSetError(f"{where}: `name` must be a word of letters, digits, '_', '-', '.'; got {name!r}")
        if name in names:
            raise EvalSetError(f"{where}: the name {name!r} is used twice")
        names.add(name)
        where = f"eval set {path}, subject {name!r}"
        for key in ("reference", "subject"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise EvalSetError(f"{where}: `{key}` must be a non-empty string")
        prompts = entry.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise EvalSetError(f"{where}: `prompts` must be a non-empty list of non-empty strings")
        seed = entry.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise EvalSetError(f"{where}: `seed` must be a non-negative integer; got {seed!r}")
        mask = entry.get("mask")
        if mask is not None and not isinstance(mask, str):
            raise EvalSetError(f"{where}: `mask` must be a path; got {mask!r}")
        subject = entry["subject"].strip()
        for number, raw_prompt in enumerate(prompts):
            prompt = prompt_without_cls(raw_prompt)
            generation_prompt = insert_cls(prompt, subject if cls_placement == "before_subject" else None)
            videos.append(EvalVideo(
                video_id=f"{name}__p{number}", subject_name=name, reference=path.parent / entry["reference"],
                mask=path.parent / mask if mask else None, subject=subject, prompt=prompt,
                generation_prompt=generation_prompt, seed=seed,
            ))
    return EvalSet(path=path, videos=videos, cls_placement=cls_placement)


_DEMO_SUBJECTS = [
    ("red_ball", "ball", (210, 40, 40), "ellipse",
     ["a ball rolls across a wooden table", "a ball bounces on the beach at sunset"]),
    ("blue_box", "box", (40, 80, 200), "rectangle",
     ["a box slides on the snow", "a box floats in a swimming pool"]),
]


def make_demo_set(folder: str | os.PathLike, with_encoders: bool = True) -> Path:
    """Write a 2-subject x 2-prompt eval set with drawn references on white (720x480) and return its YAML.

    With `with_encoders`, tiny random CLIP and DINO folders go to `encoders/clip` and `encoders/dino`, so
    the demo runs the CLIP-T, CLIP-I and DINO-I code paths (their numbers mean nothing).
    """
    import yaml
    from PIL import Image, ImageDraw

    folder = Path(folder)
    target = folder / "eval_set.yaml"
    if target.exists():
        raise EvalSetError(f"{target} already exists; choose another folder or remove it first")
    (folder / "references").mkdir(parents=True, exist_ok=True)
    subjects = []
    for name, word, colour, shape, prompts in _DEMO_SUBJECTS:
        image = Image.new("RGB", (720, 480), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        getattr(draw, shape)((240, 120, 480, 360), fill=colour, outline=(20, 20, 20), width=6)
        reference = Path("references") / f"{name}.png"
        image.save(folder / reference)
        subjects.append({"name": name, "reference": reference.as_posix(), "subject": word, "prompts": prompts})
    target.write_text(yaml.safe_dump({"cls_placement": "prefix", "subjects": subjects}, sort_keys=False))
    if with_encoders:
        from .tiny_encoders import build_tiny_clip, build_tiny_dino

        build_tiny_clip(folder / "encoders" / "clip")
        build_tiny_dino(folder / "encoders" / "dino")
    return target
