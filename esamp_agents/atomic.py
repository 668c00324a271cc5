"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

Every module that writes user-visible files (collection records, manifests, evaluation
results) goes through here: temp file in the same folder, fsync, rename, fsync the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (silently skipped where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, data: Any, *, indent: int = 2) -> Path:
    """``data`` as JSON (UTF-8, trailing newline) written atomically."""
    return atomic_write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode("utf-8"))


__all__ = ["atomic_write_bytes", "atomic_write_json", "fsync_dir"]
