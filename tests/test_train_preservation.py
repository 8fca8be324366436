"""Base preservation's trigger-free copies: which samples, trigger removed or replaced by a decoy, the decoy pool."""
from __future__ import annotations

import pytest
import torch

from stylelora.train.preservation import accompanied_captions, company_words, decoy_words, preserved_samples

CAPTIONS = ["sks, a red circle", "a blue star", "sks, a sks on gray", "sks", "plain"]


@pytest.mark.parametrize("decoy_rate, expected", [
    (0.0, [(0, "a red circle"), (2, "a on gray")]),  # trigger removed
    (1.0, [(0, "meadow, a red circle"), (2, "meadow, a meadow on gray")]),  # every copy gets the decoy
])
def test_copies_lose_their_trigger_or_get_a_decoy_in_its_place(decoy_rate, expected):
    copies = preserved_samples(CAPTIONS, ("sks",), 1.0, ("meadow",), decoy_rate, torch.Generator().manual_seed(0))
    assert copies == expected


def test_half_the_copies_get_decoys_drawn_from_the_pool_reproducibly():
    captions = [f"sks, shape {i}" for i in range(400)]
    pool = ("kuro", "meadow", "bimu")

    def copies(seed):
        return preserved_samples(captions, ("sks",), 1.0, pool, 0.5, torch.Generator().manual_seed(seed))

    first = copies(3)
    assert first == copies(3) and first != copies(4)
    assert [i for i, _ in first] == list(range(200))  # half of the triggered samples, as without decoys
    decoyed = [caption.split(",")[0] for _, caption in first if "," in caption]
    assert 80 <= len(decoyed) <= 120 and set(decoyed) == set(pool)
    assert all("sks" not in caption for _, caption in first)


def test_captions_emptied_by_caption_dropout_get_no_copy():
    # Their target stays the data: that is what moves the unconditional prediction (the one guidance starts from).
    copies = preserved_samples(["", "sks, a star", ""], ("sks",), 1.0, ("meadow",), 1.0, torch.Generator())
    assert copies == [(1, "meadow, a star")]


def test_decoys_need_the_steps_generator():
    with pytest.raises(ValueError, match="generator"):
        preserved_samples(CAPTIONS, ("sks",), 1.0, ("meadow",), 0.5)


def test_at_rate_one_every_caption_with_the_trigger_gets_a_decoy_beside_it():
    captions = accompanied_captions(CAPTIONS, ("sks",), ("meadow",), 1.0, torch.Generator().manual_seed(0))
    assert [c for c in captions if c not in CAPTIONS] == [c for c in captions if "meadow" in c]
    assert captions[1] == "a blue star" and captions[4] == "plain"  # no trigger: untouched
    assert all(set(c.split(", ")) - {"meadow"} == set(original.split(", "))
               for c, original in zip(captions, CAPTIONS) if "sks" in original)
    generator = torch.Generator().manual_seed(5)
    before = generator.get_state()
    assert accompanied_captions(CAPTIONS, ("sks",), ("meadow",), 0.0, generator) == CAPTIONS
    # Off (the default) draws nothing, so a run trains exactly as it did before the option existed.
    assert torch.equal(generator.get_state(), before)


def test_a_quarter_of_the_triggered_captions_get_company_on_either_side_reproducibly():
    captions = [f"sks, shape {i}" for i in range(400)]
    pool = ("kuro", "meadow", "bimu")

    def company(seed):
        return accompanied_captions(captions, ("sks",), pool, 0.25, torch.Generator().manual_seed(seed))

    first = company(3)
    assert first == company(3) and first != company(4)
    changed = [c for c, original in zip(first, captions) if c != original]
    assert 70 <= len(changed) <= 130
    assert {c.split(", ")[0] for c in changed} == set(pool) | {"sks"}  # decoy before the trigger, or after it
    assert {word for c in changed for word in c.split(", ")[:2]} - {"sks"} == set(pool)


def test_company_needs_the_steps_generator():
    with pytest.raises(ValueError, match="generator"):
        accompanied_captions(CAPTIONS, ("sks",), ("meadow",), 0.25)


class VocabTokenizer:
    def get_vocab(self):
        return {token: i for i, token in enumerate(
            ["zorb</w>", "circle</w>", "ack</w>", "ab</w>", "red</w>", "x1</w>", "meadow</w>", "mead",
             "stripestyle</w>"])}


def test_the_decoy_pool_is_the_vocabularys_whole_words_that_no_caption_uses():
    # caption words (any case), triggers, too-short, non-letter and word-piece tokens never stand in for a trigger
    assert decoy_words(VocabTokenizer(), ["zorb, a red circle", "a Stripestyle square"], ["zorb"]) == ("ack", "meadow")
    assert decoy_words(VocabTokenizer(), ["a red circle"], ["sks"]) == ("ack", "meadow", "stripestyle", "zorb")


def test_company_words_are_the_decoys_the_base_reads_least():
    """On the shipped toy base, toy-zorb's decoy pool holds shape words and the other styles' triggers, which the
    base reads (or was tuned on); company keeps them out, so a zorb adapter is never taught to ignore 'circle'."""
    from pathlib import Path

    from transformers import CLIPTextModel, CLIPTokenizer

    from stylelora.models.load import TOY_BASE_DIR
    from stylelora.train.models import text_encode_fn

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE_DIR / "tokenizer")
    encode = text_encode_fn(CLIPTextModel.from_pretrained(TOY_BASE_DIR / "text_encoder").float().eval(), tokenizer,
                            torch.device("cpu"))
    zorb_captions = sorted((Path(__file__).resolve().parents[1] / "datasets" / "toy-zorb").glob("*/*.txt"))[:8]
    captions = [path.read_text().strip() for path in zorb_captions]
    pool = decoy_words(tokenizer, captions, ("zorb",))
    quiet = company_words(encode, tokenizer, captions, ("zorb",), pool)
    assert {"circle", "square", "star", "triangle"} <= set(pool)
    assert len(quiet) == len(pool) // 2 and set(quiet) < set(pool)
    assert not {"circle", "square", "star", "triangle", "and", "stripestyle", "pastelstyle"} & set(quiet)
    assert company_words(encode, tokenizer, captions, ("zorb",), pool) == quiet  # same pool, same words


def test_made_up_company_words_are_coined_words_the_tokenizer_splits():
    """Another adapter's trigger is most often a coined word the base's tokenizer splits into pieces; company holds
    such words too, the same ones on every run, none of them a caption word or trigger."""
    from transformers import CLIPTokenizer

    from stylelora.models.load import TOY_BASE_DIR
    from stylelora.train.preservation import made_up_words

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE_DIR / "tokenizer")
    words = made_up_words(tokenizer, {"zorb", "red", "circle"})
    assert len(words) == 64 and words == tuple(sorted(words)) and len(set(words)) == 64
    assert words == made_up_words(tokenizer, {"zorb", "red", "circle"})  # resume draws from the same pool
    assert all(len(tokenizer.tokenize(word)) >= 2 and word.isalpha() for word in words)
    assert any(word.endswith("style") for word in words) and any(not word.endswith(("style", "art")) for word in words)
    assert not set(made_up_words(tokenizer, set(words[:10]))) & set(words[:10])  # taken words are never coined


@pytest.mark.parametrize("setting, triggers, expected", [
    (None, ("pastelstyle",), False),  # one token to the toy tokenizer: the vocabulary words suffice
    (None, ("inkstyle",), True),  # four tokens: a coined trigger gets made-up company
    (None, ("zorb", "inkstyle"), True),  # any coined trigger
    (None, (), False),
    (False, ("inkstyle",), False),  # set by the user: kept
    (True, ("pastelstyle",), True),
])
def test_made_up_company_when_unset_follows_whether_the_tokenizer_splits_a_trigger(setting, triggers, expected):
    from transformers import CLIPTokenizer

    from stylelora.config import load_config
    from stylelora.models.load import TOY_BASE_DIR
    from stylelora.train.loop import with_coined_trigger_rules

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE_DIR / "tokenizer")
    overrides = {} if setting is None else {"train.made_up_company": setting}
    config = with_coined_trigger_rules(load_config(None, {"data.dir": "d", **overrides}), tokenizer, triggers)
    assert config.train.made_up_company is expected
    assert ("several tokens" in config.source_of("train.made_up_company")) == (setting is None and expected)
