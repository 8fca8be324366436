"""Stopping a generation between sampling steps, and counting those steps, without touching the library's loop.

A `Watch` belongs to one request: it knows when the request is cancelled (a callable the UI supplies: the Stop
button, a client that cancelled or went away) and reports progress. While a request samples, its Watch is the
current one of its thread, and a forward pre-hook on the pipeline's UNet (one call per sampling step, installed
once per pipeline) ticks it: so a grid, whose cells the library samples without a step callback, is counted and
stopped step by step too. Requests sample one at a time under the adapter stack's lock, in their own threads.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from stylelora.app.errors import AppError

HOOK_ATTRIBUTE = "_stylelora_app_step_hook"
_current = threading.local()


class Cancelled(AppError):
    """The request was stopped (Stop, or its client went away); nothing was saved."""


class Watch:
    """One request's cancel check and step counter (steps: the sampling steps the request will take)."""

    def __init__(self, cancelled: Callable[[], bool] | None = None,
                 progress: Callable[[int, int], None] | None = None, total: int = 0, what: str = "generation"):
        self.cancelled, self.progress, self.total, self.what = cancelled, progress, total, what
        self.done = 0

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled(f"The {self.what} was stopped after {self.done} of {self.total} sampling steps; nothing "
                            "was saved.")

    def step(self) -> None:
        """A sampling step is about to run: stop here if asked, else report the steps done so far and count it."""
        self.check()
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.done = min(self.done + 1, self.total) if self.total else self.done + 1


def install_step_hook(pipe: Any) -> None:
    """Tick the current thread's Watch before each UNet call of `pipe` (once per pipeline)."""
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(unet, HOOK_ATTRIBUTE, False):
        return

    def before_unet(module, args):
        watch = getattr(_current, "watch", None)
        if watch is not None:
            watch.step()

    unet.register_forward_pre_hook(before_unet)
    setattr(unet, HOOK_ATTRIBUTE, True)


@contextmanager
def watching(watch: Watch | None) -> Iterator[Watch | None]:
    """Make `watch` the current thread's for the block (a request's sampling)."""
    outer = getattr(_current, "watch", None)
    _current.watch = watch
    try:
        if watch is not None:
            watch.check()  # stopped while it waited in the queue or for the lock: do not start
        yield watch
    finally:
        _current.watch = outer
