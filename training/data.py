"""Raw training data: identity pairs (Subjects200K parquet, JSONL pairs) and captioned video clips.

Sources only enumerate records and decode media; `prepare` turns them into cached latents. Anything
unreadable is counted in a `SkipCounter` under a reason and logged, never fatal.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdvgen_core.prompts import insert_cls
from sdvgen_core.reference import FitMode, fit_to_size, load_image, to_rgb

from .config import DataConfig, IdentityDataConfig, VideoDataConfig

logger = logging.getLogger(__name__)

SUBJECTS200K_SIZE = (1056, 528)
SUBJECTS200K_BOXES = ((8, 8, 520, 520), (528, 8, 1040, 520))
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")


class DataError(ValueError):
    """Training data that cannot be used at all (as opposed to single skipped files)."""


class SkipCounter(Counter):
    """Skipped inputs (and caption fix-ups such as `<cls>` moved to the start) by reason; skips are logged."""

    def skip(self, reason: str, what: str, detail: object = "") -> None:
        self[reason] += 1
        logger.warning("skipped %s (%s)%s", what, reason, f": {detail}" if detail else "")


@dataclass(frozen=True)
class Shard:
    """This process's share of the data: work unit i belongs to rank i mod count."""

    rank: int = 0
    count: int = 1

    def owns(self, index: int) -> bool:
        return index % self.count == self.rank


def path_tag(path: Path) -> str:
    """Short stable tag of a file's absolute path, so same-named files in different folders get distinct keys."""
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


@dataclass
class IdentityRecord:
    """Two views of one subject. `captions[i]` (with `<cls>` as configured) describes view i as a target;
    None: never a target."""

    key: str
    load_views: Callable[[], tuple[Image.Image, Image.Image]]
    captions: tuple[str | None, str | None]


@dataclass
class VideoRecord:
    key: str
    path: Path
    caption: str  # with `<cls>` at the start when data.video.cls_placement is prefix


def caption_sources(data: DataConfig) -> tuple[IdentityDataConfig, VideoDataConfig]:
    """The identity and video source settings with `data.cls_token: false` applied (no `<cls>` anywhere)."""
    if data.cls_token:
        return data.identity, data.video
    return (dataclasses.replace(data.identity, cls_placement="none"),
            dataclasses.replace(data.video, cls_placement="none"))


def identity_caption(caption: str, subject: str | None, placement: str, skips: SkipCounter, what: str) -> str:
    """An identity caption with `<cls>` placed as configured: `prefix` (the authors' run: "<cls> " + caption),
    `subject_word` (the paper's example "An <cls> armchair ...") or `none` (Tab. 6 ablation)."""
    if placement == "none":
        return caption
    if placement == "prefix":
        return insert_cls(caption, None)
    return caption_with_cls(caption, subject, skips, what)


def caption_with_cls(caption: str, subject: str | None, skips: SkipCounter, what: str) -> str:
    """`<cls>` before the subject word, or at the start when the caption does not contain the word."""
    if subject and subject.lower() not in caption.lower():
        skips["cls at start: subject word missing"] += 1
        logger.info("%s: subject %r not in caption %r; <cls> goes first", what, subject, caption)
        subject = None
    try:
        return insert_cls(caption, subject)
    except ValueError:  # subject present only inside another word
        skips["cls at start: subject word missing"] += 1
        return insert_cls(caption, None)


def _expand(paths: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    files = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data path {entry!r} does not exist")
    return files


def _passes_quality(scores: dict | None, config: IdentityDataConfig) -> bool:
    if not scores:
        return False
    keys = config.quality_keys or list(scores)
    values = [scores.get(k) for k in keys]
    return all(v is not None and float(v) >= config.min_quality for v in values)


def _open_composite(data: bytes) -> tuple[Image.Image, Image.Image]:
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.size != SUBJECTS200K_SIZE:
        raise ValueError(f"composite is {image.size[0]}x{image.size[1]}, expected 1056x528")
    image = to_rgb(image)
    return image.crop(SUBJECTS200K_BOXES[0]), image.crop(SUBJECTS200K_BOXES[1])


def _image_bytes(cell) -> bytes | None:
    if isinstance(cell, dict):
        return cell.get("bytes")
    return cell if isinstance(cell, (bytes, bytearray)) else None


def subjects200k_records(config: IdentityDataConfig, skips: SkipCounter, shard: Shard = Shard()
                         ) -> Iterator[IdentityRecord]:
    """Rows of Subjects200K-layout parquet files passing the quality filter; each pair usable both ways.

    Work is split by row group, so each rank reads only its own part of the (large) files.
    """
    import pyarrow.parquet as pq

    columns = ["image", "description", "quality_assessment"]
    unit = 0
    for file_index, file in enumerate(_expand(config.subjects200k, (".parquet",))):
        try:
            parquet = pq.ParquetFile(file)
            groups = parquet.num_row_groups
        except Exception as error:  # pyarrow raises many types for broken or foreign files
            if shard.owns(file_index):
                skips.skip("unreadable parquet", str(file), error)
            continue
        for group in range(groups):
            unit += 1
            if not shard.owns(unit - 1):
                continue
            prefix = f"s200k-{file.stem}-{path_tag(file)}-g{group:05d}"
            try:
                batches = parquet.iter_batches(batch_size=64, columns=columns, row_groups=[group])
                rows = (row for batch in batches for row in batch.to_pylist())
                for row_index, row in enumerate(rows):
                    record = _subjects200k_record(row, f"{prefix}-{row_index:06d}", config, skips)
                    if record is not None:
                        yield record
            except Exception as error:
                skips.skip("unreadable parquet row group", f"{file} group {group}", error)


def _subjects200k_record(row: dict, key: str, config: IdentityDataConfig, skips: SkipCounter) -> IdentityRecord | None:
    if not _passes_quality(row.get("quality_assessment"), config):
        skips["below quality threshold"] += 1
        return None
    description = row.get("description") or {}
    data = _image_bytes(row.get("image"))
    captions = (description.get("description_0"), description.get("description_1"))
    if data is None or not all(isinstance(c, str) and c.strip() for c in captions):
        skips.skip("missing image or description", key)
        return None
    item = description.get("item")
    return IdentityRecord(
        key=key,
        load_views=lambda: _open_composite(data),
        captions=tuple(identity_caption(c, item, config.cls_placement, skips, key) for c in captions),
    )


def _open_image(path: Path) -> Image.Image:
    return to_rgb(load_image(path))


def jsonl_pair_records(config: IdentityDataConfig, skips: SkipCounter, shard: Shard = Shard()
                       ) -> Iterator[IdentityRecord]:
    """Lines `{"reference", "target", "caption", "subject"?}`; image paths relative to the JSONL file."""
    unit = 0
    for file in _expand(config.pairs_jsonl, (".jsonl",)):
        for line_number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            unit += 1
            if not shard.owns(unit - 1):
                continue
            what = f"{file.name} line {line_number}"
            try:
                entry = json.loads(line)
                reference, target = file.parent / entry["reference"], file.parent / entry["target"]
                caption = str(entry["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                skips.skip("bad JSONL line", what, f"needs reference, target, caption: {error}")
                continue
            yield IdentityRecord(
                key=f"pair-{file.stem}-{path_tag(file)}-{line_number:07d}",
                load_views=lambda r=reference, t=target: (_open_image(r), _open_image(t)),
                captions=(None, identity_caption(caption, entry.get("subject"), config.cls_placement, skips, what)),
            )


def identity_records(config: IdentityDataConfig, skips: SkipCounter, shard: Shard = Shard()
                     ) -> Iterator[IdentityRecord]:
    yield from subjects200k_records(config, skips, shard)
    yield from jsonl_pair_records(config, skips, shard)


def _caption_table(path: Path) -> dict[str, str]:
    """`file -> caption` from a JSONL (`{"file", "caption"}`) or CSV (`file,caption` header) file."""
    if not path.is_file():
        raise DataError(f"video caption file {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    try:
        return {str(row["file"]): str(row["caption"]) for row in rows}
    except KeyError as error:
        raise DataError(f"{str(path)!r}: every entry needs `file` and `caption` (missing {error})") from None


def video_files(config: VideoDataConfig) -> list[tuple[Path, Path]]:
    """(folder, clip) for every clip file under `config.folders`, in a fixed order."""
    return [(Path(folder), path) for folder in config.folders for path in _expand([folder], VIDEO_SUFFIXES)]


def video_records(config: VideoDataConfig, skips: SkipCounter, shard: Shard = Shard()) -> Iterator[VideoRecord]:
    """This shard's clips with a caption from the caption file or a sidecar `.txt`."""
    table = _caption_table(Path(config.captions)) if config.captions else {}
    for index, (root, path) in enumerate(video_files(config)):
        if not shard.owns(index):
            continue
        relative = path.relative_to(root).as_posix() if root.is_dir() else path.name
        caption = table.get(relative) or table.get(path.name)
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text().strip()
        if not caption:
            skips.skip("no caption", str(path))
            continue
        key = f"video-{path.stem}-{path_tag(path)}"
        yield VideoRecord(key=key, path=path,
                          caption=insert_cls(caption, None) if config.cls_placement == "prefix" else caption)


class ClipTooShort(ValueError):
    pass


def decode_clip(path: Path, fps: float, num_frames: int, height: int, width: int) -> torch.Tensor:
    """`num_frames` frames at `fps`, resized to cover and centre-cropped to `height x width`: `[T, 3, H, W]` in 0..1.

    Frames are taken at times k / fps from the first frame (a source slower than `fps` repeats frames);
    timestamps need not start at 0 (stream-copy cuts, MPEG-TS). Raises `ClipTooShort` when the clip ends
    before `num_frames` frames; PyAV errors for corrupt files.
    """
    frames: list[torch.Tensor] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or stream.guessed_rate or fps)
        next_time, start = 0.0, None
        for index, frame in enumerate(container.decode(stream)):
            absolute = frame.time if frame.time is not None else index / source_fps
            start = absolute if start is None else start
            time = absolute - start
            if time + 0.5 / source_fps < next_time:
                continue
            pixels = torch.from_numpy(np.ascontiguousarray(frame.to_ndarray(format="rgb24"))).permute(2, 0, 1)
            fitted = fit_to_size(pixels[None].float() / 255.0, height, width, FitMode.CROP)[0].clamp(0, 1)
            while time + 0.5 / source_fps >= next_time and len(frames) < num_frames:
                frames.append(fitted)
                next_time += 1.0 / fps
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ClipTooShort(f"{len(frames)} frames at {fps} fps, need {num_frames}")
    return torch.stack(frames)


def load_identity_views(record: IdentityRecord) -> tuple[Image.Image, Image.Image]:
    """Both views, or raises `ValueError`/`OSError` for unreadable images."""
    try:
        return record.load_views()
    except UnidentifiedImageError as error:
        raise ValueError(f"not an image: {error}") from None
