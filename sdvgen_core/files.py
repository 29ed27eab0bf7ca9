"""Writing user files so that an interrupted write never leaves a half-written file behind, nor replaces one unasked."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import SDVGenError


class OutputExistsError(SDVGenError):
    """The output file exists and replacing it was not asked for."""


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary file name beside `path`; when the block succeeds it becomes `path`, else it is deleted.

    The result gets ordinary permissions (0666 less the umask), not the private 0600 of a temporary file.
    With `overwrite=False` an existing `path` raises `OutputExistsError`, checked before the block runs and
    again, without a race, when the file is put in place (a hard link fails if the name was taken meanwhile).
    """
    path = Path(path)
    if path.is_dir():
        raise SDVGenError(f"output {str(path)!r} is a folder; give a file name inside it")
    if not overwrite and path.exists():
        raise OutputExistsError(f"output {str(path)!r} exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield tmp_name
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        if overwrite:
            os.replace(tmp_name, path)
        else:
            _place_new(tmp_name, path)
    except OSError as error:
        if error.filename is None:  # e.g. a full disk during write(): name the file the user asked for
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _place_new(tmp_name: str, path: Path) -> None:
    """Give the finished temporary file the name `path`, which must still be free."""
    try:
        os.link(tmp_name, path)
    except FileExistsError:
        raise OutputExistsError(f"output {str(path)!r} appeared while writing; it was left as it is") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise OutputExistsError(f"output {str(path)!r} appeared while writing; it was left as it is") from None
        os.replace(tmp_name, path)


def next_free_path(path: str | os.PathLike) -> Path:
    """`path` if no file has that name, else the first free `<stem>_00001<suffix>`, `<stem>_00002<suffix>`, ...

    The counter follows ComfyUI's save nodes, which never overwrite either.
    """
    path = Path(path)
    if not path.exists():
        return path
    counter = 1
    while True:
        candidate = path.with_name(f"{path.stem}_{counter:05d}{path.suffix}")
        if not candidate.exists():
            return candidate
        counter += 1


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON, YAML, a report) atomically: a full disk leaves the old file or none."""
    with atomic_output(path) as tmp_name:
        Path(tmp_name).write_text(text)
    return Path(path)
