"""A1111's prompt emphasis: `(words)`, `((words))`, `(words:1.3)` and `[words]` weigh how the text encoder's reading
of those words counts.

Why: A1111 users write `(zorb:1.2)` beside a style, and a prompt pasted from A1111 (or read back from one of its
PNGs) should draw what it drew there. The syntax is A1111's: `(` raises the words inside by 1.1, `[` lowers them by
1.1, `(words:W)` sets W, brackets nest and multiply, `\\(` `\\)` `\\[` `\\]` are literal brackets (a backslash escaping
nothing is dropped), an unclosed bracket weighs the rest of the prompt, a closing one with nothing open is text, and
a BREAK inside brackets breaks the window and leaves the brackets weighing the words around it. The math is
A1111's default ("Original"): each token's hidden states times its weight, then the whole reading rescaled to its
mean before weighting, so weights move words against each other rather than the prompt's overall strength (skipped
where that mean is near 0, as on the toy base, where it would divide by almost nothing). Pooled vectors are not
weighted.

The text encoder reads the prompt with the brackets removed. Each weighted span is tokenized apart, as A1111 does,
so `(red:1.2)circle` reads `red` and `circle` as two words (stylelora.generate.prompt_reading makes the token rows,
75-token windows and BREAK included, and installs the weighing for a draw).
"""
from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

Chunk = tuple[str, float]  # text, weight
UP, DOWN = 1.1, 1 / 1.1  # A1111's factors for one ( and one [
MEAN_FLOOR = 0.01  # below this share of the mean magnitude a reading's mean is not restored (see `weigh`)
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # A1111's: a BREAK among a span's words, inside brackets too
BREAK: Chunk = ("BREAK", -1.0)  # A1111's marker for a window break
POOLED_FIELDS = ("pooler_output", "text_embeds")  # one vector per prompt: never weighted
WEIGHS_EMPHASIS = "weighs_emphasis"  # set on a text encoder's forward wrapper that calls `weigh` on each reading
_active: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text encoder -> _Weights while a prompt is drawn


def parse(prompt: str) -> list[Chunk]:
    """The prompt as (text, weight) spans in order, A1111's grammar; neighbours of equal weight joined, and each
    BREAK kept as the span BREAK (where a new 75-token window starts, stylelora.generate.prompt_reading)."""
    merged: list[list] = []
    for chunk in _parse_part(prompt):
        text, weight = chunk
        if isinstance(chunk, _Break):
            merged.append(chunk)
        elif merged and merged[-1][1] == weight and not isinstance(merged[-1], _Break):
            merged[-1][0] += text
        elif text:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


class _Break(list):
    """A BREAK among the spans: brackets around it weigh the words beside it, never the break itself (A1111 would
    weigh it too and then read it as the word "break", weight -1.1, in `(a BREAK b)`)."""


def _parse_part(text: str) -> list[list]:
    chunks: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            if not isinstance(chunk, _Break):
                chunk[1] *= factor

    for found in _TOKENS.finditer(text):
        token, weight = found.group(0), found.group(1)
        if token.startswith("\\"):
            chunks.append([token[1:], 1.0])  # a backslash escaping nothing is dropped, as A1111 drops it
        elif token == "(":
            rounds.append(len(chunks))
        elif token == "[":
            squares.append(len(chunks))
        elif weight is not None and rounds and _is_number(weight):
            multiply(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            multiply(rounds.pop(), UP)
        elif token == "]" and squares:
            multiply(squares.pop(), DOWN)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                chunks += [_Break(BREAK)] * bool(index) + [[part, 1.0]]
    for start in rounds:
        multiply(start, UP)
    for start in squares:
        multiply(start, DOWN)
    return chunks


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def plain_text(prompt: str) -> str:
    """The words the text encoder reads: the prompt itself where it has no emphasis syntax, else its spans joined by
    spaces (which the tokenizer reads as word breaks), a BREAK read as a space."""
    chunks = parse(prompt)
    if len(chunks) == 1 and chunks[0] == (prompt, 1.0):
        return prompt
    return " ".join(text.strip() for text, weight in chunks if text.strip() and (text, weight) != BREAK)


def aligned(row: Sequence[int], reference: Sequence[int], weights: Sequence[float]) -> list[float]:
    """Weights for the tokens of `row` from a reference row of the same words: tokens in a stretch the two rows
    share take the reference's weights; a stretch found elsewhere in the reference (a trigger another reading moved,
    stylelora.generate.trigger_order) takes the weights it had there; any other token weighs 1."""
    row, reference = list(row), list(reference)
    out = [1.0] * len(row)
    matcher = difflib.SequenceMatcher(None, row, reference, autojunk=False)
    for tag, start, end, ref_start, _ in matcher.get_opcodes():
        if tag == "equal":
            out[start:end] = weights[ref_start:ref_start + end - start]
            continue
        while start < end:  # tokens the alignment left over: each longest run found in the reference
            found, size = _longest_run(reference, row[start:end])
            if size:
                out[start:start + size] = weights[found:found + size]
            start += max(size, 1)
    return out


def _longest_run(row: list[int], part: list[int]) -> tuple[int, int]:
    """(where, how long) the longest start of `part` occurs in `row`, first occurrence; (0, 0) if none does."""
    for size in range(len(part), 0, -1):
        for start in range(len(row) - size + 1):
            if row[start:start + size] == part[:size]:
                return start, size
    return 0, 0


class _Weights:
    """The prompts of one draw for one text encoder (every window of each, weighted or not), by the token ids it
    will be given."""

    def __init__(self, rows: dict[tuple[int, ...], list[float]]) -> None:
        self.rows = rows
        self.latest: dict[tuple, list[list[float]]] = {}  # see `tokenized`

    def tokenized(self, batches: dict[tuple, list[list[float]]]) -> None:
        """The weights of the token-id batches (one per window, a tuple of rows) the pipeline's tokenizer gave last:
        the encoder reads those next, and where two prompts have the same ids (`(red:1.5) cat` and its negative
        `red cat`, or the two texts of `[(red:1.5):red:0.5] cat`) these say whose reading it is."""
        self.latest = batches

    def for_rows(self, rows: list[tuple[int, ...]]) -> list[list[float] | None]:
        if tuple(rows) in self.latest:
            return self.latest[tuple(rows)]
        known = dict(self.rows)
        for batch, weights in self.latest.items():
            known.update(zip(batch, weights))
        return [self._for_row(row, known) for row in rows]

    @staticmethod
    def _for_row(row: tuple[int, ...], known: dict) -> list[float] | None:
        if row in known:
            return known[row]
        # A reading whose trigger split moved (stylelora.generate.trigger_order): the closest prompt's.
        best, ratio = max(((ids, difflib.SequenceMatcher(None, row, ids, autojunk=False).ratio()) for ids in known),
                          key=lambda pair: pair[1])  # of equally close rows, the first
        if ratio < 0.5:
            return None
        return aligned(row, best, known[best])


def weigh(model: Any, input_ids: Any, output: Any) -> Any:
    """`output` of `model` for `input_ids` with the weights of the prompt being drawn applied (A1111's "Original"
    emphasis); `output` itself when no weighted prompt is being drawn."""
    import torch

    active = _active.get(model)
    if active is None or input_ids is None:
        return output
    rows = active.for_rows([tuple(row) for row in input_ids.tolist()])
    if all(row is None or all(w == 1.0 for w in row) for row in rows):
        return output
    length = input_ids.shape[1]
    weights = torch.tensor([row or [1.0] * length for row in rows], dtype=torch.float32, device=input_ids.device)

    def weighted(states: Any) -> Any:
        if not torch.is_tensor(states) or states.ndim != 3 or states.shape[1] != length:
            return states
        values = states.float()
        before = values.mean(dim=(1, 2), keepdim=True)
        scaled = values * weights[:, :, None]
        after = scaled.mean(dim=(1, 2), keepdim=True)
        # A mean near 0 against the values says nothing of the reading's strength, and dividing by it would blow
        # the reading up or flip its sign (the toy base's encoder: mean 0.002, mean magnitude 0.59); there the
        # weights apply without the rescale, as A1111's "No norm" emphasis.
        floor = MEAN_FLOOR * values.abs().mean(dim=(1, 2), keepdim=True)
        meaningful = (before.abs() >= floor) & (after.abs() >= floor) & (before * after > 0)
        scaled = torch.where(meaningful, scaled * (before / torch.where(meaningful, after, 1.0)), scaled)
        return scaled.to(states.dtype)

    fields = {}
    for key, value in output.items():
        if key in POOLED_FIELDS:
            fields[key] = value
        elif isinstance(value, tuple):
            fields[key] = tuple(weighted(layer) for layer in value)
        else:
            fields[key] = weighted(value)
    return type(output)(**fields)


@contextmanager
def weighing(model: Any, rows: dict[tuple[int, ...], list[float]]) -> Iterator[_Weights]:
    """While a prompt is drawn, `weigh` gives `model`'s readings of these token-id rows their weights (and of a
    row that another reading reordered, the closest row's, by `aligned`); yields them, for the tokenizer to say
    which rows it gave last (`_Weights.tokenized`)."""
    _active[model] = active = _Weights(rows)
    try:
        yield active
    finally:
        _active.pop(model, None)
