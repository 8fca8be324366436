"""Caption processing: keep_tokens, shuffle, caption and tag dropout, determinism, tag frequency."""

import random
from pathlib import Path

import pytest
import torch

from stylelora.data.captions import (
    CaptionOptions,
    caption_forms,
    caption_variants_note,
    every_form,
    expand_choices,
    long_captions_note,
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


def test_tag_frequency_with_caption_variants_counts_every_line_and_choice():
    # A caption file of two lines: TrainItem's caption is the lines joined as tags, its variants the lines.
    two_lines = TrainItem(Path("a.png"), "zorb, a {red|blue} zorb, zorb, {a|the} zorb", 1, "1_zorb",
                          variants=("zorb, a {red|blue} zorb", "zorb, {a|the} zorb"))
    one_line = TrainItem(Path("b.png"), "zorb, {red|{dark|light} blue}", 1, "1_zorb")
    assert tag_frequency([two_lines, one_line], variants=True) == {"1_zorb": {
        "zorb": 2, "a blue zorb": 1, "a red zorb": 1, "a zorb": 1, "dark blue": 1, "light blue": 1,
        "red": 1, "the zorb": 1}}
    # Without --caption-variants the braces are trained as written, and counted so.
    assert tag_frequency([one_line]) == {"1_zorb": {"zorb": 1, "{red|{dark|light} blue}": 1}}


def test_every_form_lists_each_choice_and_stops_at_the_limit():
    assert every_form("{a|b} {c|d}") == ["a c", "a d", "b c", "b d"]
    assert every_form("plain") == ["plain"]
    assert len(every_form("{a|b} " * 10, limit=16)) == 16


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


LINES = ("zorb, a red zorb on a {beige|white} background", "zorb, a red zorb")


def _variants(options: CaptionOptions, n: int = 400) -> list[str]:
    return [process_caption(", ".join(LINES), options, random.Random(seed), LINES) for seed in range(n)]


def test_caption_variants_draw_one_line_and_one_choice_each_time():
    drawn = _variants(CaptionOptions(variants=True))
    assert set(drawn) == {"zorb, a red zorb on a beige background", "zorb, a red zorb on a white background",
                          "zorb, a red zorb"}
    assert 160 < drawn.count("zorb, a red zorb") < 240  # each line half the time
    assert CaptionOptions(variants=True).is_static is False  # a frozen text encoder's cache cannot hold one text


def test_without_caption_variants_the_lines_are_joined_and_braces_kept():
    assert set(_variants(CaptionOptions(), 20)) == {", ".join(LINES)}


def test_caption_variants_then_shuffle_and_dropout_act_on_the_drawn_line():
    drawn = _variants(CaptionOptions(variants=True, tag_dropout=1.0, keep_tokens=1))
    assert set(drawn) == {"zorb"}
    assert set(_variants(CaptionOptions(variants=True, caption_dropout=1.0), 20)) == {""}


def test_braces_in_a_one_line_caption_are_choices_too():
    drawn = {process_caption("ink, {red|blue} circle", CaptionOptions(variants=True), random.Random(s))
             for s in range(50)}
    assert drawn == {"ink, red circle", "ink, blue circle"}
    assert expand_choices("{a | b}, {c}, x", lambda choices: choices[-1]) == "b, c, x"  # {c}: c, as kohya reads it
    nested = {expand_choices("{a|{b|c}}", random.Random(s).choice) for s in range(60)}
    assert nested == {"a", "b", "c"}  # innermost first: no brace is left in a trained caption


def test_caption_forms_are_what_sample_prompts_and_length_checks_read():
    assert caption_forms("a, b", ("a", "b"), False) == ["a, b"]
    assert caption_forms("x, {p|qq}", (), True) == ["x, p"]
    assert caption_forms("j", ("x, {p|qq}", "y"), True, pick=lambda c: max(c, key=len)) == ["x, qq", "y"]


@pytest.mark.parametrize("captions, variants, expected", [
    ([("a", ())], False, ""),
    ([("a, b", ("a", "b")), ("c", ())], False, "1 caption file has several lines: lines are joined as tags"),
    ([("{a|b} c", ())], False, "1 caption holds {a|b} choices: lines are joined as tags and choices trained as"),
    ([("a, b", ("a", "b"))], True, "each time an image is seen, one line and one choice"),
    ([("a, b", ("a", "b")), ("c, d", ("c", "d"))], False, "2 caption files have several lines"),
    ([("a", ())], True, "--caption-variants has nothing to draw from"),
])
def test_caption_variants_note_says_how_the_run_reads_lines(captions, variants, expected):
    items = [TrainItem(Path(f"{i}.png"), caption, variants=lines) for i, (caption, lines) in enumerate(captions)]
    note = caption_variants_note(items, variants)
    assert (note == "") if not expected else expected in note


class _WordTokenizer:
    model_max_length = 6  # a window of 4 words

    def __call__(self, texts, **_):
        return {"input_ids": [text.split() for text in texts]}


def test_long_caption_check_reads_each_variant_by_its_longest_choice():
    item = TrainItem(Path("a.png"), "one two three, four five", variants=("one two three", "four {five|six seven}"))
    assert "a.png (5 tokens)" in long_captions_note([item], _WordTokenizer())  # joined: trained as five words
    assert long_captions_note([item], _WordTokenizer(), variants=True) == ""  # longest line: three words
    long_choice = TrainItem(Path("b.png"), "x", variants=("one two", "one {a|b c d e}"))
    assert "b.png (5 tokens)" in long_captions_note([long_choice], _WordTokenizer(), variants=True)


def test_the_cut_captions_note_counts_the_windows_read_and_names_the_option():
    from stylelora.data.captions import long_captions_note
    from stylelora.data.scan import TrainItem
    from transformers import CLIPTokenizer
    from test_prompt_reading import TOY_TOKENIZER

    tokenizer = CLIPTokenizer.from_pretrained(TOY_TOKENIZER)
    item = TrainItem(path=Path("a.png"), caption="a red circle on a white background, " * 12, repeats=1, folder="")
    note = long_captions_note([item], tokenizer)
    assert "a.png (96 tokens)" in note and "--max-token-length 150 or 225" in note
    assert long_captions_note([item], tokenizer, max_tokens=150) == ""  # two windows hold it
