"""X/Y grids: what each cell's request is, and that cells are exactly the images those requests give alone."""
from __future__ import annotations

import numpy
import pytest
from gen_fixtures import load_tiny_base, make_adapter, pixels

from stylelora.generate.generate import GenerateRequest, generate
from stylelora.generate.xy_grid import XYAxis, cell_request, parse_axis, xy_grid
from stylelora.lora.spec import AdapterSpec


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    root = tmp_path_factory.mktemp("grid")
    return {"base": tiny_sd_base, "a": make_adapter(root / "a.safetensors", 1),
            "b": make_adapter(root / "b.safetensors", 2)}


def test_cell_requests(world):
    request = GenerateRequest("x", seed=5, loras=(AdapterSpec(world["b"], 0.3),))
    weight, adapter = XYAxis("weight", (0.5,)), XYAxis("adapter", (str(world["a"]),))
    # With an adapter axis, the weight axis weighs that adapter only, as FILE:W (one weight for both LoRAs).
    cell = cell_request(request, [(weight, 0.5), (adapter, str(world["a"]))])
    assert cell.loras == (AdapterSpec(world["b"], 0.3), AdapterSpec(world["a"], 0.5))
    # Without one, it weighs every adapter of the request; te_weight leaves the UNet weight alone.
    assert cell_request(request, [(weight, 0.5)]).loras == (AdapterSpec(world["b"], 0.5),)
    assert cell_request(request, [(XYAxis("te_weight", (2,)), 2.0)]).loras == (AdapterSpec(world["b"], 0.3, 2.0),)
    cell = cell_request(request, [(XYAxis("seed", (9,)), 9), (XYAxis("cfg", (3,)), 3.0)])
    assert (cell.seed, cell.cfg, cell.loras) == (9, 3.0, request.loras)
    assert cell_request(request, [(XYAxis("dial", ("Reading",)), "reading")]).dial == "reading"
    with pytest.raises(ValueError, match="needs an adapter"):
        cell_request(GenerateRequest("x"), [(weight, 0.5)])


@pytest.mark.parametrize("prompt, loras, labels", [
    ("x", (), ["base", "a"]),  # the adapter axis alone: the base, then each adapter
    ("x", ("b",), ["none added", "+a"]),  # beside --lora b: what each cell adds to b
    ("x <lora:b:1>", (), ["none added", "+a"]),  # beside a prompt tag too
])
def test_adapter_axis_labels_say_what_a_cell_adds(world, prompt, loras, labels):
    from stylelora.generate.xy_grid import has_adapters

    axis = parse_axis(f"adapter=none,{world['a']}")
    request = GenerateRequest(prompt, loras=tuple(AdapterSpec(world[name]) for name in loras))
    assert [axis.label(value, added=has_adapters(request)) for value in axis.values] == labels


@pytest.mark.parametrize("text", ["weight", "color=1,2", "seed=a", "seed=", "dial=knob", "blocks=ALL,OUTALL"])
def test_bad_axes_are_refused(text):
    with pytest.raises(ValueError):
        parse_axis(text)


def test_grid_cells_are_the_images_of_their_requests(world, tmp_path):
    pipe = load_tiny_base(world["base"])
    request = GenerateRequest("a cat", steps=2, seed=4)
    x, y = parse_axis("weight=0,1"), parse_axis(f"adapter={world['a']},none")
    result = xy_grid(pipe, None, request, x, y, out_path=tmp_path / "g.png")
    assert len(result.images) == 4 and result.columns == 2 and result.path.is_file()
    alone = generate(pipe, None, GenerateRequest("a cat", steps=2, seed=4, loras=(AdapterSpec(world["a"], 1.0),)))[0]
    assert numpy.array_equal(pixels(result.images[1]), pixels(alone))
    # Weight 0, and the "none" row, are the base image exactly.
    assert numpy.array_equal(pixels(result.images[0]), pixels(result.images[2]))
    assert numpy.array_equal(pixels(result.images[2]), pixels(result.images[3]))
    assert not numpy.array_equal(pixels(result.images[0]), pixels(result.images[1]))


def test_a_blocks_axis_sets_the_block_weights_of_the_adapters(world, tmp_path):
    pipe = load_tiny_base(world["base"])
    request = GenerateRequest("a cat", steps=2, seed=4, loras=(AdapterSpec(world["a"], 0.7),))
    x = parse_axis("blocks=none; 1,1,1,1,1,1,1,1 ;1,0,0,0,1,1,1,1")
    assert x.values == ("none", "1,1,1,1,1,1,1,1", "1,0,0,0,1,1,1,1")
    assert cell_request(request, [(x, x.values[2])]).loras == (AdapterSpec(world["a"], 0.7, None, x.values[2]),)
    result = xy_grid(pipe, None, request, x, out_path=tmp_path / "blocks.png")
    none, ones, outputs = (pixels(image) for image in result.images)
    assert numpy.array_equal(none, ones)  # every block at 1: the adapter as it is
    assert not numpy.array_equal(none, outputs)  # the input blocks and the middle off: another image
    assert "lbw=1,0,0,0,1,1,1,1" in result.images[2].parameters_text


def test_long_labels_keep_their_distinguishing_end_inside_their_cell():
    """A run's checkpoints as an adapter axis: names wider than a 96 px cell would run into the next label."""
    from PIL import Image, ImageDraw

    from stylelora.grid import _fitted

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    for name in ("toy-stripes-step000500", "toy-stripes-step000750"):
        shown = _fitted(draw, name, 96)
        assert draw.textlength(shown) <= 96 and shown.startswith("…") and shown.endswith(name[-10:])  # stepNNNNNN
    assert _fitted(draw, "seed 1", 96) == "seed 1"


def test_a_prompt_axis_is_a1111s_prompt_search_and_replace(world):
    axis = parse_axis('prompt=red, blue,"green, striped"')
    assert axis.values == ("red", "blue", "green, striped") and axis.label("green, striped") == "green, striped"
    assert axis.values_text() == 'red, blue,"green, striped"'  # what the grid PNG records: as typed, as A1111 does
    # Values not typed (made in code) are recorded as one CSV row, quoted where they hold commas, as A1111 writes them.
    assert XYAxis("prompt", axis.values).values_text() == 'red,blue,"green, striped"'
    assert parse_axis(f"prompt={axis.values_text()}").values == axis.values
    request = GenerateRequest("a red circle, red sky", negative_prompt="red blur")
    cell = cell_request(request, [(axis, "green, striped")])
    assert (cell.prompt, cell.negative_prompt) == ("a green, striped circle, green, striped sky", "green, striped blur")
    assert cell_request(request, [(axis, "red")]) == request  # the first value: the prompt as typed
    removed = parse_axis("prompt=red ,")  # an empty value takes the words out
    assert removed.values == ("red", "") and removed.label("") == "(removed)"
    assert cell_request(request, [(removed, "")]).prompt == "a  circle,  sky"  # as A1111: the tokenizer drops spaces
    with pytest.raises(ValueError):
        parse_axis("prompt=,red")  # nothing to find
    with pytest.raises(ValueError, match="'yellow' .* is in neither the prompt nor the negative prompt"):
        cell_request(GenerateRequest("a red circle"), [(parse_axis("prompt=yellow,blue"), "blue")])


def test_a_grid_compares_samplers_and_prompt_words_and_refuses_a_bad_one_before_drawing(world, tmp_path):
    from stylelora.generate.pngmeta import parse_parameters, read_png_parameters
    from stylelora.generate.xy_grid import precheck_grid

    with pytest.raises(ValueError, match="Unknown sampler 'fancy'"):
        parse_axis("sampler=euler,fancy")
    with pytest.raises(ValueError, match="is in neither the prompt"):
        precheck_grid(GenerateRequest("a cat"), parse_axis("prompt=dog,fox"), None)
    pipe = load_tiny_base(world["base"])
    request = GenerateRequest("a red cat", steps=2, seed=4)
    x, y = parse_axis("sampler=ddim,euler"), parse_axis("prompt=red,blue")
    result = xy_grid(pipe, None, request, x, y, out_path=tmp_path / "g.png")
    assert [(image.params.sampler, image.params.prompt) for image in result.images] == [
        ("DDIM", "a red cat"), ("Euler", "a red cat"), ("DDIM", "a blue cat"), ("Euler", "a blue cat")]
    assert not numpy.array_equal(pixels(result.images[0]), pixels(result.images[1]))
    assert not numpy.array_equal(pixels(result.images[0]), pixels(result.images[2]))
    extra = parse_parameters(read_png_parameters(result.path)).extra
    assert (extra["X Type"], extra["Y Type"], extra["Y Values"]) == ("Sampler", "Prompt S/R", "red,blue")
