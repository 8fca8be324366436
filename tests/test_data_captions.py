"""Caption processing: keep_tokens, shuffle, caption and tag dropout, determinism, tag frequency."""

import random
from pathlib import Path

import pytest
import torch

from stylelora.data.captions import (
    CaptionOptions,
    process_caption,
    replace_triggers,
    sample_rng,
    split_tags,
    tag_frequency,
    with_word_beside_trigger,
    without_triggers,
)
from stylelora.data.scan import TrainItem

CAPTION = "zorb, red, circle, yellow background, smiling, small"


def _many(options: CaptionOptions, n: int = 200) -> list[str]:
    return [process_caption(CAPTION, options, random.Random(seed)) for seed in range(n)]


def test_default_options_leave_the_caption_untouched():
    assert process_caption("a  red circle,blue", CaptionOptions(), random.Random(0)) == "a  red circle,blue"
    assert CaptionOptions().is_static and not CaptionOptions(shuffle_tags=True).is_static


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_shuffle_keeps_the_first_tags_and_permutes_the_rest(keep):
    results = _many(CaptionOptions(shuffle_tags=True, keep_tokens=keep))
    original = split_tags(CAPTION)
    for result in results:
        tags = split_tags(result)
        assert tags[:keep] == original[:keep] and sorted(tags) == sorted(original)
    assert len(set(results)) > 20  # really shuffled


def test_caption_dropout_replaces_the_whole_caption():
    assert set(_many(CaptionOptions(caption_dropout=1.0), 20)) == {""}
    dropped = _many(CaptionOptions(caption_dropout=0.25), 400).count("")
    assert 60 < dropped < 140


def test_tag_dropout_never_drops_kept_tags():
    assert set(_many(CaptionOptions(tag_dropout=1.0, keep_tokens=1), 20)) == {"zorb"}
    results = _many(CaptionOptions(tag_dropout=0.5, keep_tokens=1), 400)
    assert all(r.startswith("zorb") for r in results)
    kept_per_caption = sum(len(split_tags(r)) - 1 for r in results) / len(results)
    assert 2.0 < kept_per_caption < 3.0  # 5 droppable tags at p=0.5


@pytest.mark.parametrize("make_rng", [lambda: random.Random(7), lambda: torch.Generator().manual_seed(7)])
def test_same_generator_state_gives_the_same_caption(make_rng):
    options = CaptionOptions(shuffle_tags=True, keep_tokens=1, tag_dropout=0.3, caption_dropout=0.1)
    first = [process_caption(CAPTION, options, rng) for rng in [make_rng()] for _ in range(10)]
    second = [process_caption(CAPTION, options, rng) for rng in [make_rng()] for _ in range(10)]
    assert first == second and len(set(first)) > 1


def test_sample_rng_is_private_to_seed_epoch_index_and_purpose():
    draw = lambda *args: sample_rng(*args).random()  # noqa: E731
    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({draw(1, 2, 3), draw(1, 2, 4), draw(1, 3, 3), draw(2, 2, 3), draw(1, 2, 3, "flip")}) == 5


@pytest.mark.parametrize("options, message", [
    (dict(caption_dropout=1.5), "between 0 and 1"),
    (dict(tag_dropout=-0.1), "between 0 and 1"),
    (dict(keep_tokens=-1), "0 or more"),
])
def test_invalid_options_explain_themselves(options, message):
    with pytest.raises(ValueError, match=message):
        CaptionOptions(**options)


def test_tag_frequency_per_folder():
    items = [TrainItem(Path("a.png"), "zorb, red, red", 10, "10_zorb"),
             TrainItem(Path("b.png"), "zorb, blue", 10, "10_zorb"),
             TrainItem(Path("c.png"), "pastel,  red ", 1, "1_pastel")]
    assert tag_frequency(items) == {"10_zorb": {"zorb": 2, "blue": 1, "red": 1}, "1_pastel": {"pastel": 1, "red": 1}}


@pytest.mark.parametrize("caption, triggers, expected", [
    ("zorb, a red zorb on a white background", ("zorb",), "a red on a white background"),
    ("sks dog, sitting on grass", ("sks dog",), "sitting on grass"),
    ("Stripestyle, a star", ("stripestyle",), "a star"),  # any case
    ("zorbs and zorb", ("zorb",), "zorbs and"),  # whole words only
    ("zorb", ("zorb",), ""),  # only the trigger: the empty (unconditional) caption
    ("a red circle", ("zorb",), None),  # no trigger: not a caption to preserve
    ("", ("zorb",), None),  # dropped by caption dropout: it trains the unconditional prediction
    ("a, b", (), None),
])
def test_without_triggers(caption, triggers, expected):
    assert without_triggers(caption, triggers) == expected


@pytest.mark.parametrize("caption, triggers, word, expected", [
    ("zorb, a red zorb on a white background", ("zorb",), "vadelo", "vadelo, a red vadelo on a white background"),
    ("Stripestyle, a star", ("stripestyle",), "kuro", "kuro, a star"),  # any case
    ("zorbs and zorb", ("zorb",), "x", "zorbs and x"),  # whole words only
    ("sks dog, on grass", ("sks dog", "sks"), "toma", "toma, on grass"),  # the longer phrase first, as given
    ("a red circle", ("zorb",), "x", "a red circle"),
    (r"zorb", ("zorb",), r"a\1", r"a\1"),  # the word is text, not a regex template
])
def test_replace_triggers(caption, triggers, word, expected):
    assert replace_triggers(caption, triggers, word) == expected


@pytest.mark.parametrize("caption, after, expected", [
    ("zorb, a red zorb on a white background", False, "meadow, zorb, a red zorb on a white background"),
    ("zorb, a red zorb on a white background", True, "zorb, meadow, a red zorb on a white background"),
    ("a star, Stripestyle", True, "a star, Stripestyle, meadow"),  # any case, wherever the trigger tag is
    ("sks dog, on grass", False, "meadow, sks dog, on grass"),  # a tag holding the trigger phrase
    ("zorbs, a star", False, "zorbs, a star"),  # whole words only: no trigger, unchanged
    ("", True, ""),  # emptied by caption dropout: stays empty
])
def test_a_word_goes_beside_the_trigger_as_its_own_tag(caption, after, expected):
    assert with_word_beside_trigger(caption, ("zorb", "stripestyle", "sks dog"), "meadow", after=after) == expected
