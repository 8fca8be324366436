"""A1111's prompt emphasis: its grammar on A1111's own examples, the token weights against the pipeline's tokens,
the weighting against A1111's formula written out, and whole images: parity with the pipeline given hand-weighted
embeddings, in the sum and in split, on SD 1.x and SDXL, and in training samples."""
from __future__ import annotations

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, pixels
from transformers.modeling_outputs import BaseModelOutputWithPooling

from stylelora.generate import emphasis, prompt_reading
from stylelora.generate.generate import GenerateRequest, generate, request_from_parameters
from stylelora.generate.stack import AdapterStack
from stylelora.generate.trigger_order import reorders_for
from stylelora.lora.spec import AdapterSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("prompt, chunks", [  # the examples A1111 documents for its parser
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[faint] and [[fainter]]", [("faint", 1 / 1.1), (" and ", 1.0), ("fainter", 1 / 1.1 ** 2)]),
    ("a: b, x) y] z", [("a: b, x) y] z", 1.0)]),  # a colon, and brackets closing nothing, are text
    ("(a:b)", [("a:b", 1.1)]),
    ("(red:1.2)circle", [("red", 1.2), ("circle", 1.0)]),
    ("zorb BREAK (pastel:0.8)", [("zorb", 1.0), ("BREAK", -1.0), ("pastel", 0.8)]),
    ("", [("", 1.0)]),
])
def test_parse_follows_a1111s_grammar(prompt, chunks):
    parsed = emphasis.parse(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in chunks]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in chunks])


@pytest.mark.parametrize("prompt, plain, weighted", [
    ("stripestyle, a red circle", "stripestyle, a red circle", False),  # no syntax: the prompt itself
    ("a (red:1.2)circle", "a red circle", True),  # each span its own words
    ("(a red circle:1)", "a red circle", False),  # brackets go, nothing is weighted
    ("a \\(red\\) circle", "a (red) circle", False),
    ("zorb BREAK pastel", "zorb pastel", False),  # a window break, read as a space by a single window
])
def test_plain_text_is_what_the_text_encoder_reads(prompt, plain, weighted):
    assert emphasis.plain_text(prompt) == plain
    assert any(weight not in (1.0, emphasis.BREAK[1]) for _, weight in emphasis.parse(prompt)) is weighted


def test_rows_line_up_with_the_tokens_the_pipeline_makes(tiny_sd_base):
    tokenizer = load_tiny_base(tiny_sd_base).tokenizer
    (row,) = prompt_reading.rows(tokenizer, "a (red:1.5)circle [o]", 1)
    expected = tokenizer("a red circle o", padding="max_length", max_length=77, truncation=True)
    assert row.ids == expected.input_ids and row.mask == expected.attention_mask  # <start> a r e d c i r c l e o ...
    assert row.weights[:13] == pytest.approx([1, 1, 1.5, 1.5, 1.5, 1, 1, 1, 1, 1, 1, 1 / 1.1, 1])
    assert set(row.weights[13:]) == {1.0}


def test_aligned_weights_follow_a_moved_trigger():
    """Split reads the prompt with an adapter's trigger moved (trigger_order): the moved words keep their weights."""
    typed = [0, 7, 8, 5, 9, 10, 5, 3, 4, 1]  # <start> S S , P P , a b <end>
    weights = [1, 2.0, 2.0, 2.0, 1, 1, 1, 0.5, 0.5, 1]  # (S,:2) P, (a b:0.5)
    moved = [0, 9, 10, 5, 7, 8, 5, 3, 4, 1]  # S's reading: its trigger (and a comma) moved after P's
    assert emphasis.aligned(moved, typed, weights) == [1, 1, 1, 2.0, 2.0, 2.0, 1, 0.5, 0.5, 1]
    assert emphasis.aligned([0, 6, 3, 4, 1], typed, weights) == [1, 1, 0.5, 0.5, 1]  # a stand-in word weighs 1


def test_weigh_is_a1111s_formula():
    """Each token's states times its weight, then the reading rescaled to its mean before; pooled vectors untouched."""
    states = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]])  # mean 2
    pooled = torch.tensor([[5.0, 6.0]])
    output = BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=pooled, hidden_states=(states, states))

    class Model(torch.nn.Module):
        pass

    model, ids = Model(), torch.tensor([[0, 4, 1]])
    assert emphasis.weigh(model, ids, output) is output  # nothing being drawn: untouched
    emphasis._active[model] = emphasis._Weights({(0, 4, 1): [1.0, 2.0, 1.0]})
    try:
        weighted = emphasis.weigh(model, ids, output)
    finally:
        emphasis._active.pop(model)
    # times [1, 2, 1]: [[1, 3], [4, 4], [3, 1]], mean 16/6; times 2 / (16/6) = 0.75
    expected = torch.tensor([[[0.75, 2.25], [3.0, 3.0], [2.25, 0.75]]])
    assert torch.allclose(weighted.last_hidden_state, expected)
    assert all(torch.allclose(layer, expected) for layer in weighted.hidden_states)
    assert torch.equal(weighted.pooler_output, pooled)
    centred = BaseModelOutputWithPooling(last_hidden_state=states - 2.0001)  # mean -1e-4 against values near 1
    emphasis._active[model] = emphasis._Weights({(0, 4, 1): [1.0, 2.0, 1.0]})
    try:  # a mean near 0 is not divided by: the weights alone, as A1111's "No norm"
        weighted = emphasis.weigh(model, ids, centred)
    finally:
        emphasis._active.pop(model)
    by_token = torch.tensor([1.0, 2.0, 1.0])[:, None]
    assert torch.allclose(weighted.last_hidden_state, centred.last_hidden_state * by_token)


def _weighted_by_hand(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """A1111's emphasis written out: the plain prompt's last hidden states, token i times its weight, rescaled to
    the mean before."""
    (row,) = prompt_reading.rows(tokenizer, prompt, 1)
    with torch.no_grad():
        states = text_encoder(torch.tensor([row.ids]))[0]
    scaled = states * torch.tensor(row.weights)[None, :, None]
    return scaled * (states.mean() / scaled.mean())


def _with_a_mean(pipe):
    """The tiny random encoders end in a layer norm without bias, so their readings' mean is ~0 (the rescale is
    skipped there): a bias gives them a mean, as a trained CLIP's readings have, so the rescale is tested too."""
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        for name, module in (encoder.named_modules() if encoder is not None else ()):
            if name.endswith("final_layer_norm") or name.endswith("layer_norm2"):  # SDXL reads a layer's output
                module.bias.data.fill_(0.5)
    return pipe


def _plain_embeds(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_generate_draws_the_embeddings_a1111s_formula_gives(tiny_sd_base):
    pipe = _with_a_mean(load_tiny_base(tiny_sd_base))
    prompt, negative = "a (red:1.6) circle, ((blue))", "[ugly] blur"
    request = GenerateRequest(prompt, negative_prompt=negative, steps=3, seed=5, sampler="ddim")
    drawn = pixels(generate(pipe, None, request)[0])
    by_hand = pipe(prompt_embeds=_weighted_by_hand(pipe.text_encoder, pipe.tokenizer, prompt),
                   negative_prompt_embeds=_weighted_by_hand(pipe.text_encoder, pipe.tokenizer, negative),
                   num_inference_steps=3, guidance_scale=5.0, width=16, height=16, output_type="pil",
                   generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert (drawn == pixels(by_hand)).all()
    plain = pixels(generate(pipe, None, GenerateRequest("a red circle, blue", negative_prompt="ugly blur", steps=3,
                                                         seed=5, sampler="ddim"))[0])
    assert (drawn != plain).any()  # the weights change the image
    assert "forward" not in pipe.text_encoder.__dict__  # nothing left behind


def test_a_weight_of_one_draws_the_plain_prompt(tiny_sd_base, tmp_path):
    pipe = load_tiny_base(tiny_sd_base)
    adapter = make_adapter(tmp_path / "a.safetensors", 1, trigger="stripes")
    for mode in ("sum", "split"):
        specs = (AdapterSpec(adapter, 1.0), AdapterSpec(make_adapter(tmp_path / "b.safetensors", 2), 1.0))
        draw = lambda text: pixels(generate(pipe, None, GenerateRequest(  # noqa: E731
            text, steps=3, seed=5, sampler="ddim", loras=specs, blend_mode=mode))[0])
        plain = draw("stripes, a red circle")
        assert (draw("(stripes:1), (a red circle:1.0)") == plain).all()
        assert (draw("(stripes:1.4), a red circle") != plain).any()


def test_split_weighs_every_reading_with_its_own_token_order(tiny_sd_base, tmp_path):
    """Under split each adapter reads the prompt with its trigger moved after the other's; the weights move with
    the words, in the base's reading and in each adapter's."""
    pipe = load_tiny_base(tiny_sd_base)
    a = make_adapter(tmp_path / "a.safetensors", 1, trigger="aa")
    b = make_adapter(tmp_path / "b.safetensors", 2, trigger="bb")
    prompt = "(aa:1.5), bb, a red circle"
    seen = []
    stack = AdapterStack.for_pipe(pipe)
    with stack.applied([AdapterSpec(a, 1.0), AdapterSpec(b, 1.0)], "split"):
        original = emphasis.weigh

        def recording(model, ids, output):
            weighted = original(model, ids, output)
            if ids is not None and emphasis._active.get(model) is not None:
                seen.append((ids[0].tolist(), (weighted.last_hidden_state / output.last_hidden_state)[0, :, 0]))
            return weighted

        emphasis.weigh = recording
        try:
            with prompt_reading.applied(pipe, [prompt]):
                pipe.text_encoder(pipe.tokenizer(prompt, padding="max_length", truncation=True, max_length=77,
                                                 return_tensors="pt").input_ids)
        finally:
            emphasis.weigh = original
    reorders = reorders_for(pipe.tokenizer, [["aa"], ["bb"]])
    typed = prompt_reading.rows(pipe.tokenizer, prompt, 1)[0].ids
    assert [ids for ids, _ in seen] == [typed, reorders[0](torch.tensor([typed]))[0].tolist(), typed]
    a_tokens = pipe.tokenizer("aa", add_special_tokens=False).input_ids
    assert typed != seen[1][0]
    for ids, ratio in seen:  # the trigger's tokens weigh 1.5 against the rest, wherever they are
        start = next(i for i in range(len(ids)) if ids[i:i + len(a_tokens)] == a_tokens)
        weighted = ratio[start:start + len(a_tokens)]
        rest = torch.cat([ratio[:start], ratio[start + len(a_tokens):]])
        assert torch.allclose(weighted / rest[0], torch.full_like(weighted, 1.5), atol=1e-4)
        assert torch.allclose(rest, rest[0].expand_as(rest), atol=1e-4)


def test_sdxl_weighs_both_encoders_and_not_the_pooled_vector():
    from sdxl_fixtures import tiny_sdxl_pipeline

    pipe = _with_a_mean(tiny_sdxl_pipeline())
    prompt = "a (red:1.5) circle"
    plain = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    with prompt_reading.applied(pipe, [prompt]):
        weighted = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    embeds, pooled = weighted[0], weighted[2]
    assert torch.equal(pooled, plain[2])
    width = pipe.text_encoder.config.hidden_size
    pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
    for part, (encoder, tokenizer) in zip((embeds[..., :width], embeds[..., width:]), pairs):
        (row,) = prompt_reading.rows(tokenizer, prompt, 1)
        with torch.no_grad():
            states = encoder(torch.tensor([row.ids]), output_hidden_states=True).hidden_states[-2]
        scaled = states * torch.tensor(row.weights)[None, :, None]
        assert torch.allclose(part, scaled * (states.mean() / scaled.mean()), atol=1e-6)
    assert "forward" not in pipe.text_encoder_2.__dict__


def test_training_samples_weigh_a_kohya_prompts_emphasis(tiny_sd_base):
    """kohya's sample prompts take `(word:1.2)`; the sample grid draws them weighted, as generate does."""
    from stylelora.train.samples import _draw
    from stylelora.train.sample_prompts import parse_sample_prompt

    pipe = _with_a_mean(load_tiny_base(tiny_sd_base))
    sample = parse_sample_prompt("a (red:1.6) circle --n [blur] --d 3")
    drawn = _draw(pipe, [sample], [0], (16, 16, 2, 5.0, True), config=None)[0]
    by_hand = pipe(prompt_embeds=_weighted_by_hand(pipe.text_encoder, pipe.tokenizer, sample.prompt),
                   negative_prompt_embeds=_weighted_by_hand(pipe.text_encoder, pipe.tokenizer, sample.negative),
                   num_inference_steps=2, guidance_scale=5.0, width=16, height=16, output_type="pil",
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert (pixels(drawn) == pixels(by_hand)).all()


def test_cli_draws_emphasis_keeps_it_in_the_png_and_redraws_it(tiny_sd_base, tmp_path, capsys):
    from PIL import Image
    from test_generate_cli import run

    from stylelora.generate.pngmeta import parse_parameters, read_png_parameters

    adapter = make_adapter(tmp_path / "adapters" / "stripes.safetensors", 1, trigger="stripes")
    common = ["--base", str(tiny_sd_base), "--device", "cpu", "--steps", "2", "--seed", "4", "--lora", str(adapter)]
    drawn = {}
    for name, prompt in (("weighted", "(stripes:1.3), a red circle"), ("plain", "stripes, a red circle")):
        code, out, err = run(["generate", prompt, "--out", str(tmp_path / f"{name}.png"), *common], capsys)
        assert code == 0 and "emphasis" not in err
        drawn[name] = pixels(Image.open(out[0]))
    text = read_png_parameters(tmp_path / "weighted.png")
    assert parse_parameters(text).prompt == "(stripes:1.3), a red circle"  # as typed, for A1111 to read back
    assert (drawn["weighted"] != drawn["plain"]).any()
    pipe = load_tiny_base(tiny_sd_base)
    again = generate(pipe, None, request_from_parameters(text, tmp_path / "adapters"))
    assert (pixels(again[0]) == drawn["weighted"]).all()
