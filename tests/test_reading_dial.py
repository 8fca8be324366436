"""The reading dial: which weights the stack fuses, the text encoder's reading moved between the base's and each
adapter's, the same image as A1111's weights at weight 1 and the base's at 0, and the dial through the CLI, the PNG
parameters and the app's settings."""
from __future__ import annotations

import copy

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, pixels
from test_generate_cli import run as _run

from stylelora.generate import reading_dial, split_attention
from stylelora.generate.generate import DIAL_FIELD, GenerateRequest, generate, request_from_parameters
from stylelora.generate.stack import AdapterStack
from stylelora.lora.spec import AdapterSpec, parse_lora_arg


@pytest.mark.parametrize("text, unet, te, share", [
    ("a.safetensors:0.5", 1.0, 1.0, 0.5),  # FILE:W: the UNet's LoRA whole, the reading half way
    ("a.safetensors", 1.0, 1.0, 1.0),  # weight 1: the adapter as A1111 draws it
    ("a.safetensors:0", 0.0, 0.0, 0.0),  # weight 0: off
    ("a.safetensors:0.6:0.3", 0.6, 1.0, 0.3),  # FILE:U:T: the UNet weight given apart, the reading T of the way
    ("a.safetensors:0:0.5", 0.0, 1.0, 0.5),  # the reading alone
    ("a.safetensors:1.5", 1.0, 1.0, 1.5),  # past 1 the reading goes beyond the adapter's, as a weight would
])
def test_the_reading_dial_fuses_the_loras_whole_and_moves_the_reading(text, unet, te, share):
    spec = parse_lora_arg(text)
    fused = reading_dial.fused_spec(spec)
    assert (fused.unet_weight, fused.text_encoder_weight, reading_dial.reading_share(spec)) == (unet, te, share)


def test_an_unknown_dial_is_refused_with_the_dials_named():
    assert reading_dial.check_dial(None) == "weights" and reading_dial.check_dial(" Reading ") == "reading"
    with pytest.raises(reading_dial.DialError, match="use one of weights, reading"):
        reading_dial.check_dial("knob")
    with pytest.raises(ValueError, match="Unknown weight dial"):
        GenerateRequest("x", dial="knob")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    adapters = tmp_path_factory.mktemp("dial") / "adapters"
    return {"base": tiny_sd_base, "adapters": adapters, "a": make_adapter(adapters / "stripes.safetensors", 1),
            "b": make_adapter(adapters / "pastel.safetensors", 2, trigger="pastel")}


def _lora_on(model, seed: int):
    """One LoRA on the first layer's query projection: (layer path, factors), and the model with it merged in."""
    layer = "text_model.encoder.layers.0.self_attn.q_proj" if hasattr(model, "text_model") else \
        "encoder.layers.0.self_attn.q_proj"
    generator = torch.Generator().manual_seed(seed)
    width = model.get_submodule(layer).weight.shape[0]
    factors = (torch.randn(width, 2, generator=generator), torch.randn(2, width, generator=generator))
    merged = copy.deepcopy(model)
    with torch.no_grad():
        merged.get_submodule(layer).weight += factors[0] @ factors[1]
    return {layer: factors}, merged


def test_one_reading_is_the_base_plus_each_adapters_change_moved_its_share(world):
    model = load_tiny_base(world["base"]).text_encoder
    tokens = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(1))
    first, first_model = _lora_on(model, 0)
    second, second_model = _lora_on(model, 1)
    with torch.no_grad():
        base, own_1, own_2 = (m(tokens, output_hidden_states=True) for m in (model, first_model, second_model))
        readings = {}
        for shares in ([0.0], [1.0], [0.25], [0.5, 0.75]):
            variants = [first, second][: len(shares)]
            split_attention.install_text_encoder(model, variants, shares=shares, side_by_side=False)
            try:
                readings[tuple(shares)] = model(tokens, output_hidden_states=True)
            finally:
                split_attention.uninstall_text_encoder(model)
    assert torch.equal(readings[(0.0,)].last_hidden_state, base.last_hidden_state)  # share 0: the base's reading
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(readings[(1.0,)][key], own_1[key])
        torch.testing.assert_close(readings[(0.25,)][key], base[key] + 0.25 * (own_1[key] - base[key]))
        torch.testing.assert_close(readings[(0.5, 0.75)][key], base[key] + 0.5 * (own_1[key] - base[key])
                                   + 0.75 * (own_2[key] - base[key]))
    for moved, start, end in zip(readings[(0.25,)].hidden_states, base.hidden_states, own_1.hidden_states):
        torch.testing.assert_close(moved, start + 0.25 * (end - start))  # every layer, for clip skip
    assert not torch.allclose(own_1.last_hidden_state, base.last_hidden_state, atol=1e-3)  # the LoRA matters


def test_split_moves_each_adapters_reading_side_by_side(world):
    model = load_tiny_base(world["base"]).text_encoder
    tokens = torch.randint(0, 100, (1, 77), generator=torch.Generator().manual_seed(2))
    first, first_model = _lora_on(model, 0)
    with torch.no_grad():
        base, own = model(tokens).last_hidden_state, first_model(tokens).last_hidden_state
        split_attention.install_text_encoder(model, [first, {}], shares=[0.5, 1.0])
        try:
            readings = model(tokens).last_hidden_state.chunk(3, dim=1)
        finally:
            split_attention.uninstall_text_encoder(model)
    torch.testing.assert_close(readings[1], base + 0.5 * (own - base))
    assert torch.equal(readings[0], base) and torch.equal(readings[2], base)


def _image(pipe, specs, dial, mode="split"):
    request = GenerateRequest("a red circle", steps=3, seed=5, sampler="ddim", loras=tuple(specs), blend_mode=mode,
                              dial=dial)
    return generate(pipe, AdapterStack.for_pipe(pipe), request)[0]


@pytest.mark.parametrize("mode", ["sum", "split"])
def test_the_reading_dial_draws_the_adapters_at_1_and_the_base_at_0(world, mode):
    pipe = load_tiny_base(world["base"])
    specs = [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)][: 1 if mode == "sum" else 2]
    as_a1111 = pixels(_image(pipe, specs, "weights", mode)).astype(int)
    base = pixels(_image(pipe, [], "weights")).astype(int)
    whole = pixels(_image(pipe, specs, "reading", mode)).astype(int)
    assert abs(whole - as_a1111).max() <= 1  # at 1 the reading is the adapter's: only rounding differs
    half = pixels(_image(pipe, [spec.with_weights(0.5) for spec in specs], "reading", mode)).astype(int)
    assert abs(half - as_a1111).max() > 3 and abs(half - base).max() > 3  # somewhere between
    off = _image(pipe, [spec.with_weights(0.0) for spec in specs], "reading", mode)
    assert (pixels(off).astype(int) == base).all() and DIAL_FIELD not in off.params.extra


def test_the_dial_is_recorded_and_read_back_and_clearing_gives_the_base_back(world):
    pipe = load_tiny_base(world["base"])
    stack = AdapterStack.for_pipe(pipe)
    base_params = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    base_image = pixels(_image(pipe, [], "weights")).astype(int)
    image = _image(pipe, [AdapterSpec(world["a"], 0.5)], "reading")
    assert stack.dial == "reading" and "forward" in vars(pipe.text_encoder)
    assert all(torch.equal(p, base_params[n]) for n, p in pipe.text_encoder.named_parameters())  # not fused
    assert image.params.extra[DIAL_FIELD] == "reading" and "Weight dial: reading" in image.parameters_text
    again = request_from_parameters(image.parameters_text, world["adapters"])
    assert again.dial == "reading"
    assert request_from_parameters(_image(pipe, [AdapterSpec(world["a"], 0.5)], "weights").parameters_text,
                                   world["adapters"]).dial == "weights"
    stack.clear()
    assert "forward" not in vars(pipe.text_encoder)
    assert (pixels(_image(pipe, [], "weights")).astype(int) == base_image).all()


def test_generate_cli_takes_the_dial(world, tmp_path, capsys):
    from stylelora.generate.pngmeta import read_png_parameters

    out = tmp_path / "dial.png"
    code, lines, _ = _run(["generate", "a red circle", "--base", str(world["base"]), "--steps", "2", "--seed", "3",
                           "--lora", f"{world['a']}:0.5", "--dial", "reading", "--out", str(out)], capsys)
    assert code == 0 and lines[-1] == str(out)
    assert "Weight dial: reading" in read_png_parameters(out)
    code, _, err = _run(["generate", "x", "--base", str(world["base"]), "--dial", "knob"], capsys)
    assert code != 0 and "use one of weights, reading" in err


def test_a_grid_compares_the_dials_side_by_side(world):
    from stylelora.generate.xy_grid import XYAxis, xy_grid

    pipe = load_tiny_base(world["base"])
    request = GenerateRequest("a red circle", steps=2, seed=4, sampler="ddim", loras=(AdapterSpec(world["a"], 0.5),))
    result = xy_grid(pipe, None, request, XYAxis("dial", ("weights", "reading")))
    weights, reading = (pixels(image).astype(int) for image in result.images)
    assert abs(weights - reading).max() > 3  # the same weight, turned two ways
    assert [DIAL_FIELD in image.params.extra for image in result.images] == [False, True]


@pytest.mark.parametrize("text, savable", [
    ("a.safetensors:0.5", False), ("a.safetensors:1", True), ("a.safetensors:0", True),
    ("a.safetensors:0.7:1", True),  # the UNet weight is a plain weight under both dials
    ("a.safetensors:1:0.5", False), ("a.safetensors:0.4:0", True),
])
def test_a_mix_under_the_reading_dial_saves_only_where_it_draws_as_its_weights(text, savable):
    specs = [parse_lora_arg(text)]
    reading_dial.check_savable(specs, "weights")  # a file holds weights
    if savable:
        reading_dial.check_savable(specs, "reading")
    else:
        with pytest.raises(reading_dial.DialError, match="set the Weight dial to weights"):
            reading_dial.check_savable(specs, "reading")


def test_on_sdxl_the_reading_dial_moves_both_text_encoders_and_the_pooled_embedding(tmp_path):
    """SDXL: two text encoders and the pooled add-on embedding all move; at 1 the image is A1111's, at 0 the base's."""
    from sdxl_fixtures import make_sdxl_adapter, tiny_sdxl_pipeline

    path = make_sdxl_adapter(tmp_path / "a.safetensors")
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stack = AdapterStack.for_pipe(pipe)

    def image(weight, dial):
        stack.apply([AdapterSpec(path, weight)] if weight else [], "split", dial)
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    as_a1111, base = image(1.0, "weights"), image(0.0, "weights")
    assert abs(image(1.0, "reading") - as_a1111).max() < 1e-3
    assert {"text_encoder", "text_encoder_2"} <= {name for name, model in stack.models.items()
                                                  if model is not None and "forward" in vars(model)}
    half = image(0.5, "reading")
    assert abs(half - as_a1111).max() > 1e-2 and abs(half - base).max() > 1e-2
    stack.clear()
    assert abs(image(0.0, "weights") - base).max() == 0


def test_after_a_split_blend_the_reading_dial_alone_takes_the_split_attention_out(world):
    fresh = pixels(_image(load_tiny_base(world["base"]), [AdapterSpec(world["a"], 0.5)], "reading")).astype(int)
    pipe = load_tiny_base(world["base"])
    _image(pipe, [AdapterSpec(world["a"], 1.0), AdapterSpec(world["b"], 1.0)], "weights")  # split, two adapters
    assert any(isinstance(p, split_attention.SplitCrossAttention) for p in pipe.unet.attn_processors.values())
    after = pixels(_image(pipe, [AdapterSpec(world["a"], 0.5)], "reading")).astype(int)
    assert not any(isinstance(p, split_attention.SplitCrossAttention) for p in pipe.unet.attn_processors.values())
    assert (after == fresh).all()
