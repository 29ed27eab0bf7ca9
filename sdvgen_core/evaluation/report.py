"""Scoring a run's videos and writing what a person reads: per-video CSV, summary table, JSON, contact sheet."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..errors import SDVGenError
from ..files import atomic_output
from .evalset import EvalSet
from .generation import read_sidecar, reference_path, video_paths
from .media import read_image, read_video
from .metrics import (ClipScorer, DinoScorer, FlowEstimator, FrameInterpolator, central_frames, dynamic_degree,
                      mean_or_none, motion_smoothness)

# The paper's column order; the table shows each as a percentage (x100).
METRICS = [("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I"),
           ("motion_smoothness", "Motion smoothness"), ("dynamic_degree", "Dynamic degree")]
ENCODER_OPTION = {"clip_t": "--clip", "clip_i": "--clip", "dino_i": "--dino", "motion_smoothness": "--amt",
                  "dynamic_degree": "--raft"}
CSV_COLUMNS = ["video_id", "subject", "prompt", "seed", *(key for key, _ in METRICS), "status"]
SHEET_FRAMES = 4


@dataclass
class Scorers:
    """The loaded encoders; a None one means its metrics are skipped (not scored as 0)."""

    clip: ClipScorer | None = None
    dino: DinoScorer | None = None
    flow: FlowEstimator | None = None
    interpolate: FrameInterpolator | None = None
    metric_frames: int = 16

    def skipped(self) -> dict[str, str]:
        loaded = {"clip_t": self.clip, "clip_i": self.clip, "dino_i": self.dino,
                  "motion_smoothness": self.interpolate, "dynamic_degree": self.flow}
        return {key: f"skipped: no {ENCODER_OPTION[key]} given" for key, value in loaded.items() if value is None}


def score_video(frames: np.ndarray, fps: float, reference: np.ndarray, text: str, scorers: Scorers) -> dict:
    """All configured metrics of one video (`[T, H, W, 3]` uint8) in 0..1; `dynamic_degree` is 0 or 1."""
    central = central_frames(frames, scorers.metric_frames)
    scores: dict[str, float | None] = {key: None for key, _ in METRICS}
    if scorers.clip is not None:
        scores["clip_t"] = scorers.clip.clip_t(central, text)
        scores["clip_i"] = scorers.clip.clip_i(central, reference)
    if scorers.dino is not None:
        scores["dino_i"] = scorers.dino.dino_i(central, reference)
    if scorers.interpolate is not None:
        scores["motion_smoothness"] = motion_smoothness(frames, scorers.interpolate)
    if scorers.flow is not None:
        scores["dynamic_degree"] = float(dynamic_degree(frames, scorers.flow, fps)[0])
    return scores


def score_run(eval_set: EvalSet, out_dir: Path, scorers: Scorers, failed: dict[str, str]) -> list[dict]:
    """One row per video of the set: its scores, or the reason it has none."""
    rows = []
    for video in tqdm(eval_set.videos, desc="scoring", unit="video"):
        row = {"video_id": video.video_id, "subject": video.subject_name, "prompt": video.prompt}
        record = None if video.video_id in failed else read_sidecar(out_dir, video.video_id)
        if record is None:
            rows.append({**row, "seed": "", "status": f"failed: {failed.get(video.video_id, 'no finished video')}"})
            continue
        try:
            frames, fps = read_video(video_paths(out_dir, video.video_id)[0])
            reference = np.array(read_image(reference_path(out_dir, video.subject_name), "prepared reference", "RGB"))
            scores = score_video(frames, fps, reference, video.prompt, scorers)
        except SDVGenError as error:
            rows.append({**row, "seed": record["seed"], "status": f"failed: {error}"})
            continue
        rows.append({**row, "seed": record["seed"], **scores, "status": "ok"})
    return rows


def summarize(rows: list[dict]) -> dict[str, float | None]:
    """Mean of each metric over the scored videos (dynamic degree: the fraction of dynamic videos)."""
    return {key: mean_or_none([row.get(key) for row in rows if row["status"] == "ok"]) for key, _ in METRICS}


def format_table(columns: dict[str, dict[str, float | None]], skipped: dict[str, str] | None = None) -> str:
    """Markdown table: one row per run (name -> summary), metrics in the paper's order, x100."""
    header = "| run | " + " | ".join(label for _, label in METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 1)]
    for name, summary in columns.items():
        cells = [f"{100 * summary[key]:.1f}" if summary.get(key) is not None else "skipped" for key, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if skipped:
        lines.append("")
        lines += [f"- {label}: {skipped[key]}" for key, label in METRICS if key in skipped]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp_name:
        Path(tmp_name).write_text(text)


def write_reports(out_dir: Path, rows: list[dict], summary: dict, meta: dict) -> None:
    """per_video.csv, summary.md, metrics.json (raw 0..1 values; skipped metrics are empty / null)."""
    with atomic_output(out_dir / "per_video.csv") as tmp_name:
        with open(tmp_name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in CSV_COLUMNS})
    scored = sum(row["status"] == "ok" for row in rows)
    table = format_table({out_dir.name: summary}, meta.get("skipped"))
    _write_text(out_dir / "summary.md", f"{table}\n{scored} of {len(rows)} videos scored.\n")
    _write_text(out_dir / "metrics.json", json.dumps({**meta, "summary": summary, "videos": rows}, indent=2))


# ----- contact sheet -----

THUMB_HEIGHT = 120
LABEL_HEIGHT = 34
FRAME_GAP = 2


def sheet_frames(frames: np.ndarray, count: int = SHEET_FRAMES) -> list[np.ndarray]:
    """`count` frames evenly spaced from the first to the last."""
    return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]


def _thumb(image: np.ndarray | None, width: int) -> Image.Image:
    if image is None:
        return Image.new("RGB", (width, THUMB_HEIGHT), (90, 90, 90))
    return Image.fromarray(image).convert("RGB").resize((width, THUMB_HEIGHT), Image.BILINEAR)


def draw_contact_sheet(rows: list[tuple[str, list[list[np.ndarray | None]]]], headers: list[str],
                       path: Path, aspect: float) -> Path:
    """Rows of labelled thumbnail groups (group 0: the reference); `headers` name the groups."""
    font = ImageFont.load_default()
    width = round(THUMB_HEIGHT * aspect)
    group_sizes = [len(group) for group in rows[0][1]]
    gap = 8
    sheet_width = sum(size * (width + FRAME_GAP) - FRAME_GAP + gap for size in group_sizes) + gap
    row_height = LABEL_HEIGHT + THUMB_HEIGHT + gap
    sheet = Image.new("RGB", (sheet_width, 20 + row_height * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    x = gap
    for header, size in zip(headers, group_sizes):
        draw.text((x, 4), header, fill=(0, 0, 0), font=font)
        x += size * (width + FRAME_GAP) - FRAME_GAP + gap
    for index, (label, groups) in enumerate(rows):
        top = 20 + index * row_height
        for line_number, line in enumerate(label.splitlines()[:2]):
            draw.text((gap, top + 2 + 14 * line_number), line[: sheet_width // 6], fill=(0, 0, 0), font=font)
        x = gap
        for group in groups:
            for image in group:
                sheet.paste(_thumb(image, width), (x, top + LABEL_HEIGHT))
                x += width + FRAME_GAP
            x += gap - FRAME_GAP
    with atomic_output(path) as tmp_name:
        sheet.save(tmp_name, format="PNG")
    return path


def _score_line(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return "  ".join(f"{label} {100 * row[key]:.1f}" for key, label in METRICS if row.get(key) is not None) or "no metric configured"


def _video_thumbs(out_dir: Path, row: dict) -> list[np.ndarray | None]:
    mp4 = video_paths(out_dir, row["video_id"])[0]
    if row["status"] != "ok" and read_sidecar(out_dir, row["video_id"]) is None:
        return [None] * SHEET_FRAMES
    return sheet_frames(read_video(mp4)[0])


def _reference_thumb(out_dir: Path, subject: str) -> np.ndarray | None:
    path = reference_path(out_dir, subject)
    return np.array(read_image(path, "prepared reference", "RGB")) if path.is_file() else None


def write_contact_sheet(out_dir: Path, rows: list[dict], aspect: float) -> Path:
    sheet_rows = [
        (f"{row['video_id']}: {row['prompt']}\n{_score_line(row)}",
         [[_reference_thumb(out_dir, row["subject"])], _video_thumbs(out_dir, row)])
        for row in rows
    ]
    return draw_contact_sheet(sheet_rows, ["reference", f"{SHEET_FRAMES} frames, first to last"],
                              out_dir / "contact_sheet.png", aspect)


# ----- comparing two runs -----

def load_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise SDVGenError(f"{run_dir} is not an evaluation run folder (no metrics.json); run `sdvgen evaluate` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SDVGenError(f"{path} is not valid JSON ({error.msg})") from None


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path) -> dict:
    """Side-by-side table (with B - A) and contact sheet of two runs over the videos they share."""
    run_a, run_b, out_dir = Path(run_a), Path(run_b), Path(out_dir)
    data_a, data_b = load_run(run_a), load_run(run_b)
    name_a, name_b = run_a.resolve().name, run_b.resolve().name
    if name_a == name_b:
        name_a, name_b = f"A: {run_a}", f"B: {run_b}"
    rows_b = {row["video_id"]: row for row in data_b["videos"]}
    shared = [(row, rows_b[row["video_id"]]) for row in data_a["videos"] if row["video_id"] in rows_b]
    if not shared:
        raise SDVGenError(f"{run_a} and {run_b} have no video in common; compare runs of the same eval set")
    difference = {key: (data_b["summary"][key] - data_a["summary"][key])
                  if data_a["summary"].get(key) is not None and data_b["summary"].get(key) is not None else None
                  for key, _ in METRICS}
    table = format_table({name_a: data_a["summary"], name_b: data_b["summary"]})
    diff_cells = [f"{100 * value:+.1f}" if value is not None else "-" for value in difference.values()]
    table += "| B - A | " + " | ".join(diff_cells) + " |\n"
    settings_changed = {key: (data_a["settings"].get(key), data_b["settings"].get(key))
                        for key in sorted(set(data_a["settings"]) | set(data_b["settings"]))
                        if data_a["settings"].get(key) != data_b["settings"].get(key)}
    table += "\nSettings that differ: " + (", ".join(f"{k}: {a} -> {b}" for k, (a, b) in settings_changed.items())
                                           or "none") + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "compare.md", table)
    result = {"runs": [str(run_a), str(run_b)], "summary": {name_a: data_a["summary"], name_b: data_b["summary"]},
              "difference_b_minus_a": difference, "settings_changed": settings_changed, "videos": len(shared)}
    _write_text(out_dir / "compare.json", json.dumps(result, indent=2))
    sheet_rows = [
        (f"{row_a['video_id']}: {row_a['prompt']}\nA: {_score_line(row_a)}    B: {_score_line(row_b)}",
         [[_reference_thumb(run_a, row_a["subject"])], _video_thumbs(run_a, row_a), _video_thumbs(run_b, row_b)])
        for row_a, row_b in shared
    ]
    aspect = data_a["settings"]["width"] / data_a["settings"]["height"]
    draw_contact_sheet(sheet_rows, ["reference", f"A: {name_a}", f"B: {name_b}"], out_dir / "compare_sheet.png", aspect)
    return result
