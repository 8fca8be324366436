"""Atomic file writes: a temp file in the same folder, then a rename, so readers see the old file or the new one;
and the check, before the work, that a path can be made at all."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; the file gets the umask's permissions (mkstemp would make it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text with "\\n" line endings, written atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def file_in_the_way(path: str | os.PathLike, include_self: bool = True) -> Path | None:
    """The nearest existing place at or above `path` (above only, without `include_self`) when it is a file, so
    no folder can be made there; None when the path can be created."""
    path = Path(path)
    for place in ((path,) if include_self else ()) + tuple(path.parents):
        if place.exists():
            return None if place.is_dir() else place
    return None
