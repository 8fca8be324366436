"""The app's refusals: AppError, whose message is shown to the user as is, and the check of names a user types."""
from __future__ import annotations

import re

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


class AppError(ValueError):
    """A request the app refuses; the message says why and what to do instead (shown to the user as is)."""


def plain_name(text: str, what: str) -> str:
    """A file name the user typed, checked: no folders, no odd characters, and without `.safetensors`."""
    name = (text or "").strip().removesuffix(".safetensors")
    if not PLAIN_NAME.match(name):
        raise AppError(f"{what} {text!r} is not a plain name: use letters, digits, '.', '_', '-' or spaces "
                       "(no '/' or '..'), e.g. 'stripes-pastel'.")
    return name
