"""How a subcommand reports bad input: one `error: ...` line on stderr and exit status 2; a bug keeps its traceback."""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def input_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input, reported in one line, not a bug: a value to fix, a file that is not there, a
    base that cannot be read. Every subcommand, share and the app treat them alike."""
    from stylelora.models.load import BaseModelError  # no heavy import: the module loads torch lazily

    return (ValueError, FileNotFoundError, BaseModelError)


def report_user_errors(user_errors: Callable[[], tuple[type[Exception], ...]]) -> Callable[[Handler], Handler]:
    """Decorate a subcommand handler: an exception of `user_errors()` (bad input, not a bug) becomes one
    `error: ...` line on stderr and exit status 2; any other exception keeps its traceback."""
    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(args: argparse.Namespace) -> int:
            try:
                return handler(args)
            except user_errors() as error:
                print(f"error: {error}", file=sys.stderr)
                return 2

        return run

    return decorate
