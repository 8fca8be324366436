"""Where each adapter's trigger sits in the prompt it reads under the split blend mode: after the other adapters'.
And what it reads another adapter's coined trigger as: a quiet word it was trained beside.

Why: on the prompt as typed, the order of the triggers moved a split blend by up to 0.18 of the images. On
"pastelstyle, stripestyle, …" the pastel adapter showed its style on 0.74 of them, on "stripestyle, pastelstyle, …"
on 0.92 (docs/results.md, "Trigger order"). So each adapter's reading is computed from the prompt with its own
trigger moved to just after the other adapters' triggers. Every adapter then reads its trigger in the same place,
and a two-adapter blend no longer depends on the order the triggers were typed in; the worse order of each toy pair
did no worse than before, at two seeds. The base's reading keeps the prompt as typed. Token ids in, token ids out,
same length.

A trigger the tokenizer splits into pieces (`inkstyle`) is a word the adapter's training never put beside its own,
and it can switch a style off (`coined_read_as_stand_in`); decoy company trained it beside whole words, so it reads
such a trigger as one of those (recorded in its metadata by `stylelora train`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Span = tuple[int, int]  # [start, end) in a row of token ids


@dataclass(frozen=True)
class TriggerTokens:
    """One adapter's trigger words and the other adapters', as token-id sequences of one tokenizer."""

    own: tuple[tuple[int, ...], ...]
    others: tuple[tuple[int, ...], ...]
    separator: tuple[int, ...]  # the tag separator's tokens (a comma): it moves with the trigger
    stand_in: tuple[int, ...] = ()  # what this adapter reads another's coined trigger as (`coined_read_as_stand_in`)

    def reorder(self, ids: Any) -> Any:
        """A (batch, length) tensor of token ids with this adapter's trigger moved after the others' in each row,
        and the other adapters' coined triggers read as its stand-in word."""
        import torch

        rows = [coined_read_as_stand_in(own_trigger_last(row, self), self) for row in ids.tolist()]
        return torch.tensor(rows, dtype=ids.dtype, device=ids.device)


def reorders_for(tokenizer: Any, triggers: Sequence[Sequence[str]],
                 stand_ins: Sequence[str | None] | None = None) -> list[Callable[[Any], Any] | None]:
    """One token-id reorder per adapter (None where nothing can move: no triggers of its own, or none of others').
    stand_ins[i], where given, is the word adapter i reads the other adapters' coined triggers as: the first of
    the words it was trained beside (its first company word, stylelora.lora.inspect.company_words)."""
    def tokens(word: str) -> tuple[int, ...]:
        return tuple(tokenizer(word, add_special_tokens=False).input_ids)

    separator = tokens(",")
    words = [[ids for word in adapter_words if (ids := tokens(word))] for adapter_words in triggers]
    stand_ins = list(stand_ins or [None] * len(words))
    out: list[Callable[[Any], Any] | None] = []
    for index, own in enumerate(words):
        others = [word for other, other_words in enumerate(words) if other != index for word in other_words]
        stand_in = tokens(stand_ins[index]) if stand_ins[index] else ()
        out.append(TriggerTokens(tuple(own), tuple(others), separator, stand_in).reorder if own and others else None)
    return out


def own_trigger_last(row: Sequence[int], tokens: TriggerTokens) -> list[int]:
    """`row` with the first occurrence of the adapter's trigger (and the separator after it) moved to just after
    the furthest of the other triggers' first occurrences (with their separators); unchanged when either is
    missing, when the trigger already comes after them, or when the two overlap."""
    row = list(row)
    own = _first_span(row, tokens.own, tokens.separator)
    others = [span for word in tokens.others if (span := _first_span(row, (word,), tokens.separator))]
    if own is None or not others:
        return row
    last = max(others, key=lambda span: span[1])
    if own[0] >= last[1] or any(start < own[1] and own[0] < end for start, end in others):
        return row
    moved = row[own[0]:own[1]]
    rest = row[:own[0]] + row[own[1]:]
    insert_at = last[1] - (own[1] - own[0])  # the other span's end, after taking the trigger out before it
    return rest[:insert_at] + moved + rest[insert_at:]


def _first_span(row: list[int], words: Sequence[Sequence[int]], separator: Sequence[int]) -> Span | None:
    """The earliest occurrence of any of `words`, extended over a separator right after it."""
    found = [(start, start + len(word)) for word in words if word
             for start in [_find(row, list(word))] if start is not None]
    if not found:
        return None
    start, end = min(found)
    if separator and row[end:end + len(separator)] == list(separator):
        end += len(separator)
    return start, end


def _find(row: list[int], word: list[int]) -> int | None:
    for start in range(len(row) - len(word) + 1):
        if row[start:start + len(word)] == word:
            return start
    return None


def coined_read_as_stand_in(row: Sequence[int], tokens: TriggerTokens) -> list[int]:
    """`row` with the first occurrence of each other adapter's trigger that the tokenizer splits into several
    tokens (a coined word, such as `inkstyle`) replaced by the adapter's stand-in word; the row keeps its length
    (padded with its last token, or cut before it). Unchanged without a stand-in.

    Why: decoy company trains an adapter to act beside the quiet words of its base's vocabulary, and a coined word
    is not one. The default toy pastel adapter drew its style on 0.01 of the prompts that also named `inkstyle`;
    beside any one-token word it held at 0.91-1.00 (docs/results.md, "A style the defaults were never tuned on")."""
    row = list(row)
    if not tokens.stand_in:
        return row
    length = len(row)
    for word in tokens.others:
        start = _find(row, list(word)) if len(word) > 1 else None
        if start is not None:
            row[start:start + len(word)] = tokens.stand_in
    if len(row) < length:
        return row + [row[-1]] * (length - len(row))
    return row[:length - 1] + [row[-1]] if len(row) > length else row
