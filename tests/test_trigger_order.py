"""Under the split blend mode each adapter reads the prompt with its own trigger after the other adapters' triggers:
the token moves by hand, and on a tiny pipeline each adapter's reading no longer depends on the typed order."""
from __future__ import annotations

import json

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter

from stylelora.generate.stack import AdapterStack
from stylelora.generate.trigger_order import TriggerTokens, coined_read_as_stand_in, own_trigger_last, reorders_for
from stylelora.lora.spec import AdapterSpec

A, B, C, COMMA, X, Y, PAD = 10, 20, 30, 1, 5, 6, 0  # triggers A (own), B and C (others); content X, Y
TOKENS = TriggerTokens(own=((A,),), others=((B,), (C,)), separator=(COMMA,))


@pytest.mark.parametrize("row, expected", [
    ([A, COMMA, B, COMMA, X, PAD], [B, COMMA, A, COMMA, X, PAD]),  # own first: moved after the other
    ([B, COMMA, A, COMMA, X, PAD], [B, COMMA, A, COMMA, X, PAD]),  # already after: as typed
    ([A, COMMA, B, COMMA, C, COMMA, X], [B, COMMA, C, COMMA, A, COMMA, X]),  # after the furthest other
    ([B, COMMA, A, COMMA, C, COMMA, X], [B, COMMA, C, COMMA, A, COMMA, X]),
    ([A, COMMA, X, Y, PAD], [A, COMMA, X, Y, PAD]),  # no other trigger in the prompt: as typed
    ([B, COMMA, X, Y, PAD], [B, COMMA, X, Y, PAD]),  # its own trigger missing: as typed
    ([A, COMMA, B, COMMA, X, B, PAD], [B, COMMA, A, COMMA, X, B, PAD]),  # a later B (a character word) stays content
    ([A, B, COMMA, X], [B, COMMA, A, X]),  # no separator after it: the trigger moves alone
])
def test_own_trigger_moves_after_the_others_by_hand(row, expected):
    assert own_trigger_last(row, TOKENS) == expected
    assert len(own_trigger_last(row, TOKENS)) == len(row)


def test_a_trigger_of_several_tokens_moves_whole():
    tokens = TriggerTokens(own=((A, A + 1),), others=((B,),), separator=(COMMA,))
    assert own_trigger_last([A, A + 1, COMMA, B, COMMA, X], tokens) == [B, COMMA, A, A + 1, COMMA, X]


I1, I2, I3, Q, EOS = 40, 41, 42, 7, 9  # a coined trigger of three tokens; the adapter's stand-in word Q
COINED = TriggerTokens(own=((A,),), others=((I1, I2, I3), (B,)), separator=(COMMA,), stand_in=(Q,))


@pytest.mark.parametrize("tokens, row, expected", [
    # the coined trigger becomes the stand-in, the row padded with its last token to its length
    (COINED, [I1, I2, I3, COMMA, A, COMMA, X, EOS, EOS], [Q, COMMA, A, COMMA, X, EOS, EOS, EOS, EOS]),
    (COINED, [I1, I2, I3, COMMA, A, COMMA, X, I1, I2, I3, EOS], [Q, COMMA, A, COMMA, X, I1, I2, I3, EOS, EOS, EOS]),
    (COINED, [B, COMMA, A, COMMA, X, EOS], [B, COMMA, A, COMMA, X, EOS]),  # a one-token trigger is read as it is
    (TriggerTokens(own=((A,),), others=((I1, I2, I3),), separator=(COMMA,)),  # no stand-in: as it is
     [I1, I2, I3, COMMA, A, EOS], [I1, I2, I3, COMMA, A, EOS]),
    # a stand-in longer than the trigger: the row is cut before its last token
    (TriggerTokens(own=((A,),), others=((I1, I2),), separator=(COMMA,), stand_in=(Q, Q, Q)),
     [I1, I2, COMMA, A, X, EOS], [Q, Q, Q, COMMA, A, EOS]),
])
def test_coined_triggers_are_read_as_the_stand_in_by_hand(tokens, row, expected):
    assert coined_read_as_stand_in(row, tokens) == expected


def test_reorder_moves_the_trigger_then_reads_the_coined_one_as_the_stand_in():
    ids = torch.tensor([[A, COMMA, I1, I2, I3, COMMA, X, EOS, EOS]])
    assert COINED.reorder(ids).tolist() == [[Q, COMMA, A, COMMA, X, EOS, EOS, EOS, EOS]]


def test_reorders_exist_only_where_an_adapter_has_a_trigger_and_others_do(tiny_sd_base):
    tokenizer = load_tiny_base(tiny_sd_base).tokenizer
    both = reorders_for(tokenizer, [["stripes"], ["pastel"], []])
    assert both[0] is not None and both[1] is not None and both[2] is None
    assert reorders_for(tokenizer, [["stripes"]]) == [None]  # alone: nothing to move it after


def split_readings(base, tmp_path, prompts, first_metadata=None):
    """The tiny text encoder's readings of `prompts` under a split blend of a "stripes" and a "pastel" adapter:
    (base, first adapter's, second adapter's), each (prompts, tokens, channels)."""
    pipe = load_tiny_base(base)
    files = [make_adapter(tmp_path / "a.safetensors", 1, trigger="stripes", metadata=first_metadata),
             make_adapter(tmp_path / "b.safetensors", 2, trigger="pastel")]
    stack = AdapterStack.for_pipe(pipe)
    stack.apply([AdapterSpec(file, 1.0) for file in files], "split")
    try:
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids).last_hidden_state.chunk(3, dim=1)  # side by side on the token axis
    finally:
        stack.clear()


def test_each_adapters_reading_is_the_same_whichever_trigger_comes_first(tiny_sd_base, tmp_path):
    prompts = ["stripes, pastel, a red circle", "pastel, stripes, a red circle"]
    base, first, second = split_readings(tiny_sd_base, tmp_path, prompts)
    assert not torch.allclose(base[0], base[1], atol=1e-4)  # the base reads the prompt as typed
    assert torch.allclose(first[0], first[1], atol=1e-6)  # each adapter: its trigger after the other's either way
    assert torch.allclose(second[0], second[1], atol=1e-6)
    assert not torch.allclose(first[0], second[0], atol=1e-4)


@pytest.mark.parametrize("company, same", [(["a", "the"], True), (None, False)])
def test_an_adapter_reads_another_adapters_coined_trigger_as_its_first_company_word(tiny_sd_base, tmp_path,
                                                                                    company, same):
    """On the tiny tokenizer every trigger is several tokens (coined). An adapter trained with decoy company (its
    words in the metadata) reads "pastel, stripes, …" as "a, stripes, …"; a file without them reads it as typed."""
    metadata = {"ss_stylelora_company_words": json.dumps(company)} if company else None
    prompts = ["pastel, stripes, a red circle", "a, stripes, a red circle"]
    base, first, _ = split_readings(tiny_sd_base, tmp_path, prompts, metadata)
    assert torch.allclose(first[0], first[1], atol=1e-6) == same
    assert not torch.allclose(base[0], base[1], atol=1e-4)  # the base reads the prompt as typed
