"""A1111's prompt editing: the grammar on A1111's own examples, the schedule of texts per step, and whole draws in
which the UNet is seen reading each text at the steps A1111 reads it (sum and split, SD 1.x and SDXL)."""
from __future__ import annotations

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, pixels

from stylelora.generate import prompt_schedule
from stylelora.generate.generate import GenerateRequest, generate, request_from_parameters
from stylelora.generate.stack import AdapterStack
from stylelora.lora.spec import AdapterSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("prompt, steps, expected", [  # A1111's documented examples and edge cases
    ("a [fantasy:cyberpunk:16] landscape", 30, [(16, "a fantasy landscape"), (30, "a cyberpunk landscape")]),
    ("a [fantasy:cyberpunk:0.25] landscape", 20, [(5, "a fantasy landscape"), (20, "a cyberpunk landscape")]),
    ("a [mountain:4] lake", 6, [(4, "a  lake"), (6, "a mountain lake")]),
    ("a [ in foreground::2] lake", 4, [(2, "a  in foreground lake"), (4, "a  lake")]),
    ("[cow|horse] in a field", 3, [(1, "cow in a field"), (2, "horse in a field"), (3, "cow in a field")]),
    ("[a:[b|c]:1]", 3, [(1, "a"), (2, "c"), (3, "b")]),  # nested; an alternation counts every step
    ("[p:(q:1.3):0.5] [word]", 2, [(1, "p [word]"), (2, "(q:1.3) [word]")]),  # emphasis left to emphasis
    ("a [red:blue:99] cat", 4, [(4, "a red cat")]),  # past the last step: never switches
    ("plain (x:1.2) [y] \\[a:b:1\\] [a:b] [open", 5, [(5, "plain (x:1.2) [y] \\[a:b:1\\] [a:b] [open")]),
])
def test_schedule_follows_a1111s_prompt_editing(prompt, steps, expected):
    assert prompt_schedule.schedule(prompt, steps) == expected


def _unet_texts(pipe):
    """Record the text states (every row: the negative prompts' first) and added conditioning of each UNet call."""
    seen = []

    def record(_module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        seen.append((states.clone(), kwargs.get("added_cond_kwargs")))

    return seen, pipe.unet.register_forward_pre_hook(record, with_kwargs=True)


def _conditional(pipe, text: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt=text, device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0][-1]


@pytest.mark.parametrize("mode", ["sum", "split"])
def test_the_unet_reads_each_text_at_the_steps_a1111_reads_it(tiny_sd_base, tmp_path, mode):
    pipe = load_tiny_base(tiny_sd_base)
    specs = (AdapterSpec(make_adapter(tmp_path / "a.safetensors", 1, trigger="red"), 1.0),
             AdapterSpec(make_adapter(tmp_path / "b.safetensors", 2, trigger="blue"), 1.0))
    request = GenerateRequest("a [red:blue:2] cat, [x|y]", steps=4, seed=3, sampler="ddim", loras=specs,
                              blend_mode=mode)
    seen, hook = _unet_texts(pipe)
    try:
        result = generate(pipe, None, request)[0]
    finally:
        hook.remove()
    assert len(seen) == 4
    with AdapterStack.for_pipe(pipe).applied(specs, mode):  # the texts as the blend reads them
        wanted = [_conditional(pipe, text) for text in ("a red cat, x", "a red cat, y", "a blue cat, x", "a blue cat, y")]
    assert all(torch.allclose(states[-1], text, atol=1e-5) for (states, _), text in zip(seen, wanted))
    plain = generate(pipe, None, GenerateRequest("a red cat, x", steps=4, seed=3, sampler="ddim", loras=specs,
                                                 blend_mode=mode))[0]
    assert (pixels(result) != pixels(plain)).any()
    assert result.parameters_text.startswith("a [red:blue:2] cat, [x|y]")  # as typed, for A1111 to read back
    again = generate(pipe, None, request_from_parameters(result.parameters_text, tmp_path))[0]
    assert (pixels(again) == pixels(result)).all()


def test_sdxl_switches_the_pooled_vector_with_the_text():
    from sdxl_fixtures import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen, hook = _unet_texts(pipe)
    try:
        generate(pipe, None, GenerateRequest("[red:blue:1] cat", negative_prompt="blur", steps=2, seed=1))
    finally:
        hook.remove()
    with torch.no_grad():
        red, blue = (pipe.encode_prompt(prompt=text, device="cpu", do_classifier_free_guidance=False)
                     for text in ("red cat", "blue cat"))
    assert torch.allclose(seen[0][0][-1], red[0][-1], atol=1e-5)
    assert torch.allclose(seen[1][0][-1], blue[0][-1], atol=1e-5)
    assert torch.allclose(seen[0][1]["text_embeds"][-1], red[2][-1], atol=1e-5)
    assert torch.allclose(seen[1][1]["text_embeds"][-1], blue[2][-1], atol=1e-5)


def test_a_batch_of_different_prompts_switches_each_image_at_its_own_steps(tiny_sd_base):
    """What `stylelora evaluate` draws: many prompts in one batch, each with its own schedule (or none)."""
    pipe = load_tiny_base(tiny_sd_base)
    prompts, negatives = ["[red:blue:1] cat", "green cat", "[x|y] cat"], ["blur", "", "blur"]
    seen, hook = _unet_texts(pipe)
    try:
        prompt_schedule.draw(pipe, prompts, negatives, steps=2, guidance_scale=5.0, output_type="pil",
                             generator=[torch.Generator("cpu").manual_seed(i) for i in range(3)], width=16, height=16)
    finally:
        hook.remove()
    for step, texts in enumerate((["red cat", "green cat", "x cat"], ["blue cat", "green cat", "y cat"])):
        negative = torch.cat([pipe.encode_prompt(prompt=n, device="cpu", num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)[0] for n in negatives])
        positive = torch.cat([_conditional(pipe, text)[None] for text in texts])
        assert torch.allclose(seen[step][0], torch.cat([negative, positive]), atol=1e-5)


@pytest.mark.parametrize("line", ["[red:blue:1] cat --d 3", "[red:blue:1] cat --n [x|y] --d 3"])
def test_training_sample_grids_edit_a_kohya_prompt_as_generate_does(tiny_sd_base, line):
    from stylelora.train.sample_prompts import parse_sample_prompt
    from stylelora.train.samples import _draw

    pipe = load_tiny_base(tiny_sd_base)
    sample = parse_sample_prompt(line)
    seen, hook = _unet_texts(pipe)
    try:
        _draw(pipe, [sample], [0], (16, 16, 2, 5.0, bool(sample.negative)), config=None)
    finally:
        hook.remove()
    for (states, _), text, negative in zip(seen, ("red cat", "blue cat"), ("x", "y")):
        assert torch.allclose(states[-1], _conditional(pipe, text), atol=1e-5)
        if sample.negative:
            assert torch.allclose(states[0], _conditional(pipe, negative), atol=1e-5)
