"""Files that must survive a crash whole: written beside their final name, fsync'd, renamed."""

from __future__ import annotations

import os

from luksvm.errors import LuksvmError


def fsync(path: str) -> None:
    """Flush a file, or a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blocker(path: str) -> str:
    """The first of `path` and its parents that exists and is not a folder, or ""."""
    current = os.path.abspath(path)
    while True:
        if os.path.lexists(current) and not os.path.isdir(current):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return ""
        current = parent


def ensure_folder(path: str, mode: int = 0o700) -> None:
    """Create folder `path` (and its parents) when missing; LuksvmError naming what stands in the
    way when a regular file (or anything else) is there instead."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as error:
        found = blocker(path)
        reason = f"{found} is not a folder" if found else error.strerror
        raise LuksvmError(
            f"cannot make the folder {path}: {reason}",
            fix="move it out of the way (luksvm keeps its state there)",
        ) from None


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` so that a crash leaves the old or the new file, never a part.

    The folder is created (mode 0700) when missing. The temporary name starts with a dot and ends
    in .tmp, next to the final name.
    """
    directory, name = os.path.split(path)
    ensure_folder(directory)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync(directory)
