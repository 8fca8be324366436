"""X/Y/Z grids: one request varied along two or three axes (adapter, weight, blocks, seed, cfg, steps, blend mode,
dial, clip skip, sampler, prompt words) into one PNG.

Axes: `adapter` adds one adapter per column/row ("none" for the base); `weight`, `unet_weight`, `te_weight` set
the weight of the axis adapter, or of a named target, or of every adapter in the request, and `blocks` its block
weights (`lbw=` values, separated by `;` since a value holds commas; "none" for none); `seed`, `cfg`, `steps`
`blend_mode` (sum, ties, split: the same adapters combined each way) and `dial` (weights, reading: what the weights
turn), `clip_skip` and `sampler` replace the request's value; `prompt` is A1111's Prompt S/R (the first value is
the words to find, each value what they become, in the prompt and the negative prompt). Every cell
shares the request's (resolved) seed unless seed is an axis, so cells differ only by what the axes say.
Kinds are read in any case, and by the labels of A1111's X/Y/Z plot too (`CFG Scale`, `Prompt S/R`), which the grid's
PNG records as its `X Type` where A1111 has the kind, beside the values as typed (`X Values`).
A Z axis, as in A1111's X/Y/Z plot, draws one X/Y grid per Z value, side by side under their Z values.
"""
from __future__ import annotations

import math
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stylelora.generate.generate import MAX_SEED, GeneratedImage, GenerateRequest, ProgressCallback, generate
from stylelora.generate.prompt_tags import format_weight
from stylelora.generate.reading_dial import check_dial
from stylelora.lora.spec import AdapterSpec

AXIS_KINDS = ("adapter", "weight", "unet_weight", "te_weight", "blocks", "seed", "cfg", "steps", "blend_mode",
              "dial", "clip_skip", "sampler", "prompt")
# A1111's X/Y/Z plot labels of the kinds it has too: accepted as kind names, and the grid PNG's X Type / Y Type.
A1111_LABELS = {"seed": "Seed", "steps": "Steps", "cfg": "CFG Scale", "sampler": "Sampler", "prompt": "Prompt S/R",
                "clip_skip": "Clip skip"}
# What a kind may be called, compared in lower case with "_" as a space: ours (clip_skip, clip skip), A1111's labels.
KIND_NAMES = {**{kind.replace("_", " "): kind for kind in AXIS_KINDS},
              **{label.lower(): kind for kind, label in A1111_LABELS.items()}}
NO_ADAPTER = "none"
NO_BLOCKS = "none"
LABELS = {"weight": "w", "unet_weight": "unet", "te_weight": "te", "blocks": "lbw", "seed": "seed", "cfg": "cfg",
          "steps": "steps", "blend_mode": "mode", "dial": "dial", "clip_skip": "clip skip"}
REPLACED_FIELDS = ("seed", "cfg", "steps", "blend_mode", "dial", "clip_skip", "sampler")  # replace one request field
# The axes of numbers, each with its type: the values are cast with it, and ranges (below) expand only on them.
NUMBER_CASTS = {"weight": float, "unet_weight": float, "te_weight": float, "cfg": float, "seed": int, "steps": int,
                "clip_skip": int}
# A1111's X/Y plot ranges: "1-5" (step 1), "1-10 (+2)" (a step), "0-1 [5]" (a count, evenly spaced, ends included).
_NUMBER = r"[+-]?\d+(?:\.\d*)?"
RANGE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*({_NUMBER})\s*\)|\[\s*(\d+)\s*\])?\s*")
MAX_RANGE_VALUES = 1000  # more is a typo (seed=1-100000), not a grid anyone draws
EXAMPLES = {"seed": "seed=1,2,3 or seed=1-5", "steps": "steps=10,20,30 or steps=10-30 (+10)",
            "cfg": "cfg=3,5,7 or cfg=3-7 [3]", "clip_skip": "clip_skip=1,2 or clip_skip=1-2"}


@dataclass(frozen=True)
class XYAxis:
    """One grid axis: its kind, the values along it, (weight axes) which adapter file it sets, and the values' text
    as the user typed it (after "KIND="), which the grid's PNG records where it reads back as these values."""

    kind: str
    values: tuple
    target: Path | None = None
    typed: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", axis_kind(self.kind))
        if not self.values:
            raise ValueError(f"Grid axis {self.kind} has no values.")
        cast = NUMBER_CASTS.get(self.kind) or {"adapter": str, "blend_mode": _blend_mode, "dial": check_dial,
                                                "blocks": _blocks, "sampler": _sampler, "prompt": str}[self.kind]
        object.__setattr__(self, "values", tuple(_cast(cast, v, self.kind) for v in self.values))

    @property
    def type_name(self) -> str:
        """The kind as the grid's PNG records it (X Type): A1111's label where its X/Y/Z plot has the kind."""
        return A1111_LABELS.get(self.kind, self.kind)

    def values_text(self) -> str:
        """The values as the grid's PNG records them: as typed, as A1111 records them (`CFG Scale=3,5` as "3,5", not
        "3.0, 5.0"), where that text reads back as these values; else "; " between block-weight values, which hold
        commas, and Prompt S/R values as one CSV row (quoted where they hold commas), as A1111 writes them."""
        if self.typed is not None and self._reads_back(self.typed):
            return self.typed
        if self.kind == "prompt":
            return _csv_row(self.values)
        return ("; " if self.kind == "blocks" else ", ").join(map(str, self.values))

    def _reads_back(self, text: str) -> bool:
        """Whether `text` parses as these values (not where they were changed since: seed -1 as the drawn seeds)."""
        try:
            return XYAxis(self.kind, tuple(axis_values(self.kind, text))).values == self.values
        except ValueError:
            return False

    def label(self, value: Any, *, added: bool = False) -> str:
        """The value's row or column label; added: the adapter axis adds to adapters every cell has already."""
        if self.kind == "adapter":
            if value == NO_ADAPTER:
                return "none added" if added else "base"
            return f"+{Path(value).stem}" if added else Path(value).stem
        if self.kind in ("prompt", "sampler"):
            return str(value) or "(removed)"  # A1111 labels a Prompt S/R cell with its words
        return f"{LABELS[self.kind]} {format_weight(value) if isinstance(value, float) else value}"


def _kind_key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def axis_kind(name: str) -> str:
    """The kind an axis name means: ours in any case (`seed`, `Seed`, `clip skip`), or A1111's label (`CFG Scale`)."""
    kind = KIND_NAMES.get(_kind_key(name))
    if kind is None:
        raise ValueError(f"Unknown grid axis {name!r}; choose one of {accepted_kinds()}.")
    return kind


def accepted_kinds() -> str:
    """The axis names a refusal lists."""
    return f"{', '.join(AXIS_KINDS)} (any case), or A1111's {', '.join(A1111_LABELS.values())}"


def _cast(cast, value: Any, kind: str) -> Any:
    """`cast(value)`, with Python's "invalid literal for int()" put in words that say what the axis takes."""
    if cast not in (int, float) or not isinstance(value, str):
        return cast(value)
    try:
        return cast(value)
    except ValueError:
        example = EXAMPLES.get(kind, f"{kind}=0,0.5,1 or {kind}=0-1 [3]")
        what = "whole numbers" if cast is int else "numbers"
        raise ValueError(f"{value!r} is not a number: {kind} values are {what}, e.g. {example}.") from None


def _blocks(value: str) -> str:
    from stylelora.lora.block_weights import PRESETS, parse_ratios

    if "," in value and any(part.strip().upper() in PRESETS for part in value.split(",")):
        raise ValueError(f"{value!r} names presets between commas: separate block-weight values with ';' "
                         "(blocks=ALL;OUTALL), since the commas separate one value's numbers.")
    if value != NO_BLOCKS:
        parse_ratios(value)
    return value


def axis_values(kind: str, text: str) -> list[str]:
    """The values of "KIND=..." after the "=": separated by commas, or for block weights (which hold commas) by
    semicolons; Prompt S/R values are one CSV row, as A1111 reads them, so a quoted value may hold commas."""
    kind = KIND_NAMES.get(_kind_key(kind), kind.strip())  # an unknown kind is refused by whoever makes the axis
    if kind == "prompt":
        import csv

        values = [value.strip() for value in next(csv.reader([text], skipinitialspace=True), [])]
        return values if values and values[0] else []  # later values may be empty: the words taken out
    values = [value.strip() for value in text.split(";" if kind == "blocks" else ",") if value.strip()]
    if kind not in NUMBER_CASTS:
        return values
    return [item for value in values for item in expand_range(kind, value)]


def expand_range(kind: str, value: str) -> list[str]:
    """One value of a number axis as A1111's X/Y plot reads it: `1-5` is 1,2,3,4,5; `1-10 (+2)` steps by 2 (up to
    10, never past it); `0-1 [5]` is 5 values evenly spaced, both ends included; anything else is itself."""
    match = RANGE.fullmatch(value)
    if match is None:
        return [value]
    start, end = float(match.group(1)), float(match.group(2))
    whole = NUMBER_CASTS[kind] is int
    if match.group(4) is not None:
        count = int(match.group(4))
        step = (end - start) / (count - 1) if count > 1 else 0.0
    else:
        step = float(match.group(3)) if match.group(3) is not None else (1.0 if end >= start else -1.0)
        if step == 0 or (end - start) * step < 0:
            raise ValueError(f"{value!r}: a step of {format_weight(step)} never gets from {format_weight(start)} to "
                             f"{format_weight(end)}; write e.g. {kind}=1-10 (+2), or 10-1 (-2) to count down.")
        count = math.floor((end - start) / step + 1e-9) + 1
    if whole and not all(float(number).is_integer() for number in (start, end, step if match.group(3) else 0)):
        raise ValueError(f"{value!r}: {kind} values are whole numbers, so a {kind} range is too, e.g. "
                         f"{EXAMPLES[kind].split(' or ')[-1]}.")
    if not 1 <= count <= MAX_RANGE_VALUES:
        raise ValueError(f"{value!r} gives {count} values; a range gives 1 to {MAX_RANGE_VALUES}: use a larger step "
                         f"(+N) or a count [N].")
    numbers = (start + step * i for i in range(count))
    # Whole kinds round down as A1111 does for [N]; others are rounded so 0.1 steps read 0.3, not 0.30000000000000004.
    return [str(math.floor(n + 1e-9)) if whole else format_weight(round(n, 10)) for n in numbers]


def _csv_row(values: tuple) -> str:
    import csv
    import io

    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(values)
    return out.getvalue()


def _sampler(value: str) -> str:
    from stylelora.generate.samplers import resolve_sampler

    resolve_sampler(value)  # an unknown name fails here, with the list, before any cell is drawn
    return value


def replaced_words(request: GenerateRequest, axis: XYAxis, value: str) -> dict[str, str]:
    """A1111's Prompt S/R: the axis's first value is the words to find, each value what they become, in the prompt
    and the negative prompt; the words must be in one of them."""
    search = axis.values[0]
    if search not in request.prompt and search not in request.negative_prompt:
        raise ValueError(f"Prompt S/R: {search!r} (the prompt axis's first value, the words each value replaces) is "
                         "in neither the prompt nor the negative prompt: start the axis with words the prompt has.")
    return {"prompt": request.prompt.replace(search, value), "negative_prompt": request.negative_prompt.replace(
        search, value)}


def _blend_mode(value: str) -> str:
    from stylelora.lora.blend_modes import check_mode

    return check_mode(value)


def parse_axis(text: str) -> XYAxis:
    """"KIND=V1,V2,..." (e.g. "seed=1,2,3", "weight=0,0.5,1", "adapter=a.safetensors,none", "CFG Scale=3-7 [3]")."""
    kind, sep, values = text.partition("=")
    if not sep or not values.strip():
        raise ValueError(f"Grid axis {text!r}: write KIND=V1,V2,... with KIND one of {accepted_kinds()}.")
    try:
        return XYAxis(kind, tuple(axis_values(kind, values)), typed=values.strip())
    except ValueError as error:
        raise ValueError(f"Grid axis {text!r}: {error}") from error


@dataclass(frozen=True)
class XYGridResult:
    """Every cell's image (row-major: y rows, x columns; with a Z axis, one such X/Y grid per Z value in turn), the
    grid image and where it was saved."""

    images: list[GeneratedImage]
    grid: Any  # PIL.Image.Image
    path: Path | None
    columns: int


def _adapter_path(value: str, request: GenerateRequest) -> Path | None:
    from stylelora.generate.prompt_tags import ADAPTER_SUFFIX, PromptTagError, resolve_adapter_name
    from stylelora.lora.io import missing_adapter_message

    if value == NO_ADAPTER:
        return None
    if Path(value).is_file() or request.adapters_dir is None:
        return Path(value)
    try:
        return resolve_adapter_name(value, request.adapters_dir)
    except PromptTagError:
        if Path(value).is_absolute() or ("/" in value and value.endswith(ADAPTER_SUFFIX)):
            # A file's path was typed, not a name in the adapters folder: say the file is missing.
            raise FileNotFoundError(missing_adapter_message(Path(value))) from None
        raise


def _set_weights(specs: list[AdapterSpec], kind: str, value: float | str, target: Path | None) -> list[AdapterSpec]:
    chosen = [s for s in specs if target is None or s.path.resolve() == target.resolve()]
    if not chosen:
        raise ValueError(f"A {kind} axis needs an adapter to act on: add --lora, an adapter axis, or fix its target.")
    out = []
    for spec in specs:
        if spec in chosen and kind == "blocks":
            spec = replace(spec, blocks=None if value == NO_BLOCKS else value)
        elif spec in chosen and kind == "weight":
            spec = spec.with_weights(value)  # FILE:W, which the reading dial reads apart from FILE:W:W
        elif spec in chosen:
            unet = value if kind == "unet_weight" else spec.unet_weight
            te = value if kind == "te_weight" else spec.text_encoder_weight
            spec = spec.with_weights(unet, te)
        out.append(spec)
    return out


def cell_request(request: GenerateRequest, axes: list[tuple[XYAxis, Any]]) -> GenerateRequest:
    """The request of one cell: the adapter axis first (so weight axes can target it), then the others."""
    specs, changes = list(request.loras), {}
    axis_adapter = None
    for axis, value in sorted(axes, key=lambda pair: pair[0].kind != "adapter"):
        if axis.kind == "adapter":
            axis_adapter = _adapter_path(value, request)
            specs += [AdapterSpec(axis_adapter)] if axis_adapter else []
        elif axis.kind in REPLACED_FIELDS:
            changes[axis.kind] = value
        elif axis.kind == "prompt":
            changes.update(replaced_words(request, axis, value))
        elif axis.target is None and any(a.kind == "adapter" for a, _ in axes):
            # The weight of the axis adapter; on the "none" cell there is nothing to weigh.
            specs = _set_weights(specs, axis.kind, value, axis_adapter) if axis_adapter else specs
        else:
            specs = _set_weights(specs, axis.kind, value, axis.target)
    return replace(request, loras=tuple(specs), batch_size=1, **changes)


def precheck_grid(request: GenerateRequest, x: XYAxis, y: XYAxis | None, z: XYAxis | None = None) -> list[str]:
    """Every cell checked as `generate` checks a request, before a base loads: an adapter axis's missing file, a
    weight axis with no adapter to weigh or a steps value of 0 fails here, not after the cells before it were
    drawn. Returns the request's notes (precheck_request)."""
    from stylelora.generate.generate import precheck_request

    cells = grid_cells(x, y, z)
    notes = precheck_request(request)
    for axes in cells:
        precheck_request(cell_request(request, axes))
    return notes


def check_axis_kinds(x: XYAxis, y: XYAxis | None, z: XYAxis | None = None) -> None:
    """Refuse two axes of one kind: one would overwrite the other in every cell. A Z axis without a Y axis is one
    row per Z value, as in A1111."""
    if z is None:
        if y is not None and x.kind == y.kind:
            raise ValueError(f"Both grid axes are {x.kind}: pick two different kinds.")
        return
    axes = {name: axis for name, axis in (("X", x), ("Y", y), ("Z", z)) if axis is not None}
    for first, second in (("X", "Y"), ("X", "Z"), ("Y", "Z")):
        if first in axes and second in axes and axes[first].kind == axes[second].kind:
            raise ValueError(f"The {first} and {second} axes are both {axes[first].kind}: pick a different kind for "
                             "each axis, as one would overwrite the other in every cell.")


def grid_cells(x: XYAxis, y: XYAxis | None, z: XYAxis | None = None) -> list[list[tuple[XYAxis, Any]]]:
    """Each cell's (axis, value) pairs, row by row (rows: y values, columns: x values), one X/Y grid per z value in
    turn; axes that cannot make one grid are refused (check_axis_kinds)."""
    check_axis_kinds(x, y, z)
    rows = y.values if y is not None else (None,)
    grids = z.values if z is not None else (None,)
    return [[(x, xv)] + ([(y, yv)] if y is not None else []) + ([(z, zv)] if z is not None else [])
            for zv in grids for yv in rows for xv in x.values]


def _fixed_seeds(axis: XYAxis | None) -> XYAxis | None:
    """A seed axis's -1 values as random seeds, each its own, as A1111's X/Y plot fixes them: the label and the PNG
    then say which seed drew each cell (a "seed -1" cell could not be drawn again, so the typed -1 is not kept)."""
    if axis is None or axis.kind != "seed" or -1 not in axis.values:
        return axis
    drawn = tuple(secrets.randbelow(MAX_SEED + 1) if v == -1 else v for v in axis.values)
    return replace(axis, values=drawn, typed=None)


def has_adapters(request: GenerateRequest) -> bool:
    """Whether every cell has adapters before an adapter axis adds one (--lora flags or <lora:...> tags)."""
    from stylelora.generate.prompt_tags import parse_prompt

    return bool(request.loras) or bool(parse_prompt(request.prompt)[1])


def xy_grid(pipe: Any, stack: Any, request: GenerateRequest, x: XYAxis, y: XYAxis | None = None,
            z: XYAxis | None = None, *, out_path: str | os.PathLike | None = None,
            progress: ProgressCallback | None = None) -> XYGridResult:
    """Generate every cell (rows: y values, columns: x values; one X/Y grid per z value) and tile them with labels
    into one PNG; progress counts the cells of every X/Y grid."""
    from stylelora.generate.pngmeta import save_png

    x, y, z = _fixed_seeds(x), _fixed_seeds(y), _fixed_seeds(z)  # before the cells, labels and PNG's values are made
    cells = grid_cells(x, y, z)
    if request.seed == -1:
        request = replace(request, seed=secrets.randbelow(MAX_SEED + 1))  # one seed for every cell
    images: list[GeneratedImage] = []
    for index, axes in enumerate(cells):
        images += generate(pipe, stack, cell_request(request, axes))
        if progress:
            progress(index + 1, len(cells))
    grid = _draw_grid(images, x, y, z, added=has_adapters(request))
    path = None
    if out_path is not None:
        params = images[0].params
        extra = {"Script": "X/Y/Z plot"}
        for name, axis in (("X", x), ("Y", y), ("Z", z)):
            if axis is not None:
                extra.update({f"{name} Type": axis.type_name, f"{name} Values": axis.values_text()})
        path = save_png(grid, replace(params, extra={**params.extra, **extra}), out_path)
    return XYGridResult(images=images, grid=grid, path=path, columns=len(x.values))


def _draw_grid(images: list[GeneratedImage], x: XYAxis, y: XYAxis | None, z: XYAxis | None, *, added: bool) -> Any:
    """The labelled grid image: one X/Y grid, or with a Z axis one per Z value side by side under its Z value."""
    from stylelora.grid import make_grid, make_z_grid

    scale = 3 if images[0].image.width <= 64 else 1
    labels = {"column_labels": [x.label(v, added=added) for v in x.values],
              "row_labels": [y.label(v, added=added) for v in y.values] if y is not None else None}
    pictures = [g.image for g in images]
    if z is None:
        return make_grid(pictures, len(x.values), scale=scale, **labels)
    return make_z_grid(pictures, len(x.values), [z.label(v, added=added) for v in z.values], scale=scale, **labels)
