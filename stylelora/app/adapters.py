"""The app's adapter stack: the library's AdapterStack (its module and shape checks, its exact restore) plus what a
shared server needs from it.

- Finite values: an adapter holding NaN or inf would give black images without a word; it is refused when read.
- The hash written into a PNG (`Lora hashes`) names the bytes that were fused: it is taken from the file while it
  is read (and the read is repeated if the file changed meanwhile), and within one request (`pinned()`) a file is
  read once, so a file overwritten while an image is sampled cannot lend the PNG its new hash.
- `check(path)`: the whole check (layout, modules and shapes against this base, finite values) on a file that is
  not used yet, e.g. an upload; nothing is cached.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stylelora.generate.stack import STACK_ATTRIBUTE, AdapterStack, AdapterStackError, LoadedAdapter
from stylelora.lora.adapter_file import weights_path

READ_ATTEMPTS = 3


class AppAdapterStack(AdapterStack):
    """AdapterStack with finite-value checks, hashes of the bytes read, and per-request pinning."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self._pins = threading.local()

    @classmethod
    def install(cls, pipe: Any) -> AppAdapterStack:
        """The pipeline's stack, made an AppAdapterStack (a plain one already there is cleared and replaced)."""
        current = getattr(pipe, STACK_ATTRIBUTE, None)
        if isinstance(current, cls):
            return current
        if current is not None:
            current.clear()  # the base weights back, bit for bit, before another stack owns them
        stack = cls(pipe)
        setattr(pipe, STACK_ATTRIBUTE, stack)
        return stack

    def _read(self, path: Path) -> LoadedAdapter:
        from stylelora.lora.io import file_model_hash

        for _ in range(READ_ATTEMPTS):
            before = file_model_hash(path)
            loaded = super()._read(path)
            if file_model_hash(path) == before:  # the tensors read are the bytes hashed
                break
        else:
            raise AdapterStackError(f"{path.name} changed on disk while it was read, {READ_ATTEMPTS} times; "
                                    "generate again once it is written.")
        _check_finite(loaded)
        loaded._hash = before
        return loaded

    def load(self, path) -> LoadedAdapter:
        pins = getattr(self._pins, "files", None)
        key = weights_path(path).resolve()
        if pins is not None and key in pins:
            return pins[key]
        loaded = super().load(path)
        if pins is not None:
            pins[key] = loaded
        return loaded

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Within this block (this thread), each file is read once: what is fused is what the PNG names."""
        outer = getattr(self._pins, "files", None)
        if outer is None:
            self._pins.files = {}
        try:
            yield
        finally:
            if outer is None:
                self._pins.files = None

    def check(self, path: str | Path) -> list[str]:
        """Read and check a file as generation would, without caching it; returns the warnings (skipped modules)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._read(weights_path(path).resolve())
        return [str(warning.message) for warning in caught]


def _check_finite(adapter: LoadedAdapter) -> None:
    import torch

    bad = sorted(f"{component}:{path}" for (component, path), factors in adapter.modules.items()
                 if not (torch.isfinite(factors.up).all() and torch.isfinite(factors.down).all()
                         and torch.isfinite(torch.tensor(factors.scale))))
    if bad:
        raise AdapterStackError(
            f"{adapter.path.name} holds NaN or infinite values in {len(bad)} of {len(adapter.modules)} LoRA modules "
            f"(e.g. {', '.join(bad[:2])}); it would make black images. Use another copy of the file, or retrain it "
            "(a lower learning rate or --precision fp32 keeps training finite). Nothing was applied."
        )
