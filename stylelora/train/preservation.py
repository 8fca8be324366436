"""Owns base preservation: which samples of a batch get a trigger-free copy, what its caption is, and what the
frozen base predicts for it.

Why: trained only on captions that all hold the trigger, a LoRA has no reason to tie what it learns to that word,
so a character leaks into every prompt (measured on toy-zorb: shape accuracy on prompts without the trigger fell
from 1.0 to 0.75). Asking the adapted model to match the frozen base on the same noisy latents when the trigger is
missing ties the change to the trigger — DreamBooth's prior preservation, with the base's own predictions instead
of generated class images. Half the batch keeps the extra cost near half a step.

Removing the trigger alone ties the change to "an unfamiliar word where the trigger stood", not to the trigger:
the toy-zorb adapter drew its character on 41 % of the prompts that began with another adapter's trigger word.
So part of the copies get a decoy word in the trigger's place ("zorb, a red zorb" → "meadow, a red meadow"), and
the base's prediction for that caption is the target too.

Decoys alone teach "another word at the head → the base", and another adapter's trigger is just such a word: in
a stacked prompt ("stripestyle, pastelstyle, a red circle") each toy adapter alone drew its style on 0.13 and 0.0
of the images. With `decoy_company` part of the samples trained toward the data also get a decoy word as an extra
tag beside their trigger ("ack, zorb, a red zorb"), so the trigger, not the words around it, turns the style
on. Company words are the decoys the base reads least (`company_words`): a word the base reads as content ("circle")
would be taught as something to ignore beside the trigger.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from stylelora.data.captions import (join_tags, replace_triggers, split_tags, with_word_beside_trigger,
                                      without_triggers)
from stylelora.lora.inject import adapters_disabled

if TYPE_CHECKING:
    from stylelora.train.models import TrainModels


def preserved_samples(captions: list[str], triggers: tuple[str, ...], weight: float, decoys: tuple[str, ...] = (),
                      decoy_rate: float = 0.0, generator: torch.Generator | None = None) -> list[tuple[int, str]]:
    """(index, trigger-free caption) for half (rounded up) of the samples whose caption holds a trigger.

    Each copy, with probability `decoy_rate`, has a random word of `decoys` where the trigger was; otherwise the
    trigger is removed. The draws come from `generator`, so the same generator state gives the same copies.
    """
    if weight <= 0 or not triggers:
        return []
    stripped = [(i, caption, without_triggers(caption, triggers)) for i, caption in enumerate(captions)]
    triggered = [copy for copy in stripped if copy[2] is not None]
    chosen = triggered[: (len(triggered) + 1) // 2]
    if decoy_rate <= 0 or not decoys:
        return [(i, without) for i, _, without in chosen]
    if generator is None:
        raise ValueError("decoy words are drawn at random: pass the step's generator")
    draws = torch.rand(len(chosen), generator=generator).tolist()
    picks = torch.randint(0, len(decoys), (len(chosen),), generator=generator).tolist()
    return [(i, replace_triggers(caption, triggers, decoys[pick]) if draw < decoy_rate else without)
            for (i, caption, without), draw, pick in zip(chosen, draws, picks)]


def accompanied_captions(captions: list[str], triggers: tuple[str, ...], decoys: tuple[str, ...], rate: float,
                         generator: torch.Generator | None = None) -> list[str]:
    """The batch's captions, each holding a trigger getting, with probability `rate`, a random decoy word as an
    extra tag just before or after its trigger (see the module docstring). Draws come from `generator`."""
    if rate <= 0 or not decoys or not triggers:
        return captions
    if generator is None:
        raise ValueError("decoy words are drawn at random: pass the step's generator")
    draws = torch.rand(len(captions), generator=generator).tolist()
    picks = torch.randint(0, len(decoys), (len(captions),), generator=generator).tolist()
    sides = torch.randint(0, 2, (len(captions),), generator=generator).tolist()
    return [with_word_beside_trigger(caption, triggers, decoys[pick], after=bool(side)) if draw < rate else caption
            for caption, draw, pick, side in zip(captions, draws, picks, sides)]


def with_made_up_company(preserved: list[tuple[int, str]], captions: list[str], accompanied: list[str],
                         made_up: set[str]) -> list[tuple[int, str]]:
    """The trigger-free copies, each whose sample got a word of `made_up` beside its trigger (`accompanied` against
    the `captions` as written) starting with that word, so the word alone is trained toward the base. Otherwise the
    adapter learns "a coined word → my style" and acts on another adapter's prompts: toy pastel drew itself on
    0.06-0.09 of `inkstyle, ` prompts without its trigger, and on none with the copies kept so."""
    kept = []
    for index, copy in preserved:
        added = [tag for tag in split_tags(accompanied[index]) if tag in made_up
                 and tag not in split_tags(captions[index])]
        kept.append((index, join_tags(added[:1] + split_tags(copy)) if added else copy))
    return kept


def words_of(texts: Iterable[str]) -> set[str]:
    """The lower-case words (letter runs) of `texts`: what a decoy or made-up word must not be."""
    return {word for text in texts for word in re.findall(r"[a-z]+", text.lower())}


def decoy_words(tokenizer, captions: Iterable[str], triggers: Iterable[str]) -> tuple[str, ...]:
    """Words to put where the trigger was: the tokenizer's whole-word tokens (letters only, 3+ long) that no
    training caption or trigger uses. Sorted: the same inputs give the same pool, which exact resume needs.

    Why vocabulary words and not made-up ones: the target is the base's prediction for the decoy caption, which
    is only meaningful for text the base knows. Measured on toy-zorb with 2,000 made-up words (several tokens
    each, never seen by the base): the character leaked into 16 % of plain prompts and shape accuracy fell to
    0.69, worse than without decoys; with vocabulary words it stayed at 0.97 on plain prompts.
    """
    taken = words_of([*captions, *triggers])
    vocabulary = {token[: -len("</w>")] for token in tokenizer.get_vocab() if token.endswith("</w>")}
    return tuple(sorted(word for word in vocabulary if re.fullmatch(r"[a-z]{3,}", word) and word not in taken))


COMPANY_CANDIDATES = 128  # decoy words scored for company (evenly spread over the pool: same pool, same words)
COMPANY_MADE_UP = 64  # made-up words beside them in the company pool (made_up_words)
MADE_UP_SEED = "stylelora:made-up-company"  # str seeds hash with SHA-512: the same words on every machine
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwxz", "aeiouy"
_SUFFIXES = ("", "", "style", "art")  # what people append to a made-up trigger ("inkstyle", "vexart")
COMPANY_CAPTIONS = 4  # trigger-free captions each candidate is scored on
COMPARED_TOKENS = 20  # leading caption tokens whose hidden states are compared


def company_words(encode: Callable[[list[str]], torch.Tensor], tokenizer, captions: Iterable[str],
                  triggers: tuple[str, ...], decoys: tuple[str, ...]) -> tuple[str, ...]:
    """The half of the decoy pool (at most COMPANY_CANDIDATES of it) that the frozen base's text encoder reacts to
    least: put before a training caption, these words move the caption's own hidden states the least.
    encode: captions → the base's hidden states (train.models.text_encode_fn of the first text encoder).

    Why: a company word is trained to be ignored beside the trigger, and a word the base reads as content (a shape,
    a color, another adapter's trigger it was tuned on) then gets ignored too. The words the base barely reads are
    what another adapter's made-up trigger looks like to this one. Measured on the toy base: the quiet half of
    toy-zorb's pool is BPE fragments ('ack', 'cle', ...); 'circle', 'square', 'star', 'and' and the other two
    styles' triggers are in the loud half; adapters trained with the quiet half still act beside triggers they never
    saw (docs/results.md, "Decoy company").
    """
    stride = max(1, len(decoys) // COMPANY_CANDIDATES)
    candidates = decoys[::stride][:COMPANY_CANDIDATES]
    plain = [text for text in (without_triggers(c, triggers) for c in captions) if text][:COMPANY_CAPTIONS]
    if len(candidates) < 2 or not plain:
        return candidates
    lengths = [min(COMPARED_TOKENS, len(tokenizer.tokenize(text))) for text in plain]
    reference = encode(plain)
    scores = []
    for word in candidates:
        shift = len(tokenizer.tokenize(f"{word},"))
        moved = encode([f"{word}, {text}" for text in plain])
        change = [((reference[i, 1:1 + n] - moved[i, 1 + shift:1 + shift + n]).norm(dim=-1)
                   / reference[i, 1:1 + n].norm(dim=-1)).mean().item() for i, n in enumerate(lengths)]
        scores.append((sum(change) / len(change), word))
    quiet = sorted(scores)[: len(scores) // 2]
    return tuple(sorted(word for _, word in quiet))


def made_up_words(tokenizer, taken: Iterable[str], count: int = COMPANY_MADE_UP) -> tuple[str, ...]:
    """`count` made-up words of the kind people coin as triggers ("vexo", "kitarustyle"), each read by `tokenizer` as
    two tokens or more and none of them a word of `taken`; the same on every call. Sorted.

    Why: another adapter's trigger is most often a word this base never saw, which its tokenizer splits into
    fragments. Measured on the toy base: the pastel adapter trained beside vocabulary words alone drew its style on
    0.03 of its prompts with `inkstyle, ` before them (four tokens) and on 0.00 with `glowy, ` (docs/results.md,
    "A style the defaults were never tuned on").
    """
    rng = random.Random(MADE_UP_SEED)
    excluded = {word.lower() for word in taken}
    words: set[str] = set()
    for _ in range(100 * count):
        if len(words) == count:
            break
        syllables = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        word = syllables + rng.choice(_SUFFIXES)
        if word not in excluded and len(tokenizer.tokenize(word)) >= 2:
            words.add(word)
    return tuple(sorted(words))


@torch.no_grad()
def base_prediction(models: TrainModels, noisy: torch.Tensor, timesteps: torch.Tensor, captions: list[str],
                    time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """What the frozen base (LoRA bypassed in the UNet and the text encoders) predicts for these inputs
    (time_ids: SDXL's add_time_ids of these samples)."""
    unet, *text_encoders = models.unwrapped or (models.unet, models.text_encoder, models.text_encoder_2)
    with adapters_disabled(unet, *text_encoders):
        text = models.encode_captions(captions, tuple(text_encoders))
        return models.denoise(unet, noisy, timesteps, text, time_ids)
