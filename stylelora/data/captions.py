"""Owns per-sample caption processing (variants, tag shuffle, keep_tokens, caption and tag dropout) and tag counting.

Captions are comma-separated tags ("zorb, red, on a yellow background"). Each epoch a sample's caption
may be changed, as kohya does: with probability `caption_dropout` it becomes "" (this teaches the
unconditional prediction classifier-free guidance needs); otherwise, with `variants` on, one of the caption
file's lines is drawn and each `{a|b|c}` in it becomes one of its choices (kohya's `--enable_wildcard`); then
the first `keep_tokens` tags stay in place (the trigger word), each other tag is dropped with probability
`tag_dropout`, and the rest are shuffled so the model does not learn a tag order. All randomness comes from
the generator passed in, so a (seed, epoch, sample) triple always gives the same caption; `sample_rng` builds
that generator.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Union

import torch

from stylelora.data.scan import TrainItem, trigger_pattern

Generator = Union[random.Random, torch.Generator]


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_tags: bool = False
    keep_tokens: int = 0  # leading tags never shuffled nor dropped
    caption_dropout: float = 0.0  # probability the whole caption becomes ""
    tag_dropout: float = 0.0  # probability each non-kept tag is dropped
    variants: bool = False  # a caption's lines and {a|b} choices are alternatives, one drawn per sample
    separator: str = ","

    def __post_init__(self) -> None:
        for name in ("caption_dropout", "tag_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability: use a value between 0 and 1, not {getattr(self, name)}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens counts leading tags: use 0 or more, not {self.keep_tokens}")

    @property
    def is_static(self) -> bool:
        """True when a caption is always the same text (or ""), so text-encoder outputs can be cached."""
        return not self.shuffle_tags and self.tag_dropout == 0.0 and not self.variants


# kohya's wildcard notation: "{red|blue} background" is "red background" or "blue background" ("{red}": "red").
CHOICES = re.compile(r"\{([^{}]*)\}")


def expand_choices(text: str, pick) -> str:
    """`text` with each `{a|b|c}` replaced by `pick(["a", "b", "c"])`, innermost first: `{a|{b|c}}` is a, b or c."""
    while True:
        expanded = CHOICES.sub(lambda match: pick([choice.strip() for choice in match.group(1).split("|")]), text)
        if expanded == text:
            return text
        text = expanded


def caption_forms(caption: str, variants: tuple[str, ...], enabled: bool, pick=lambda choices: choices[0]) -> list[str]:
    """What a caption can be trained as: itself, or with `enabled` (--caption-variants) each of its file's lines,
    each `{a|b}` picked by `pick` (the first choice: sample prompts; the longest: the 75-token check)."""
    if not enabled:
        return [caption]
    return [expand_choices(line, pick) for line in (variants or (caption,))]


def every_form(text: str, limit: int = 256) -> list[str]:
    """Each text `expand_choices` can make of `text`, the first `limit` of them (tag counting reads these; a caption
    with many independent choices has more forms than are worth listing)."""
    forms, done = [text], []
    while forms and len(done) < limit:
        form = forms.pop(0)
        match = CHOICES.search(form)
        if match is None:
            done.append(form)
            continue
        forms[:0] = [form[:match.start()] + choice.strip() + form[match.end():] for choice in match.group(1).split("|")]
    return done


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Tags of a caption, stripped, empty ones removed."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def join_tags(tags: Iterable[str], separator: str = ",") -> str:
    return f"{separator} ".join(tags)


def process_caption(caption: str, options: CaptionOptions, rng: Generator, variants: tuple[str, ...] = ()) -> str:
    """The caption one sample is trained with this time (see the module docstring); `variants` are the lines of
    its caption file when it has several (`TrainItem.variants`), `caption` those lines joined as tags."""
    draws = _Draws(rng)
    if options.caption_dropout > 0 and draws.uniform() < options.caption_dropout:
        return ""
    if options.variants:
        caption = expand_choices(draws.choice(variants) if variants else caption, draws.choice)
    if not options.shuffle_tags and options.tag_dropout == 0:
        return caption  # untouched text: no re-joining that would normalise the user's spacing
    tags = split_tags(caption, options.separator)
    kept, free = tags[: options.keep_tokens], tags[options.keep_tokens:]
    if options.tag_dropout > 0:
        free = [tag for tag in free if draws.uniform() >= options.tag_dropout]
    if options.shuffle_tags:
        free = draws.shuffled(free)
    return join_tags(kept + free, options.separator)


def without_triggers(caption: str, triggers: Iterable[str], separator: str = ",") -> str | None:
    """The caption with every trigger phrase removed (whole words, any case) and emptied tags dropped; None when
    it holds no trigger. "zorb, a red zorb on a white background" without "zorb" → "a red on a white background"."""
    stripped = replace_triggers(caption, triggers, "")
    if stripped == caption:
        return None
    return join_tags((" ".join(tag.split()) for tag in split_tags(stripped, separator)), separator)


def replace_triggers(caption: str, triggers: Iterable[str], word: str) -> str:
    """The caption with every trigger phrase (whole words, any case) replaced by `word`."""
    for trigger in triggers:
        caption = trigger_pattern(trigger).sub(lambda _: word, caption)
    return caption


def with_word_beside_trigger(caption: str, triggers: Iterable[str], word: str, *, after: bool,
                             separator: str = ",") -> str:
    """The caption with `word` as an extra tag just before (or `after`) the first tag that holds a trigger;
    unchanged when none does. "zorb, a red zorb" + "meadow" → "meadow, zorb, a red zorb" or "zorb, meadow, a red zorb"."""
    tags = split_tags(caption, separator)
    patterns = [trigger_pattern(trigger) for trigger in triggers]
    for index, tag in enumerate(tags):
        if any(pattern.search(tag) for pattern in patterns):
            return join_tags(tags[: index + after] + [word] + tags[index + after:], separator)
    return caption


def sample_rng(seed: int, epoch: int, index: int, purpose: str = "caption") -> random.Random:
    """A generator private to one sample, epoch and purpose ("caption", "flip", "crop"): independent of
    worker count and sample order, and turning flips on does not change the captions."""
    return random.Random(f"stylelora:{seed}:{epoch}:{index}:{purpose}")  # str seeds hash with SHA-512: stable


def tag_frequency(items: Iterable[TrainItem], separator: str = ",",
                  variants: bool = False) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {folder: {tag: number of images whose caption has it}}. With `variants`
    (--caption-variants) an image counts each tag of any line and choice once, so `{red|blue}` counts red and blue."""
    counts: dict[str, Counter] = {}
    for item in items:
        forms = [form for line in (item.variants or (item.caption,)) for form in every_form(line)] if variants \
            else [item.caption]
        counts.setdefault(item.folder, Counter()).update({tag for form in forms for tag in split_tags(form, separator)})
    return {folder: dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) for folder, counter in counts.items()}


class _Draws:
    """The random operations captions need, from either a `random.Random` or a `torch.Generator`."""

    def __init__(self, rng: Generator):
        if not isinstance(rng, (random.Random, torch.Generator)):
            raise TypeError(f"pass a random.Random or torch.Generator for reproducible captions, not {type(rng)}")
        self.rng = rng

    def uniform(self) -> float:
        if isinstance(self.rng, random.Random):
            return self.rng.random()
        return float(torch.rand((), generator=self.rng))

    def choice(self, values):
        return values[min(int(self.uniform() * len(values)), len(values) - 1)]

    def shuffled(self, values: list[str]) -> list[str]:
        if isinstance(self.rng, random.Random):
            values = list(values)
            self.rng.shuffle(values)
            return values
        return [values[i] for i in torch.randperm(len(values), generator=self.rng).tolist()]


def caption_variants_note(items: Iterable[TrainItem], variants: bool) -> str:
    """A line saying how captions with several lines or `{a|b}` choices are read, or "" when none has either and
    --caption-variants is off. Why: kohya reads such files three ways (first line, one line drawn, as written),
    so a user coming from it should see which one this run uses."""
    items = list(items)
    lines = sum(1 for item in items if item.variants)
    choices = sum(1 for item in items if CHOICES.search(item.caption))
    if variants and not lines and not choices:
        return ("--caption-variants has nothing to draw from: no caption file has several lines or a {a|b} "
                "choice, so every image is trained on its one caption.")
    if not lines and not choices:
        return ""
    found = " and ".join(part for part in (
        f"{lines} caption file{'s have' if lines > 1 else ' has'} several lines" if lines else "",
        f"{choices} caption{'s hold' if choices > 1 else ' holds'} {{a|b}} choices" if choices else "") if part)
    if variants:
        return f"{found}: each time an image is seen, one line and one choice of each {{a|b}} is drawn."
    return (f"{found}: lines are joined as tags and choices trained as written. --caption-variants draws one line "
            "and one choice each time instead (kohya's --enable_wildcard).")


def long_captions_note(items: Iterable[TrainItem], tokenizer, variants: bool = False, max_tokens: int = 75) -> str:
    """A line naming the captions the text encoder cuts (CLIP reads 77 tokens: 75 after its start and end; with
    --max-token-length, that many in windows of 75), or "". With `variants` (--caption-variants), a caption counts
    by its longest form.

    Why: the text encoder silently drops what is past its window, so tags at the end of a long caption are never
    trained on, and the user sees only transformers' unnamed "sequence length" line (if anything)."""
    window = (tokenizer.model_max_length - 2) * max(1, max_tokens // 75)  # 75 a window on every CLIP
    items = list(items)
    forms = [caption_forms(item.caption, item.variants, variants, pick=lambda c: max(c, key=len)) for item in items]
    ids = iter(tokenizer([text for texts in forms for text in texts], add_special_tokens=False,
                         verbose=False)["input_ids"])
    lengths = [max(len(next(ids)) for _ in texts) for texts in forms]
    # Named with their folder: kohya datasets repeat file names (10_a/0001.png, 5_b/0001.png).
    long = sorted(((n, f"{item.path.parent.name}/{item.path.name}") for item, n in zip(items, lengths)
                   if n > window), reverse=True)
    if not long:
        return ""
    shown = ", ".join(f"{name} ({n} tokens)" for n, name in long[:5]) + (f", +{len(long) - 5} more"
                                                                          if len(long) > 5 else "")
    many = len(long) > 1
    return (f"{len(long)} caption{'s are' if many else ' is'} longer than the text encoder's {window} tokens and "
            f"cut there, so {'their' if many else 'its'} last tags are never trained on: {shown}. Shorten "
            f"{'them' if many else 'it'}, put the tags that matter first, or read up to 225 tokens with "
            "--max-token-length 150 or 225 (kohya's --max_token_length).")
