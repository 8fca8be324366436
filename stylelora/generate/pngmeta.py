"""A1111 `parameters` text: the exact settings of one image, written into its PNG and parsed back.

Format (what A1111, ComfyUI importers and civitai read):
    <prompt as typed, its <lora:name:w> tags where they were typed> <lora:other:w> ...
    Negative prompt: <negative>
    Steps: 25, Sampler: DDIM, CFG scale: 5, Seed: 7, Size: 32x32, Model hash: 0123456789, Model: toy,
    Lora hashes: "name: 0123456789ab, other: ..."
(the last two lines are one line); the tags after the prompt are those of adapters given beside it (--lora, the
app's list). Numbers are written so they read back as the same values.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stylelora.generate.prompt_tags import (LoraTag, format_weight, parse_prompt, prompt_with_tags,
                                            without_trailing_tags)

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
SETTINGS_LINE_MARKERS = ("Steps: ", "Sampler: ", "Seed: ")


@dataclass(frozen=True)
class LoraUse:
    """One adapter as used for an image: the name its tag carries, weights, A1111 short hash (may be empty), and its
    block weights (`lbw=`) when it had any."""

    name: str
    unet_weight: float
    te_weight: float
    hash: str = ""
    blocks: str | None = None

    @property
    def tag(self) -> LoraTag:
        return LoraTag(self.name, self.unet_weight, self.te_weight, self.blocks)


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides one image, plus where it came from. `prompt` is as typed, its <lora:...> tags where
    they were typed: they are the first of `loras`, whose others' tags go after it (prompt_with_tags)."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    sampler: str
    seed: int
    width: int
    height: int
    model: str | None = None
    model_hash: str | None = None
    loras: tuple[LoraUse, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)  # fields we write or read but do not interpret

    @property
    def prompt_with_tags(self) -> str:
        return prompt_with_tags(self.prompt, [lora.tag for lora in self.loras])

    def to_text(self) -> str:
        return format_parameters(self)

    def with_seed(self, seed: int) -> GenerationParams:
        return replace(self, seed=seed)


def _quote_if_needed(value: str) -> str:
    """As A1111's infotext quote(): a value holding ',', ':', '"' or a newline as a JSON string (quotes and
    backslashes escaped), so its parser, and ours, read it back whole."""
    return json.dumps(value, ensure_ascii=False) if any(ch in value for ch in ',:"\n') else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:  # another tool's quotes without JSON escapes
            return value[1:-1]
    return value


def _clean_field(value: str) -> str:
    """Model names go on the comma-separated line: commas and newlines would break it (A1111 strips them too)."""
    return " ".join(value.replace(",", " ").split())


def format_parameters(params: GenerationParams) -> str:
    """The A1111 `parameters` text of one image."""
    fields = {
        "Steps": str(params.steps),
        "Sampler": params.sampler,
        **({"Schedule type": schedule} if (schedule := _a1111_schedule(params.sampler)) else {}),
        "CFG scale": format_weight(params.cfg_scale),
        "Seed": str(params.seed),
        "Size": f"{params.width}x{params.height}",
    }
    if params.model_hash:
        fields["Model hash"] = params.model_hash
    if params.model:
        fields["Model"] = _clean_field(params.model)
    # Once per name: an adapter both tagged and given beside the prompt has two tags but one file.
    hashes = list(dict.fromkeys(f"{_hash_name(lora.name)}: {lora.hash}" for lora in params.loras if lora.hash))
    if hashes:
        fields["Lora hashes"] = _quote_if_needed(", ".join(hashes))
    fields.update({key: _quote_if_needed(value) for key, value in params.extra.items()})
    lines = [params.prompt_with_tags]
    if params.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {params.negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


def _a1111_schedule(sampler: str) -> str | None:
    """The "Schedule type" A1111 needs to redraw this sampler as it was drawn (see samplers.Sampler), or None."""
    from stylelora.generate.samplers import SAMPLERS, resolve_sampler

    try:
        return resolve_sampler(sampler).a1111_schedule
    except ValueError:  # another tool's sampler, or one whose package is not installed here
        key = next((s for s in SAMPLERS.values() if s.display == sampler), None)
        return key.a1111_schedule if key else None


def _split_fields(line: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, value"` -> {key: value}; commas inside quotes stay in the value."""
    fields, parts, current, quoted, escaped = {}, [], [], False, False
    for char in line:
        if quoted and escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True  # \" inside a quoted value is a quote, not its end
        elif char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    for part in parts:
        key, sep, value = part.strip().partition(": ")
        if sep:
            fields[key.strip()] = _unquote(value.strip())
    return fields


def _hash_name(name: str) -> str:
    """An adapter's name in `Lora hashes`: without ':' and ',', which separate its entries (as A1111 writes it)."""
    return name.replace(":", "").replace(",", "")


def _lora_hashes(text: str | None) -> dict[str, str]:
    pairs = (item.split(":", 1) for item in (text or "").split(",") if ":" in item)
    return {name.strip(): digest.strip() for name, digest in pairs}


def parse_parameters(text: str) -> GenerationParams:
    """Parse A1111 `parameters` text (ours or another tool's) back into GenerationParams."""
    lines = text.strip("\n").split("\n")
    settings_line = lines[-1] if len(lines) > 1 or lines[-1].startswith(SETTINGS_LINE_MARKERS) else ""
    if not any(marker in settings_line for marker in SETTINGS_LINE_MARKERS):
        raise ValueError("Not A1111 parameters: no 'Steps: ..., Sampler: ..., Seed: ...' line at the end.")
    body = lines[:-1]
    negative_at = next((i for i, line in enumerate(body) if line.startswith(NEGATIVE_PREFIX)), len(body))
    prompt_text = "\n".join(body[:negative_at])
    negative = "\n".join(body[negative_at:])[len(NEGATIVE_PREFIX):].strip() if negative_at < len(body) else ""
    fields = _split_fields(settings_line)
    _, tags = parse_prompt(prompt_text)
    # Tags the prompt ends with are held in `loras` only, where format_parameters writes the tags that follow a
    # prompt: parsing what it wrote gives back the same GenerationParams.
    return _params_from_fields(fields, without_trailing_tags(prompt_text), negative, tags)


def _params_from_fields(fields: dict[str, str], prompt: str, negative: str, tags: list[LoraTag]) -> GenerationParams:
    known = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "Lora hashes")
    missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in fields]
    if missing:
        raise ValueError(f"A1111 parameters lack {', '.join(missing)}; cannot reproduce the image without them.")
    hashes = _lora_hashes(fields.get("Lora hashes"))
    width, _, height = fields["Size"].partition("x")
    sampler = fields["Sampler"]
    if fields.get("Schedule type", "").lower() == "karras" and not sampler.lower().endswith("karras"):
        sampler += " Karras"
    return GenerationParams(
        prompt=prompt, negative_prompt=negative, steps=int(fields["Steps"]), cfg_scale=float(fields["CFG scale"]),
        sampler=sampler, seed=int(fields["Seed"]), width=int(width), height=int(height),
        model=fields.get("Model"), model_hash=fields.get("Model hash"),
        # Looked up as written there: "style, v2" is "style v2" in Lora hashes, and its hash must not be lost.
        loras=tuple(LoraUse(t.name, t.unet_weight, t.te_weight, hashes.get(t.name, hashes.get(_hash_name(t.name), "")),
                            t.blocks) for t in tags),
        extra={key: value for key, value in fields.items() if key not in known},
    )


# ----------------------------------------------------------------------------- PNG files


def save_png(image: Any, params: GenerationParams | str, path: str | os.PathLike) -> Path:
    """Write `image` as PNG with its `parameters` text, atomically (temp file + rename)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, params if isinstance(params, str) else params.to_text())
    # A unique name in the same folder (rename stays atomic); created normally so the umask sets its mode
    # (mkstemp would leave the PNG readable by its owner only).
    temp_name = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        image.save(temp_name, format="PNG", pnginfo=info)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def read_png_parameters(path: str | os.PathLike) -> str:
    """The `parameters` text of a PNG written by us or A1111."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY) or getattr(image, "text", {}).get(PARAMETERS_KEY)
    if not text:
        raise ValueError(f"{Path(path).name} has no A1111 'parameters' text (was it re-saved by an editor?).")
    return text
