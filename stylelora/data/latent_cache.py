"""Owns caching VAE latents and text-encoder outputs so each is computed once, never reused stale.

A latent is stored under a digest of everything that determines it: the image file's SHA-256, the bucket
size, the crop box, the flip, the VAE's identity string and the version of our pixel pipeline. Change
any of them and the key changes, so an edited image or another VAE is encoded afresh. Text-encoder
outputs are keyed by (caption, text-encoder identity); cache them only while the text encoder is frozen
and captions are static (`CaptionOptions.is_static`). An entry is one tensor, or a tuple of them (SDXL's hidden
states and pooled embedding of one caption).

Entries live in RAM (a dict) or on disk, one `.safetensors` file per key under `cache_dir/ab/`, written
to a temp file and renamed into place (a crash leaves the old entry or none, never half of one) and read
only when asked for, so memory stays flat however large the dataset. The encoders are passed in as
plain functions (`encode_fn(pixels (B,3,H,W) in [-1,1]) -> latents (B,...)`), so nothing here imports
diffusers and tests can count calls with a dummy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# Bump when resizing/cropping/normalisation changes, so latents made by the old pipeline are not reused.
PIXEL_PIPELINE_VERSION = "pixels-v1"

EncodeFn = Callable[[torch.Tensor], torch.Tensor]
Value = torch.Tensor | tuple[torch.Tensor, ...]
TextEncodeFn = Callable[[list[str]], Value]  # a tuple: several tensors per caption, each batched (B, ...)
SINGLE_KEY = "value"


@dataclass(frozen=True)
class LatentKey:
    content_sha256: str
    bucket: tuple[int, int]  # (width, height)
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    flipped: bool
    vae_id: str
    pipeline: str = PIXEL_PIPELINE_VERSION

    def digest(self) -> str:
        return _digest(asdict(self))


@dataclass
class CacheStats:
    hits: int = 0
    encoded: int = 0  # entries computed (one per sample)
    encode_calls: int = 0  # calls of the encode function (batches)


class TensorStore:
    """digest → tensor (or tuple of tensors), in a dict (cache_dir None) or as one safetensors file per digest."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, Value] = {}
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        if self.cache_dir is None:
            return len(self._memory)
        return sum(1 for _ in self.cache_dir.glob("*/*.safetensors"))

    @property
    def tensors_in_memory(self) -> int:
        return len(self._memory)

    def path_for(self, digest: str) -> Path:
        assert self.cache_dir is not None, "a RAM store has no files"
        return self.cache_dir / digest[:2] / f"{digest}.safetensors"

    def __contains__(self, digest: str) -> bool:
        return digest in self._memory if self.cache_dir is None else self.path_for(digest).is_file()

    def get(self, digest: str) -> Value | None:
        if self.cache_dir is None:
            cached = self._memory.get(digest)
            return None if cached is None else _map(cached, torch.Tensor.clone)  # callers may scale latents in place
        path = self.path_for(digest)
        try:
            tensors = load_file(path)
            if SINGLE_KEY in tensors:
                return tensors[SINGLE_KEY]
            return tuple(tensors[f"{SINGLE_KEY}{i}"] for i in range(len(tensors)))
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, KeyError):
            path.unlink(missing_ok=True)  # unreadable entry (disk trouble, foreign file): recompute it
            return None

    def put(self, digest: str, tensor: Value, metadata: dict[str, str]) -> None:
        # own storage: no view into a batch
        tensor = _map(tensor, lambda part: part.detach().to("cpu").contiguous().clone())
        if self.cache_dir is None:
            self._memory[digest] = tensor
            return
        path = self.path_for(digest)
        path.parent.mkdir(exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{digest[:8]}.", suffix=".tmp")
        os.close(handle)
        try:
            parts = {SINGLE_KEY: tensor} if isinstance(tensor, torch.Tensor) else \
                {f"{SINGLE_KEY}{i}": part for i, part in enumerate(tensor)}
            save_file(parts, temp, metadata=metadata)
            os.replace(temp, path)  # atomic: concurrent writers of one key both write whole files
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


class LatentCache:
    """VAE latents by LatentKey; `fill` encodes what is missing in same-size batches."""

    def __init__(self, encode_fn: EncodeFn, vae_id: str, cache_dir: str | Path | None = None):
        if not vae_id:
            raise ValueError("vae_id must name the exact VAE (e.g. model_identity('vae', vae)) so latents "
                             "from another VAE are never reused")
        self.encode_fn, self.vae_id = encode_fn, vae_id
        self.store = TensorStore(cache_dir)
        self.stats = CacheStats()

    def key(self, content_sha256: str, bucket: tuple[int, int], crop_box: tuple[int, int, int, int],
            flipped: bool) -> LatentKey:
        return LatentKey(content_sha256, tuple(bucket), tuple(crop_box), bool(flipped), self.vae_id)

    def __contains__(self, key: LatentKey) -> bool:
        return key.digest() in self.store

    def get_or_encode(self, key: LatentKey, load_pixels: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached latent, or encode `load_pixels()` (C,H,W) now and cache it."""
        cached = self.store.get(key.digest())
        if cached is not None:
            self.stats.hits += 1
            return cached
        return self._encode_and_store([(key, load_pixels)])[0]

    def fill(self, requests: Iterable[tuple[LatentKey, Callable[[], torch.Tensor]]], batch_size: int = 8,
             max_pixels: int | None = None) -> int:
        """Encode every request not cached yet, batching same-size ones; returns how many were encoded.

        A batch holds at most `batch_size` images and, when `max_pixels` is given, at most that many pixels (at least
        one image): the VAE encoder's activations grow with the pixels it sees at once."""
        missing: dict[str, tuple[LatentKey, Callable]] = {}
        for key, load_pixels in requests:
            digest = key.digest()
            if digest not in missing and digest not in self.store:
                missing[digest] = (key, load_pixels)
        by_size: dict[tuple[int, int], list] = {}
        for key, load_pixels in missing.values():
            by_size.setdefault(key.bucket, []).append((key, load_pixels))
        for (width, height), group in by_size.items():
            size = batch_size if max_pixels is None else max(1, min(batch_size, max_pixels // (width * height)))
            for start in range(0, len(group), size):
                self._encode_and_store(group[start: start + size])
        return len(missing)

    def _encode_and_store(self, batch: Sequence[tuple[LatentKey, Callable]]) -> list[torch.Tensor]:
        pixels = torch.stack([load_pixels() for _, load_pixels in batch])
        with torch.no_grad():
            latents = self.encode_fn(pixels)
        self.stats.encode_calls += 1
        self.stats.encoded += len(batch)
        for (key, _), latent in zip(batch, latents):
            self.store.put(key.digest(), latent, {k: json.dumps(v) for k, v in asdict(key).items()})
        return list(latents)


class TextEmbeddingCache:
    """Text-encoder outputs by (caption, text-encoder identity), for a frozen TE and static captions."""

    def __init__(self, encode_fn: TextEncodeFn, text_encoder_id: str, cache_dir: str | Path | None = None):
        if not text_encoder_id:
            raise ValueError("text_encoder_id must name the exact text encoder and tokenizer")
        self.encode_fn, self.text_encoder_id = encode_fn, text_encoder_id
        self.store = TensorStore(cache_dir)
        self.stats = CacheStats()

    def digest(self, caption: str) -> str:
        return _digest({"caption": caption, "text_encoder": self.text_encoder_id})

    def get_or_encode(self, captions: Sequence[str]) -> Value:
        """Embeddings for `captions`, stacked (B, ...) (a tuple of such when the encoder gives several); the missing
        ones are encoded in one call."""
        found = {caption: self.store.get(self.digest(caption)) for caption in dict.fromkeys(captions)}
        missing = [caption for caption, value in found.items() if value is None]
        self.stats.hits += len(captions) - sum(1 for c in captions if c in missing)
        if missing:
            with torch.no_grad():
                encoded = self.encode_fn(missing)
            self.stats.encode_calls += 1
            self.stats.encoded += len(missing)
            rows = list(zip(*encoded)) if isinstance(encoded, tuple) else list(encoded)
            for caption, value in zip(missing, rows):
                self.store.put(self.digest(caption), value, {"caption": caption, "text_encoder": self.text_encoder_id})
                found[caption] = _map(value, lambda part: part.detach().to("cpu"))
        values = [found[caption] for caption in captions]
        if isinstance(values[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*values))
        return torch.stack(values)


def model_identity(name: str, module: torch.nn.Module) -> str:
    """`name@<digest of every weight, dtype and shape>`: a retrained or re-cast model gets a new identity."""
    hasher = hashlib.sha256()
    for param_name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{param_name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{name}@{hasher.hexdigest()[:16]}"


def _map(value: Value, function: Callable[[torch.Tensor], torch.Tensor]) -> Value:
    return function(value) if isinstance(value, torch.Tensor) else tuple(function(part) for part in value)


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
