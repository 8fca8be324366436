"""Which base model a pipeline is: the `Model` name and `Model hash` that go into PNG parameters.

A1111's model hash is the first 10 hex digits of sha256 over the checkpoint file. A diffusers folder has several
weight files, so its hash is sha256 over the sorted (relative path, file sha256) pairs of the weights. Hashing a
real base reads gigabytes (5-20 s for SDXL), so it is done once per pipeline and cached on it, and each file's
sha256 is kept in a small cache file keyed by path, size and modification time, as A1111's cache.json does, so a
later command does not read the file again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IDENTITY_ATTRIBUTE = "_stylelora_base_identity"
A1111_MODEL_HASH_LENGTH = 10
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class BaseIdentity:
    """Display name ("toy", a folder or file name) and A1111-style short hash (None for an in-memory pipeline)."""

    name: str
    hash: str | None


def hash_cache_path() -> Path:
    """Where file hashes are remembered: $XDG_CACHE_HOME/stylelora (~/.cache/stylelora)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stylelora" / "file-hashes.json"


def _file_sha256s(paths: list[Path]) -> list[str]:
    """sha256 of each file, from the cache where the file has not changed since it was hashed; the cache file is
    read once and written once (when something was hashed), however many weight files a base has."""
    from stylelora.atomic import write_text_atomic

    cache_file = hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    digests, hashed = [], False
    for path in paths:
        stat, key = path.stat(), str(path.resolve())
        entry = cache.get(key)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            entry = cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
            hashed = True
        digests.append(entry["sha256"])
    if hashed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache_file, json.dumps(cache, indent=0))
        except OSError:  # a read-only home: hash again next time
            pass
    return digests


def kohya_base_hashes(base: str | os.PathLike | None) -> dict[str, str]:
    """kohya's ss_sd_model_hash and ss_new_sd_model_hash of a single-file base, which its train_network.py writes
    when the base is a path: A1111's legacy hash (sha256 of the 64 KiB at offset 1 MiB, 8 hex digits) and the file's
    sha256 (A1111's new hash; its first 10 digits are the PNG `Model hash`). {} for a folder, a hub id or toy: A1111
    hashes no folder, and kohya's "IsADirectory" there would read as a hash. The sha256 comes from the cache above,
    so a base of gigabytes is read once, not once per run."""
    if not base or not Path(base).is_file():
        return {}
    with open(base, "rb") as handle:
        handle.seek(0x100000)
        legacy = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": _file_sha256s([Path(base)])[0]}


def source_hash(source: str | Path) -> str | None:
    """Short hash of a checkpoint file or diffusers folder (None when the path does not exist)."""
    source = Path(source)
    if source.is_file():
        return _file_sha256s([source])[0][:A1111_MODEL_HASH_LENGTH]
    if not source.is_dir():
        return None
    weights = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for path, file_digest in zip(weights, _file_sha256s(weights)):
        digest.update(f"{path.relative_to(source).as_posix()}\0{file_digest}\n".encode())
    return digest.hexdigest()[:A1111_MODEL_HASH_LENGTH]


def _display_name(source: Path) -> str:
    from stylelora.models.load import TOY_BASE_DIR

    if source.resolve() == TOY_BASE_DIR.resolve():
        return "toy"
    return source.stem if source.is_file() else source.name


def base_identity(pipe: Any) -> BaseIdentity:
    """The pipeline's BaseIdentity, computed on first use from where it was loaded (pipe.name_or_path)."""
    identity = getattr(pipe, IDENTITY_ATTRIBUTE, None)
    if identity is None:
        source = getattr(pipe, "name_or_path", None)
        if source and Path(source).exists():
            identity = BaseIdentity(_display_name(Path(source)), source_hash(source))
        else:
            identity = BaseIdentity(str(source) if source else "unknown", None)
        set_base_identity(pipe, identity)
    return identity


def set_base_identity(pipe: Any, identity: BaseIdentity) -> None:
    """Record what a pipeline is, e.g. a hub id the loader resolved, or a hash known from elsewhere."""
    object.__setattr__(pipe, IDENTITY_ATTRIBUTE, identity)
