"""Which versions of the ML stack work together, checked at install time and by the test suite."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# transformers >= 5.24 requires peft >= 0.22 (not released on our registry); diffusers 0.42 is what the
# toy base and the kohya conversion were tested with.
REQUIREMENTS = {
    "diffusers": ("0.42.1", "0.43"),
    "transformers": ("5.20", "5.24"),
    "peft": ("0.21.2", "0.22"),
    "accelerate": ("1.15.0", "1.16"),
}


def _as_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(part) for part in v.split("+")[0].split(".")[:3] if part.isdigit())


def version_problems() -> list[str]:
    problems = []
    for package, (low, high) in REQUIREMENTS.items():
        try:
            have = version(package)
        except PackageNotFoundError:
            problems.append(f"{package} is not installed (need >={low},<{high})")
            continue
        if not (_as_tuple(low) <= _as_tuple(have) < _as_tuple(high)):
            problems.append(f"{package} {have} is outside the tested range >={low},<{high}")
    return problems


def check_versions() -> None:
    problems = version_problems()
    if problems:
        raise SystemExit("stylelora: incompatible packages: " + "; ".join(problems)
                         + ". Reinstall with `bash scripts/setup.sh` (it pins a working set).")
