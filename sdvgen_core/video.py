"""Writing frames to mp4 with PyAV."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch

from .files import atomic_output


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """`[T, 3, H, W]` floats in 0..1 -> `[T, H, W, 3]` uint8."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, fps: int = 8, crf: int = 18) -> Path:
    """Encode `[T, 3, H, W]` frames (0..1) as H.264 mp4; written to a temporary file first, then renamed."""
    pixels = frames_to_uint8(frames)
    with atomic_output(path) as tmp_name:
        with av.open(tmp_name, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = pixels.shape[2], pixels.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for pixel_frame in pixels:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixel_frame, format="rgb24")))
            container.mux(stream.encode())
    return Path(path)
