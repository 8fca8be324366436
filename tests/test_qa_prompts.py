"""A QA pass on reading prompts as A1111 reads them: prompt editing inside emphasis and after brackets never closed,
the edit's `when` as A1111 1.6+ reads it, BREAK inside brackets, stray backslashes, the comma backtrack when a comma
fills a window, a negative prompt's editing, and each reading weighed with its own prompt's emphasis (never with the
weights of another prompt made of the same words), down to the text states the UNet is given."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gen_fixtures import load_tiny_base
from transformers import CLIPTokenizer

import stylelora
from stylelora.generate import emphasis, prompt_reading, prompt_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOY_TOKENIZER = Path(stylelora.__file__).parent / "models" / "toy" / "base" / "tokenizer"
LONG = "stripes red circle blue square green star " * 3  # 126 tokens on the tiny pipeline's one-letter tokenizer


@pytest.fixture(scope="module")
def toy_tokenizer():
    return CLIPTokenizer.from_pretrained(TOY_TOKENIZER)


@pytest.mark.parametrize("prompt, steps, expected", [
    ("([cat:dog:0.5]:1.3) x", 4, [(2, "(cat:1.3) x"), (4, "(dog:1.3) x")]),  # editing inside emphasis
    ("([fox|owl] cat:1.2)", 2, [(1, "(fox cat:1.2)"), (2, "(owl cat:1.2)")]),  # alternation inside emphasis
    ("[(a:1.2):(b:0.8):1]", 2, [(1, "(a:1.2)"), (2, "(b:0.8)")]),  # emphasis inside editing: its `:` is its own
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),  # A1111's own example
    ("(masterpiece, [cat:dog:2] x", 3, [(2, "(masterpiece, cat x"), (3, "(masterpiece, dog x")]),  # ( never closed
    ("a [open [b:3]", 10, [(3, "a [open "), (10, "a [open b")]),  # [ never closed
    ("[[a:b:1] c", 2, [(1, "[a c"), (2, "[b c")]),
])
def test_editing_inside_round_brackets_and_after_unclosed_ones_is_read(prompt, steps, expected):
    assert prompt_schedule.schedule(prompt, steps) == expected


@pytest.mark.parametrize("when, expected", [  # A1111 1.6+: a decimal point makes a share of the steps
    ("1.0", [(10, "a")]), ("1.5", [(10, "a")]), ("5.", [(10, "a")]),  # 100 % and past it: never switches
    ("0.5", [(5, "a"), (10, "b")]), (".5", [(5, "a"), (10, "b")]), ("1.5e-1", [(1, "a"), (10, "b")]),
    ("1", [(1, "a"), (10, "b")]), (" +3 ", [(3, "a"), (10, "b")]),  # no decimal point: a step
    ("1e-1", [(10, "b")]), ("0", [(10, "b")]), ("-1", [(10, "b")]),  # step 0 or before: `to` from the start
])
def test_when_with_a_decimal_point_is_a_share_of_the_steps(when, expected):
    assert prompt_schedule.schedule(f"[a:b:{when}]", 10) == expected


@pytest.mark.parametrize("prompt", ["[a:b:nan]", "[a:b:inf]", "[a:b:-Infinity]", "[a:b:1_0]", "[a:b:0x1]"])
def test_a_when_that_is_no_number_leaves_the_brackets_as_text(prompt):
    assert prompt_schedule.schedule(prompt, 4) == [(4, prompt)]  # no crash, no edit (A1111's grammar refuses it)


@pytest.mark.parametrize("prompt, chunks", [
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),  # no stray `)` read after the break
    ("[x (a BREAK b:1.5)]", [("x ", 1 / 1.1), ("a", 1.5 / 1.1), ("BREAK", -1.0), ("b", 1.5 / 1.1)]),
    ("a\\b c\\", [("ab c", 1.0)]),  # A1111 drops a backslash that escapes nothing
    ("\\\\(x\\)", [("\\", 1.0), ("x)", 1.1)]),  # an escaped backslash stays; the ( after it opens
])
def test_break_in_brackets_and_lone_backslashes(prompt, chunks):
    parsed = emphasis.parse(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in chunks]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in chunks])


def test_a_break_inside_brackets_reads_no_bracket_as_a_word(toy_tokenizer):
    found = prompt_reading.windows(toy_tokenizer, "(a red BREAK circle)")
    tokens = [toy_tokenizer(text, add_special_tokens=False).input_ids for text in ("a red", "circle")]
    assert [ids for ids, _ in found] == tokens
    assert [weights for _, weights in found] == [[pytest.approx(1.1)] * 2, [pytest.approx(1.1)]]


def test_a_comma_arriving_at_a_full_window_starts_the_next(toy_tokenizer):
    """A1111 backtracks to the last comma only when the token that finds the window full is not a comma."""
    found = prompt_reading.windows(toy_tokenizer, "x " * 70 + ", " + "y " * 4 + ", z")
    assert [len(ids) for ids, _ in found] == [75, 2]  # x*70 , y*4 | , z
    found = prompt_reading.windows(toy_tokenizer, "x " * 70 + ", " + "y " * 4 + "w , z")
    assert [len(ids) for ids, _ in found] == [71, 7]  # the w finds it full: back to the comma


def _unet_states(pipe):
    """The text states of each UNet call (with guidance the negative prompts' rows first)."""
    seen = []

    def record(_module, args, kwargs):
        seen.append(kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None).clone())

    return seen, pipe.unet.register_forward_pre_hook(record, with_kwargs=True)


def _plain(pipe, text: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt=text, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0][0]


def _draw(pipe, prompts, negatives, steps: int) -> list[torch.Tensor]:
    seen, hook = _unet_states(pipe)
    try:
        prompt_schedule.draw(pipe, prompts, negatives, steps=steps, guidance_scale=5.0, output_type="pil", width=16,
                             height=16, generator=[torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))])
    finally:
        hook.remove()
    return seen


def test_a_plain_negative_prompt_is_not_weighed_as_the_prompt_it_resembles(tiny_sd_base):
    pipe = load_tiny_base(tiny_sd_base)
    (states,) = _draw(pipe, ["a (red:1.5) circle"], ["a red circle"], steps=1)
    negative, positive = states
    assert torch.allclose(negative, _plain(pipe, "a red circle"), atol=1e-6)
    assert not torch.allclose(positive, _plain(pipe, "a red circle"), atol=1e-3)  # the prompt is weighed


def test_an_edit_that_drops_emphasis_reads_the_words_plain_after_it(tiny_sd_base):
    """`[(red:1.5):red:1]`: the same tokens with and without emphasis; after step 1 the red is not weighed."""
    pipe = load_tiny_base(tiny_sd_base)
    first, second = _draw(pipe, ["a [(red:1.5):red:1] circle", "a red circle"], ["", ""], steps=2)
    assert not torch.allclose(first[2], _plain(pipe, "a red circle"), atol=1e-3)
    assert torch.allclose(second[2], _plain(pipe, "a red circle"), atol=1e-6)
    assert torch.allclose(first[3], _plain(pipe, "a red circle"), atol=1e-6)  # the batch's plain prompt: plain


def test_a_negative_prompt_is_edited_between_steps(tiny_sd_base):
    pipe = load_tiny_base(tiny_sd_base)
    first, second = _draw(pipe, ["a cat"], ["[blur:sharp:1]"], steps=2)
    assert torch.allclose(first[0], _plain(pipe, "blur"), atol=1e-6)
    assert torch.allclose(second[0], _plain(pipe, "sharp"), atol=1e-6)
    assert torch.allclose(first[1], second[1]) and torch.allclose(first[1], _plain(pipe, "a cat"), atol=1e-6)


def test_a_long_prompt_without_negative_reads_the_empty_negative_in_empty_windows(tiny_sd_base):
    """Training samples give no negative prompt: diffusers reads "", which must fill its windows as A1111's empty
    prompt does (start, end, padding each), not run on as end tokens past the first."""
    pipe = load_tiny_base(tiny_sd_base)
    seen, hook = _unet_states(pipe)
    try:
        with prompt_reading.applied(pipe, [LONG]):
            pipe(LONG, num_inference_steps=1, guidance_scale=5.0, width=16, height=16, output_type="pil",
                 generator=torch.Generator("cpu").manual_seed(1))
    finally:
        hook.remove()
    with torch.no_grad():
        empty = torch.cat([pipe.text_encoder(torch.tensor([row.ids]))[0] for row in
                           prompt_reading.rows(pipe.tokenizer, "", 2)], dim=1)
    assert seen[0].shape[1] == 2 * 77 and torch.allclose(seen[0][0], empty[0], atol=1e-6)
