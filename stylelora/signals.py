"""A signal handler set for the span of a `with` block and restored after it: training's Ctrl-C, the app's SIGTERM."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def handling(signum: int, handler: Callable) -> Iterator[bool]:
    """Set `handler` for `signum` inside the block and put the previous one back after it. Yields whether it was set:
    Python lets only the main thread set handlers, so elsewhere (a training run the app starts in a thread) it sets
    nothing and yields False."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.signal(signum, handler)
    try:
        yield True
    finally:
        signal.signal(signum, previous)
