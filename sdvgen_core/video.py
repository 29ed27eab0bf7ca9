"""Writing frames to mp4 with PyAV."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch

from .errors import NonFiniteError, SDVGenError
from .files import atomic_output
from .validation import FPS_RANGE, check_int


# Float frames may overshoot 0..1 by rounding; more than this means another range (-1..1, 0..255).
_TOLERANCE = 0.01


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """`[T, 3, H, W]` floats in 0..1 (or uint8 0..255) -> `[T, H, W, 3]` uint8."""
    if frames.dtype != torch.uint8:
        frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(
    frames: torch.Tensor, path: str | os.PathLike, fps: int = 8, crf: int = 18, overwrite: bool = False
) -> Path:
    """Encode `[T, 3, H, W]` frames (floats 0..1 or uint8) as H.264 mp4; written to a temporary file first, then renamed.

    An existing `path` raises `OutputExistsError` (an `SDVGenError`) unless `overwrite`; NaN/inf frames
    raise `NonFiniteError` instead of becoming a black video.
    """
    check_int("fps", fps, *FPS_RANGE)
    check_int("crf", crf, 0, 51)
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise SDVGenError(f"frames must be [T, 3, H, W] with T >= 1; got shape {tuple(frames.shape)}")
    if frames.shape[2] % 2 or frames.shape[3] % 2:
        raise SDVGenError(f"frame size {frames.shape[3]}x{frames.shape[2]} must be even for H.264 (yuv420p)")
    if frames.is_floating_point():
        if not torch.isfinite(frames).all():
            raise NonFiniteError("the frames to write contain NaN or infinite values; they would make a black video")
        low, high = frames.min().item(), frames.max().item()
        if low < -_TOLERANCE or high > 1 + _TOLERANCE:
            raise SDVGenError(
                f"frames have values from {low:g} to {high:g}; expected 0..1 floats (as `decode` returns) or uint8"
            )
    elif frames.dtype != torch.uint8:
        raise SDVGenError(f"frames have dtype {frames.dtype}; expected 0..1 floats or uint8")
    pixels = frames_to_uint8(frames)
    with atomic_output(path, overwrite=overwrite) as tmp_name:
        with av.open(tmp_name, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = pixels.shape[2], pixels.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for pixel_frame in pixels:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixel_frame, format="rgb24")))
            container.mux(stream.encode())
    return Path(path)
