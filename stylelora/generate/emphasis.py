"""A1111's prompt emphasis: `(words)`, `((words))`, `(words:1.3)` and `[words]` weigh how the text encoder's reading
of those words counts.

Why: A1111 users write `(zorb:1.2)` beside a style, and a prompt pasted from A1111 (or read back from one of its
PNGs) should draw what it drew there. The syntax is A1111's: `(` raises the words inside by 1.1, `[` lowers them by
1.1, `(words:W)` sets W, brackets nest and multiply, `\\(` `\\)` `\\[` `\\]` are literal brackets, an unclosed bracket
weighs the rest of the prompt, a closing one with nothing open is text. The math is A1111's default ("Original"):
each token's hidden states times its weight, then the whole reading rescaled to its mean before weighting, so
weights move words against each other rather than the prompt's overall strength (skipped where that mean is near 0,
as on the toy base, where it would divide by almost nothing). Pooled vectors are not weighted.

The text encoder reads the prompt with the brackets removed. Each weighted span is tokenized apart, as A1111 does,
so `(red:1.2)circle` reads `red` and `circle` as two words. `BREAK` (A1111's start of a new 75-token chunk) is
taken out: stylelora reads one 77-token window, as diffusers does, and `notes` says so.
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
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
POOLED_FIELDS = ("pooler_output", "text_embeds")  # one vector per prompt: never weighted
WEIGHS_EMPHASIS = "weighs_emphasis"  # set on a text encoder's forward wrapper that calls `weigh` on each reading
_active: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text encoder -> _Weights while a prompt is drawn


def parse(prompt: str) -> list[Chunk]:
    """The prompt as (text, weight) spans in order, A1111's grammar; neighbours of equal weight joined, BREAK
    dropped."""
    chunks: list[list] = []
    for part in _BREAK.split(prompt):
        chunks += [[" ", 1.0]] * bool(chunks) + _parse_part(part)
    merged: list[list] = []
    for text, weight in chunks:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        elif text:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def _parse_part(text: str) -> list[list]:
    chunks: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] *= factor

    for found in _TOKENS.finditer(text):
        token, weight = found.group(0), found.group(1)
        if token.startswith("\\") and len(token) == 2:
            chunks.append([token[1], 1.0])
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
            chunks.append([token, 1.0])
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
    """What the text encoder reads: the prompt itself where it has no emphasis syntax (so such a prompt is drawn as
    before, bit for bit), else its spans joined by spaces, which the tokenizer reads as word breaks."""
    chunks = parse(prompt)
    if len(chunks) == 1 and chunks[0] == (prompt, 1.0):
        return prompt
    return " ".join(text.strip() for text, _ in chunks if text.strip())


def is_weighted(prompt: str) -> bool:
    return any(weight != 1.0 for _, weight in parse(prompt))


def notes(prompt: str) -> list[str]:
    """What a user coming from A1111 should know about how this prompt is read."""
    if not _BREAK.search(prompt):
        return []
    return ["BREAK starts a new 75-token chunk in A1111; stylelora reads the prompt as one window of 77 tokens, so "
            "it takes the word out and reads the parts one after the other."]


def token_weights(tokenizer: Any, prompt: str) -> tuple[tuple[int, ...], list[float]]:
    """The token ids a diffusers pipeline makes of `plain_text(prompt)` (padded to the tokenizer's length) and each
    token's weight; every span is tokenized apart, and the padding, start and end tokens weigh 1."""
    spans, weights = [], []
    for text, weight in parse(prompt):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        spans += ids
        weights += [weight] * len(ids)
    row = tokenizer(plain_text(prompt), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    return tuple(row), aligned(row, spans, weights)


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
    """The weighted prompts of one draw for one text encoder, by the token ids it will be given."""

    def __init__(self, rows: dict[tuple[int, ...], list[float]]) -> None:
        self.rows = rows

    def for_row(self, row: tuple[int, ...]) -> list[float] | None:
        if row in self.rows:
            return self.rows[row]
        # A reading whose trigger split moved (or whose negative prompt diffusers padded): the closest prompt's.
        best = max(self.rows, key=lambda known: difflib.SequenceMatcher(None, row, known, autojunk=False).ratio())
        if difflib.SequenceMatcher(None, row, best, autojunk=False).ratio() < 0.5:
            return None
        return aligned(row, best, self.rows[best])


def weigh(model: Any, input_ids: Any, output: Any) -> Any:
    """`output` of `model` for `input_ids` with the weights of the prompt being drawn applied (A1111's "Original"
    emphasis); `output` itself when no weighted prompt is being drawn."""
    import torch

    active = _active.get(model)
    if active is None or input_ids is None:
        return output
    rows = [active.for_row(tuple(row)) for row in input_ids.tolist()]
    if all(row is None or all(w == 1.0 for w in row) for row in rows):
        return output
    length = input_ids.shape[1]
    weights = torch.tensor([row or [1.0] * length for row in rows], dtype=torch.float32, device=input_ids.device)

    def weighted(states: Any) -> Any:
        if not torch.is_tensor(states) or states.ndim != 3 or states.shape[1] != length:
            return states
        before = states.float().mean(dim=(1, 2), keepdim=True)
        scaled = states.float() * weights[:, :, None]
        after = scaled.mean(dim=(1, 2), keepdim=True)
        # A mean near 0 against the values says nothing of the reading's strength, and dividing by it would blow
        # the reading up or flip its sign (the toy base's encoder: mean 0.002, mean magnitude 0.59); there the
        # weights apply without the rescale, as A1111's "No norm" emphasis.
        floor = MEAN_FLOOR * states.float().abs().mean(dim=(1, 2), keepdim=True)
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


def _ids(args: tuple, kwargs: dict) -> Any:
    return kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)


@contextmanager
def applied(encoders: Sequence[tuple[Any, Any]], prompts: Sequence[str]) -> Iterator[None]:
    """While drawing `prompts` (and their negative prompts), each (text encoder, tokenizer) pair weighs their
    emphasis. A text encoder whose forward already weighs each reading (split_attention's, marked WEIGHS_EMPHASIS)
    is only told the weights; any other gets a wrapper for the duration. No weighted prompt: nothing is touched."""
    weighted = [prompt for prompt in dict.fromkeys(prompts) if is_weighted(prompt)]
    installed: list[tuple[Any, Any]] = []  # (model, the instance forward it had, or None)
    try:
        for model, tokenizer in encoders:
            if model is None or tokenizer is None or not weighted:
                continue
            rows: dict[tuple[int, ...], list[float]] = {}
            for prompt in weighted:  # a negative prompt that reads as the same words as the prompt shares its row
                row, weights = token_weights(tokenizer, prompt)
                rows.setdefault(row, weights)
            _active[model] = _Weights(rows)
            if not getattr(model.__dict__.get("forward"), WEIGHS_EMPHASIS, False):
                installed.append((model, model.__dict__.get("forward")))
                model.forward = _weighing_forward(model, model.forward)
        yield
    finally:
        for model, _ in encoders:
            if model is not None:
                _active.pop(model, None)
        for model, previous in installed:
            if previous is None:
                model.__dict__.pop("forward", None)
            else:
                model.forward = previous


def _weighing_forward(model: Any, inner: Any):
    def forward(*args: Any, **kwargs: Any) -> Any:
        return weigh(model, _ids(args, kwargs), inner(*args, **kwargs))

    return forward


def pipe_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """A pipeline's (text encoder, tokenizer) pairs: one on SD 1.x/2.x, two on SDXL."""
    return [(getattr(pipe, encoder, None), getattr(pipe, tokenizer, None))
            for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))]
