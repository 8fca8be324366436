"""Owns importing the optional packages an option needs (bitsandbytes, prodigyopt): the module, or an error that
names the option, the install and the alternative, raised before any model loads."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingPackage(RuntimeError):
    """An option needs a package that cannot be imported here; the message says what to install or use instead."""


def import_optional(module: str, *, option: str, install: str, instead: str,
                    error: type[MissingPackage] = MissingPackage) -> ModuleType:
    """`module`, or `error`: "OPTION needs MODULE, which could not be imported (why). Install it with
    `pip install INSTALL` (or the extras), or INSTEAD." """
    try:
        return importlib.import_module(module)
    except Exception as cause:  # noqa: BLE001 - bitsandbytes fails with many error types when its binary can't load
        raise error(
            f"{option} needs {module}, which could not be imported ({type(cause).__name__}: {cause}). Install it "
            f"with `pip install {install}` (or `pip install 'stylelora[extras]'`), or {instead}."
        ) from cause
