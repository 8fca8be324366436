"""A handler set for a `with` block: training's Ctrl-C and the app's SIGTERM put the previous handler back."""
from __future__ import annotations

import signal
import threading

from stylelora.signals import handling


def test_a_handler_is_set_in_the_block_and_the_previous_one_restored():
    def mine(signum, frame):
        pass

    before = signal.getsignal(signal.SIGTERM)
    with handling(signal.SIGTERM, mine) as handled:
        assert handled and signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_nothing_is_set():
    """Python refuses a handler there (ValueError); a training run the app starts in a thread must still run."""
    seen = []

    def in_a_thread():
        with handling(signal.SIGTERM, lambda signum, frame: None) as handled:
            seen.append((handled, signal.getsignal(signal.SIGTERM)))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [(False, before)]
