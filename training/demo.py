"""Generated demo data for `training/configs/tiny_cpu.yaml` (a tiny random CogVideoX) and
`training/configs/tiny_wan_cpu.yaml` (`family="wan22"`: a tiny random Wan 2.2 TI2V model), with synthetic media.

Writes, under `root`: `model/` (sdvgen_core's tiny preset, `tiny` or `tiny-wan`), `subjects200k/train-0.parquet` (the
Subjects200K layout: 1056x528 composites with two views, descriptions, quality scores, some below the
threshold), `pairs/pairs.jsonl` (plain pairs, one pointing at a corrupt image) and `videos/` (moving-shape
clips with sidecar captions at 128x96, a multiple of 32 as Wan needs, plus one corrupt clip and one without a
caption). Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdvgen_core.backbones import COGVIDEOX, FAMILIES, WAN22
from sdvgen_core.presets import build_tiny_model
from sdvgen_core.wan_presets import build_tiny_wan_model
from sdvgen_core.video import write_mp4

from .config import ConfigError
from .data import SUBJECTS200K_BOXES, SUBJECTS200K_SIZE

SUBJECTS = [("mug", (220, 60, 40)), ("robot", (40, 160, 90)), ("duck", (240, 200, 40)), ("lamp", (90, 70, 200)),
            ("kettle", (200, 90, 160)), ("toy", (30, 150, 200))]
PLACES = ["on a wooden table", "in the garden", "on the beach", "in the kitchen"]


def draw_view(color, background, center: tuple[float, float], radius: float, size: int = 512) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    x, y = center[0] * size, center[1] * size
    r = radius * size
    draw = ImageDraw.Draw(image)
    draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=color)
    draw.rectangle((x - r * 0.3, y - r * 1.1, x + r * 0.3, y - r * 0.6), fill=tuple(c // 2 for c in color))
    return image


def composite(view0: Image.Image, view1: Image.Image) -> bytes:
    canvas = Image.new("RGB", SUBJECTS200K_SIZE, (255, 255, 255))
    for view, box in zip((view0, view1), SUBJECTS200K_BOXES):
        canvas.paste(view.resize((box[2] - box[0], box[3] - box[1])), box[:2])
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def write_subjects200k(path: Path, rows: int, low_quality_every: int = 4, row_group_size: int = 2) -> Path:
    """A parquet file in the Subjects200K layout; every `low_quality_every`-th row fails a 5.0 threshold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for index in range(rows):
        item, color = SUBJECTS[index % len(SUBJECTS)]
        views = [draw_view(color, (235 - 40 * k, 235, 215 + 20 * k), (0.35 + 0.3 * k, 0.45 + 0.1 * k), 0.18 + 0.06 * k)
                 for k in (0, 1)]
        score = 3 if low_quality_every and index % low_quality_every == low_quality_every - 1 else 5
        records.append({
            "image": {"bytes": composite(*views), "path": f"{index}.png"},
            "description": {
                "item": item,
                "description_0": f"A {item} {PLACES[index % 4]}, seen from the left.",
                "description_1": f"A {item} {PLACES[(index + 1) % 4]}, seen from above.",
            },
            "quality_assessment": {"compositeStructure": score, "objectConsistency": 5, "imageQuality": 5},
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def moving_clip(color, frames: int, height: int, width: int, phase: float) -> torch.Tensor:
    """`[T, 3, H, W]`: a coloured disc circling over a gradient background."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    clip = []
    for t in range(frames):
        angle = phase + 2 * math.pi * t / frames
        cx, cy = 0.5 + 0.25 * math.cos(angle), 0.5 + 0.25 * math.sin(angle)
        disc = (((xs - cx) * width / height) ** 2 + (ys - cy) ** 2 < 0.04).float()
        background = torch.stack([xs * 0.5, ys * 0.5, 0.3 + 0.2 * xs])
        rgb = torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255
        clip.append(background * (1 - disc) + rgb * disc)
    return torch.stack(clip)


def write_videos(folder: Path, count: int, fps: int = 16, frames: int = 32, height: int = 96, width: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        item, color = SUBJECTS[index % len(SUBJECTS)]
        write_mp4(moving_clip(color, frames, height, width, phase=index), folder / f"clip{index:02d}.mp4", fps=fps, overwrite=True)
        (folder / f"clip{index:02d}.txt").write_text(f"A {item} circles {PLACES[index % 4]}.")
    return folder


def write_pairs(folder: Path, count: int) -> tuple[Path, list[dict]]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        item, color = SUBJECTS[index % len(SUBJECTS)]
        draw_view(color, (250, 250, 250), (0.5, 0.5), 0.25, 256).save(folder / f"ref{index}.png")
        draw_view(color, (200, 230, 200), (0.4, 0.6), 0.2, 256).save(folder / f"tgt{index}.png")
        lines.append({"reference": f"ref{index}.png", "target": f"tgt{index}.png",
                      "caption": f"A {item} in a meadow.", "subject": item})
    return folder / "pairs.jsonl", lines


DEMO_FOLDERS = ("subjects200k", "pairs", "videos")
TINY_MODEL_BUILDERS = {COGVIDEOX: build_tiny_model, WAN22: build_tiny_wan_model}


def make_demo_data(root: str | Path, subjects200k_rows: int = 8, pairs: int = 2, videos: int = 4,
                   build_model: bool = True, overwrite: bool = False, family: str = COGVIDEOX) -> Path:
    """Fill `root`; media folders that already hold files are rewritten only with `overwrite` (a folder of
    real data given by mistake is never overwritten); an existing `model/` is kept if it is of `family`."""
    root = Path(root)
    if family not in TINY_MODEL_BUILDERS:
        raise ConfigError(f"--family {family!r} is not one of {list(FAMILIES)}")
    taken = [name for name in DEMO_FOLDERS if (root / name).is_dir() and any((root / name).iterdir())]
    if taken and not overwrite:
        raise ConfigError(f"--root {str(root)!r} already holds {', '.join(f'{n}/' for n in taken)}: choose an empty "
                          f"folder, or pass --overwrite to rewrite the demo media there")
    model = root / "model"
    if build_model and (model / "model_index.json").is_file():
        from sdvgen_core.backbones import detect_family

        if detect_family(model) != family:
            raise ConfigError(f"{str(model)!r} already holds a tiny {detect_family(model)} model, not {family}: "
                              f"use another --root for the {family} demo")
    elif build_model:
        TINY_MODEL_BUILDERS[family](model)
    write_subjects200k(root / "subjects200k" / "train-0.parquet", subjects200k_rows)
    jsonl, lines = write_pairs(root / "pairs", pairs)
    (root / "pairs" / "broken.png").write_bytes(b"not an image")
    lines.append({"reference": "broken.png", "target": "tgt0.png", "caption": "A mug on a shelf.", "subject": "mug"})
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    write_videos(root / "videos", videos)
    (root / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (root / "videos" / "corrupt.txt").write_text("A broken clip.")
    write_mp4(moving_clip((10, 10, 10), 8, 96, 128, 0.0), root / "videos" / "uncaptioned.mp4", fps=16, overwrite=True)
    return root
