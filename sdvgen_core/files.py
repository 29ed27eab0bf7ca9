"""Writing user files so that an interrupted write never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside `path`; when the block succeeds it becomes `path`, else it is deleted.

    The result gets ordinary permissions (0666 less the umask), not the private 0600 of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield tmp_name
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except OSError as error:
        if error.filename is None:  # e.g. a full disk during write(): name the file the user asked for
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON, YAML, a report) atomically: a full disk leaves the old file or none."""
    with atomic_output(path) as tmp_name:
        Path(tmp_name).write_text(text)
    return Path(path)
