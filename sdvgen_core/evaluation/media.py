"""Reading the set's images and the generated mp4s, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import SDVGenError


def read_image(path: str | os.PathLike, what: str, mode: str | None = None) -> Image.Image:
    """Open and fully decode an image; a missing or unreadable file raises SDVGenError naming it."""
    path = Path(path)
    if not path.is_file():
        raise SDVGenError(f"{what} {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode else image.copy()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise SDVGenError(f"{what} {str(path)!r} cannot be read as an image: {error}") from None


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode an mp4 into (`[T, H, W, 3]` uint8 RGB frames, frames per second)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 8)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, OSError) as error:
        raise SDVGenError(f"video {str(path)!r} cannot be decoded: {error}") from None
    if not frames:
        raise SDVGenError(f"video {str(path)!r} has no frames")
    return np.stack(frames), fps
