"""Where each adapter's trigger sits in the prompt it reads under the split blend mode: after the other adapters'.

Why: on the prompt as typed, the order of the triggers moved a split blend by up to 0.18 of the images. On
"pastelstyle, stripestyle, …" the pastel adapter showed its style on 0.74 of them, on "stripestyle, pastelstyle, …"
on 0.92 (docs/results.md, "Trigger order"). So each adapter's reading is computed from the prompt with its own
trigger moved to just after the other adapters' triggers. Every adapter then reads its trigger in the same place,
and a two-adapter blend no longer depends on the order the triggers were typed in; the worse order of each toy pair
did no worse than before, at two seeds. The base's reading keeps the prompt as typed. Token ids in, token ids out,
same length: only tokens move.
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

    def reorder(self, ids: Any) -> Any:
        """A (batch, length) tensor of token ids with this adapter's trigger moved after the others' in each row."""
        import torch

        rows = [own_trigger_last(row, self) for row in ids.tolist()]
        return torch.tensor(rows, dtype=ids.dtype, device=ids.device)


def reorders_for(tokenizer: Any, triggers: Sequence[Sequence[str]]) -> list[Callable[[Any], Any] | None]:
    """One token-id reorder per adapter (None where nothing can move: no triggers of its own, or none of others')."""
    def tokens(word: str) -> tuple[int, ...]:
        return tuple(tokenizer(word, add_special_tokens=False).input_ids)

    separator = tokens(",")
    words = [[ids for word in adapter_words if (ids := tokens(word))] for adapter_words in triggers]
    out: list[Callable[[Any], Any] | None] = []
    for index, own in enumerate(words):
        others = [word for other, other_words in enumerate(words) if other != index for word in other_words]
        out.append(TriggerTokens(tuple(own), tuple(others), separator).reorder if own and others else None)
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
