"""Prompts past 75 tokens, read as A1111 and ComfyUI read them: windows of 75 tokens (BREAK and the comma
backtrack included), each encoded alone and laid side by side; whole images against the windows encoded by hand, in
the sum and in split, on SD 1.x and SDXL; and a short plain prompt left exactly as diffusers reads it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, pixels
from transformers import CLIPTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling

import stylelora
from stylelora.generate import prompt_reading
from stylelora.generate.generate import GenerateRequest, generate
from stylelora.lora.spec import AdapterSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOY_TOKENIZER = Path(stylelora.__file__).parent / "models" / "toy" / "base" / "tokenizer"
SCENE = "a red circle on a white background, "  # 8 tokens on the toy tokenizer, the last a comma
LONG = "stripes red circle blue square green star " * 3  # 126 tokens on the tiny pipelines' one-letter tokenizer


@pytest.fixture(scope="module")
def toy_tokenizer():
    return CLIPTokenizer.from_pretrained(TOY_TOKENIZER)


def test_a_long_prompt_is_read_whole_in_windows_that_end_after_a_comma(toy_tokenizer):
    tokens = toy_tokenizer(SCENE * 12, add_special_tokens=False).input_ids  # 96 tokens
    windows = prompt_reading.windows(toy_tokenizer, SCENE * 12)
    comma = toy_tokenizer(",", add_special_tokens=False).input_ids[0]
    # 75 tokens end inside the 10th scene, 3 tokens after the 9th comma: the window ends after that comma
    assert [len(ids) for ids, _ in windows] == [72, 24]
    assert windows[0][0][-1] == comma and [t for ids, _ in windows for t in ids] == tokens  # no word lost
    no_commas = prompt_reading.windows(toy_tokenizer, SCENE.replace(",", "") * 12)
    assert [len(ids) for ids, _ in no_commas] == [75, 9]  # no comma near the end: cut at 75


@pytest.mark.parametrize("prompt, lengths, weights", [
    ("a red circle BREAK a blue star", [3, 3], [1.0, 1.0]),
    ("(a red circle:1.3) BREAK [a blue star]", [3, 3], [1.3, 1 / 1.1]),
    ("BREAK a blue star", [0, 3], [None, 1.0]),
    ("", [0], [None]),
])
def test_break_starts_a_window(toy_tokenizer, prompt, lengths, weights):
    windows = prompt_reading.windows(toy_tokenizer, prompt)
    assert [len(ids) for ids, _ in windows] == lengths
    assert [w[0] if w else None for _, w in windows] == pytest.approx(weights)


def test_rows_pad_each_window_and_add_empty_windows(toy_tokenizer):
    first, second, empty = prompt_reading.rows(toy_tokenizer, "a red circle BREAK (blue:1.2)", 3)
    assert first.ids == toy_tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert second.weights[:3] == pytest.approx([1.0, 1.2, 1.0]) and sum(second.mask) == 3
    assert empty.ids == toy_tokenizer("", padding="max_length", max_length=77).input_ids and sum(empty.mask) == 2


def test_readings_of_windows_are_laid_side_by_side_each_reading_whole():
    """Under split a window's reading holds one reading per adapter ([base, adapter] here): the windows of each
    reading are put together, so each reading stays one block of the UNet's text states."""
    def window(value: float) -> BaseModelOutputWithPooling:
        states = torch.cat([torch.full((1, 2, 1), value), torch.full((1, 2, 1), value + 10)], dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=torch.tensor([[value]]),
                                          hidden_states=(states, states))

    joined = prompt_reading._side_by_side([window(1.0), window(2.0)], size=2)
    assert joined.last_hidden_state[0, :, 0].tolist() == [1, 1, 2, 2, 11, 11, 12, 12]
    assert joined.hidden_states[1][0, :, 0].tolist() == [1, 1, 2, 2, 11, 11, 12, 12]
    assert joined.pooler_output.tolist() == [[1.0]]  # the first window's


def _windows_by_hand(pipe, prompt: str, count: int) -> torch.Tensor:
    rows = prompt_reading.rows(pipe.tokenizer, prompt, count)
    with torch.no_grad():
        return torch.cat([pipe.text_encoder(torch.tensor([row.ids]))[0] for row in rows], dim=1)


def _draw(pipe, prompt: str, specs=(), mode=None):
    request = GenerateRequest(prompt, negative_prompt="blur", steps=3, seed=5, sampler="ddim", loras=tuple(specs),
                              blend_mode=mode)
    return pixels(generate(pipe, None, request)[0])


def test_generate_reads_a_long_prompt_whole(tiny_sd_base):
    pipe = load_tiny_base(tiny_sd_base)
    count = len(prompt_reading.windows(pipe.tokenizer, LONG))
    assert count == 2
    drawn = _draw(pipe, LONG)
    by_hand = pipe(prompt_embeds=_windows_by_hand(pipe, LONG, 2), negative_prompt_embeds=_windows_by_hand(
        pipe, "blur", 2), num_inference_steps=3, guidance_scale=5.0, width=16, height=16, output_type="pil",
        generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert (drawn == pixels(by_hand)).all()
    assert (drawn != _draw(pipe, LONG.replace("green star stripes", "green star circles"))).any()  # words past 75
    assert pipe.tokenizer.__class__ is CLIPTokenizer and "forward" not in pipe.text_encoder.__dict__


def test_a_short_plain_prompt_is_read_as_diffusers_reads_it(tiny_sd_base):
    pipe = load_tiny_base(tiny_sd_base)
    seen = []
    original = prompt_reading._WindowTokenizer.__call__
    prompt_reading._WindowTokenizer.__call__ = lambda self, *a, **k: seen.append(a) or original(self, *a, **k)
    try:
        _draw(pipe, "stripes, a red circle")
    finally:
        prompt_reading._WindowTokenizer.__call__ = original
    assert seen == []  # nothing stood in for the pipeline's tokenizer


def test_split_reads_a_long_prompt_whole_for_every_adapter(tiny_sd_base, tmp_path):
    pipe = load_tiny_base(tiny_sd_base)
    specs = (AdapterSpec(make_adapter(tmp_path / "a.safetensors", 1, trigger="stripes"), 1.0),
             AdapterSpec(make_adapter(tmp_path / "b.safetensors", 2, trigger="blue"), 1.0))
    drawn = _draw(pipe, LONG, specs, "split")
    assert (drawn != _draw(pipe, LONG.replace("green star stripes", "green star circles"), specs, "split")).any()
    assert (drawn != _draw(pipe, LONG, specs, "sum")).any()


def test_sdxl_reads_a_long_prompt_in_windows_with_the_first_windows_pooled_vector():
    from sdxl_fixtures import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    with prompt_reading.applied(pipe, [LONG, ""]):
        embeds, negative, pooled, _ = pipe.encode_prompt(LONG, device="cpu", negative_prompt="")
    assert embeds.shape[1] == negative.shape[1] == 2 * 77
    readings = []
    with torch.no_grad():
        for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
            rows = prompt_reading.rows(tokenizer, LONG, 2)
            readings.append([encoder(torch.tensor([row.ids]), output_hidden_states=True) for row in rows])
    by_hand = torch.cat([torch.cat([te1.hidden_states[-2], te2.hidden_states[-2]], dim=-1)
                         for te1, te2 in zip(*readings)], dim=1)
    assert torch.allclose(embeds, by_hand, atol=1e-6)
    assert torch.allclose(pooled, readings[1][0].text_embeds, atol=1e-6)  # the first window's


def test_clip_skip_reads_the_layer_before_the_last_through_the_final_layer_norm(tiny_sd_base):
    """A1111's Clip skip 2: the prompt's reading is the final layer norm of the layer before the last."""
    pipe = load_tiny_base(tiny_sd_base)
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        full = pipe.text_encoder(ids, output_hidden_states=True)
        expected = pipe.text_encoder.final_layer_norm(full.hidden_states[-2])
        with prompt_reading.applied(pipe, ["a red circle"], clip_skip=2):
            skipped = pipe.text_encoder(ids)[0]
        again = pipe.text_encoder(ids)[0]
    assert torch.allclose(skipped, expected, atol=1e-6) and torch.equal(again, full.last_hidden_state)
    layers = len(pipe.text_encoder.encoder.layers)
    with pytest.raises(ValueError, match=f"use {layers} at most"):
        with prompt_reading.applied(pipe, ["a red circle"], clip_skip=layers + 1):
            pass


def test_clip_skip_is_drawn_recorded_and_redrawn_in_split_too(tiny_sd_base, tmp_path):
    from stylelora.generate.generate import request_from_parameters

    pipe = load_tiny_base(tiny_sd_base)
    specs = (AdapterSpec(make_adapter(tmp_path / "a.safetensors", 1, trigger="stripes"), 1.0),
             AdapterSpec(make_adapter(tmp_path / "b.safetensors", 2, trigger="blue"), 1.0))
    for mode in ("sum", "split"):
        request = GenerateRequest("stripes, blue, a red circle", steps=3, seed=5, sampler="ddim", loras=specs,
                                  blend_mode=mode, clip_skip=2)
        result = generate(pipe, None, request)[0]
        assert "Clip skip: 2" in result.parameters_text
        assert (pixels(result) != pixels(generate(pipe, None, GenerateRequest(
            request.prompt, steps=3, seed=5, sampler="ddim", loras=specs, blend_mode=mode))[0])).any()
        again = request_from_parameters(result.parameters_text, None)
        assert again.clip_skip == 2
    with pytest.raises(ValueError, match="clip skip counts layers from the end from 1"):
        generate(pipe, None, GenerateRequest("a red circle", steps=2, clip_skip=0))


def test_a_grid_compares_clip_skip_values(tiny_sd_base, tmp_path, capsys):
    from test_generate_cli import run

    from stylelora.generate.xy_grid import parse_axis

    axis = parse_axis("clip_skip=1,2")
    assert axis.values == (1, 2) and axis.label(2) == "clip skip 2"
    with pytest.raises(ValueError, match="e.g. clip_skip=1,2"):
        parse_axis("clip_skip=1,two")
    code, out, _ = run(["grid", "a red circle", "--x", "clip_skip=1,2", "--base", str(tiny_sd_base), "--device", "cpu",
                        "--steps", "2", "--seed", "1", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0 and out == [str(tmp_path / "g.png")]
    code, _, err = run(["generate", "a red circle", "--clip-skip", "0", "--base", str(tiny_sd_base)], capsys)
    assert code == 2 and "clip skip counts layers from the end from 1" in err


@pytest.mark.parametrize("trained, chosen, noted", [("2", 1, True), ("2", 2, False), ("None", 1, False),
                                                      ("1", 2, True), ("1", 1, False), ("", 2, False)])
def test_an_adapter_trained_at_another_clip_skip_is_named(trained, chosen, noted):
    from stylelora.generate.generate import clip_skip_notes

    notes = clip_skip_notes(Path("anime.safetensors"), {"ss_clip_skip": trained}, chosen)
    assert bool(notes) is noted
    if noted:
        assert notes[0].startswith(f"anime was trained with clip skip {trained}") and f"--clip-skip {trained}" in notes[0]
