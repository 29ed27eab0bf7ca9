"""Checks for `VALIDATE_INPUTS`: ComfyUI refuses the prompt before anything runs and marks the widget.

ComfyUI (execution.py, validate_inputs) attaches a failed `VALIDATE_INPUTS` to *every* input named in its
signature, so each node names only the inputs of one concern there (e.g. width and height: the video size),
and leaves dropdowns to ComfyUI's own "value not in list" check, which marks exactly that input. An input
fed by a link arrives as None (its value is not known before running) and is skipped.
"""

from __future__ import annotations

import math

from .types import MAX_FRAMES, SIZE_STEP


def finite(name: str, value) -> str | None:
    """Message when a FLOAT is NaN or infinite (a JSON prompt can carry both; min/max do not catch NaN)."""
    if value is not None and not math.isfinite(value):
        return f"{name}={value} is not a finite number"
    return None


def video_size(width, height) -> str | None:
    """Message naming each side that is not a positive multiple of 16 (VAE factor 8 x patch size 2)."""
    bad = [f"{name}={value}" for name, value in (("width", width), ("height", height))
           if value is not None and (value < SIZE_STEP or value % SIZE_STEP)]
    if bad:
        return f"{' and '.join(bad)} must be a multiple of {SIZE_STEP} (e.g. 720 x 480)"
    return None


def frame_count(frames) -> str | None:
    """Message unless `frames` is 4k+1 and at most the model's 49."""
    if frames is not None and (frames < 1 or (frames - 1) % 4 or frames > MAX_FRAMES):
        return f"frames={frames} must be 4k+1 (1, 5, 9, ..., {MAX_FRAMES}); the nearest are {nearest_frames(frames)}"
    return None


def nearest_frames(frames: int) -> str:
    lower = min(max(1, (frames - 1) // 4 * 4 + 1), MAX_FRAMES)
    upper = min(lower + 4, MAX_FRAMES)
    return str(lower) if lower == upper or frames <= 1 else f"{lower} and {upper}"


def result(*messages: str | None) -> str | bool:
    """What VALIDATE_INPUTS returns: True, or the problems found joined into one message."""
    problems = [message for message in messages if message]
    return "; ".join(problems) if problems else True
