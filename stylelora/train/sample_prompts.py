"""Owns the sample-prompt line syntax, kohya's: `PROMPT --n NEGATIVE --w 512 --h 768 --d 42 --l 7.5 --s 28`.

A kohya user's `prompts.txt` is read the way sd-scripts reads it, so the grids show what that user asked for instead
of the options typed into the image as words: each ` --X VALUE` after the prompt sets one thing for that prompt
(negative prompt, width, height, seed, CFG scale, steps); lines starting with `#` are comments. Options kohya has
that a sample grid here has no use for (its sampler, ControlNet image, flow shift, ...) are named and ignored; any
other option is refused before training starts, since it is most likely a typo that kohya would drop silently.
Light: no torch, so config validation can parse prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

from stylelora.config import SEED_LIMIT

OPTIONS = {"n": "NEGATIVE", "w": "WIDTH", "h": "HEIGHT", "d": "SEED", "l": "CFG scale", "s": "STEPS"}
# sd-scripts' other per-prompt options (library/train_util.py line_to_prompt_dict), with what each sets there.
KOHYA_ONLY = {"ss": "sampler", "g": "guidance of guidance-distilled models", "cn": "ControlNet image",
              "ctr": "CFG truncation", "rcfg": "CFG renormalisation", "fs": "flow shift"}
SIZE_STEP = 8  # every base's VAE downsamples by 8 (the toy base's by less): a size must divide into latents


@dataclass(frozen=True)
class SamplePrompt:
    """One sample-grid prompt and what it sets for itself; None: the run's value (size, seed, CFG, steps)."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    ignored: tuple[str, ...] = ()  # kohya's options that a sample grid here does not use, e.g. ("--ss euler_a",)


def parse_sample_prompt(line: str) -> SamplePrompt:
    """The prompt and options of one line (see the module docstring); ValueError saying how to write a bad one."""
    prompt, *parts = line.split(" --")
    values: dict = {}
    ignored = []
    for part in parts:
        key, _, text = part.strip().partition(" ")
        key, text = key.lower(), text.strip()
        if key in KOHYA_ONLY:
            ignored.append(f"--{part.strip()}")
        elif key in OPTIONS and text:
            values.update(_option(key, text, line))
        elif key in OPTIONS:
            raise ValueError(f"sample prompt {line!r}: --{key} needs a value, e.g. --{key} {OPTIONS[key]}")
        else:
            raise ValueError(f"sample prompt {line!r}: --{part.strip()} is not a sample-prompt option; after the "
                             "prompt write any of " + ", ".join(f"--{k} {v}" for k, v in OPTIONS.items())
                             + " (kohya's syntax)")
    return SamplePrompt(prompt=prompt.strip(), ignored=tuple(ignored), **values)


def _option(key: str, text: str, line: str) -> dict:
    if key == "n":
        return {"negative": text}
    try:
        value = float(text) if key == "l" else int(text)
    except ValueError:
        raise ValueError(f"sample prompt {line!r}: --{key} takes a {'number' if key == 'l' else 'whole number'} "
                         f"({OPTIONS[key]}), not {text!r}") from None
    if key in ("w", "h") and (value < SIZE_STEP or value % SIZE_STEP):
        raise ValueError(f"sample prompt {line!r}: --{key} {value} is no image size; use a multiple of {SIZE_STEP}, "
                         "e.g. 512")
    least = 0 if key == "d" else 1  # CFG 1 is no guidance, as train.sample_guidance
    if key == "d" and value >= SEED_LIMIT:
        raise ValueError(f"sample prompt {line!r}: --d (SEED) must be below 2**63, not {text!r}")
    if not least <= value < float("inf"):  # also false for nan
        raise ValueError(f"sample prompt {line!r}: --{key} ({OPTIONS[key]}) must be {least} or more, not {text!r}")
    field = {"w": "width", "h": "height", "d": "seed", "l": "guidance", "s": "steps"}[key]
    return {field: value}


def without_options(text: str) -> str:
    """`text` as a prompt with no per-prompt options: each " --" of its own (a caption's "a poster --- 0 stars")
    written " -", so that a prompt drawn from a caption never reads as kohya options."""
    while " --" in text:
        text = text.replace(" --", " -")
    return text


def is_comment(line: str) -> bool:
    """A prompts-file line sd-scripts skips: one starting with '#'."""
    return line.lstrip().startswith("#")


def ignored_options_note(prompts: tuple[str, ...]) -> str:
    """A line naming the kohya options the sample grids will not use, or ""."""
    ignored = sorted({option for line in prompts for option in parse_sample_prompt(line).ignored})
    if not ignored:
        return ""
    return (f"sample prompts: {', '.join(ignored)} ignored (kohya options a sample grid here does not use: "
            f"{', '.join(f'--{k} {v}' for k, v in KOHYA_ONLY.items())}).")
