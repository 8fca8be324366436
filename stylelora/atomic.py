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


def check_file_target(flag: str, text: str, suffix: str, *, example: str, kind: str, overwrite: bool,
                      folders: bool = False) -> None:
    """Refuse, before the work, a `flag` value that names no new `suffix` file: a folder (unless `folders`, where
    files are numbered inside), another suffix, a path under a file, or an existing file without `overwrite`.
    One wording for every command that writes a named file: `generate`/`grid --out`, `evaluate --save-grid`,
    `blend --out`. `example` is a file name to suggest inside a folder; `kind` says what is written ("a PNG")."""
    target = Path(text)
    if target.is_dir() or text.endswith(("/", os.sep)):
        if folders:
            return
        raise ValueError(f"{flag} {text} is a folder: give the new file's name in it, e.g. {target / example}.")
    if _wrong_suffix(target, suffix, folders):
        also = " or a folder" if folders else ""
        raise ValueError(f"{flag} {text}: this is written as {kind}; give a name ending in {suffix}{also}, "
                         f"e.g. {target.with_name(target.stem + suffix)}.")
    blocking = file_in_the_way(target, include_self=False)
    if blocking is not None:
        raise ValueError(f"{flag} {text}: {blocking} is a file, so nothing can be written inside it; choose another "
                         "folder.")
    if target.is_file() and not overwrite:
        raise ValueError(f"{flag} {text} exists already: give another name, or add --overwrite to replace it.")


# Where a folder is welcome too, a name is taken for a folder unless it ends like a file of another kind: a
# folder may well be called `run.v2`.
_OTHER_FILE_SUFFIXES = {".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".safetensors", ".ckpt", ".pt",
                        ".json", ".txt", ".zip"}


def _wrong_suffix(target: Path, suffix: str, folders: bool) -> bool:
    if target.suffix.lower() == suffix:
        return False
    return not folders or target.is_file() or target.suffix.lower() in _OTHER_FILE_SUFFIXES
