"""What an A1111 / ComfyUI / CivitAI user expects of the images and grids stylelora writes: X/Y plot axes typed as in
A1111 (ranges, seed=-1), grid labels readable at real image sizes, and PNG parameters that read back whole."""
from __future__ import annotations

import re

import numpy
import pytest
from gen_fixtures import load_tiny_base, make_adapter, pixels
from PIL import Image, ImageDraw

from stylelora.generate.generate import GenerateRequest, generate, request_from_parameters
from stylelora.generate.pngmeta import GenerationParams, LoraUse, parse_parameters, read_png_parameters
from stylelora.generate.stack import AdapterStack
from stylelora.generate.xy_grid import axis_values, parse_axis, xy_grid
from stylelora.grid import make_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_sd_base):
    return load_tiny_base(tiny_sd_base)


# ----------------------------------------------------------------------------- X/Y plot axes as A1111 users type them


@pytest.mark.parametrize("text, values", [
    ("steps=1-5", (1, 2, 3, 4, 5)),
    ("seed=1-10 (+2)", (1, 3, 5, 7, 9)),
    ("seed=10-1 (-3)", (10, 7, 4, 1)),
    ("seed=3-1", (3, 2, 1)),  # counting down needs no step
    ("steps=1-10 [4]", (1, 4, 7, 10)),
    ("cfg=3-7 [3]", (3.0, 5.0, 7.0)),
    ("weight=0-1 (+0.25)", (0.0, 0.25, 0.5, 0.75, 1.0)),
    ("weight=0-1 (+0.3)", (0.0, 0.3, 0.6, 0.9)),  # never past the end; 0.3, not 0.30000000000000004
    ("weight=-1-1", (-1.0, 0.0, 1.0)),
    ("te_weight=0 - 1 ( +0.5 )", (0.0, 0.5, 1.0)),
    ("seed=1-3, 7, -1", (1, 2, 3, 7, -1)),  # ranges and single values mixed; -1 is a value, not a range
    ("weight=-0.5, 1e-3", (-0.5, 0.001)),
])
def test_number_axes_take_a1111_ranges(text, values):
    assert parse_axis(text).values == values
    kind, _, rest = text.partition("=")
    assert len(axis_values(kind, rest)) == len(values)  # the app's Compare tab reads axes through axis_values


@pytest.mark.parametrize("text, message", [
    ("seed=1-5 (-1)", r"a step of -1 never gets from 1 to 5; write e\.g\. seed=1-10 \(\+2\)"),
    ("steps=1-5 (+0)", "a step of 0 never gets"),
    ("seed=1.5-3", r"seed values are whole numbers, so a seed range is too, e\.g\. seed=1-5"),
    ("seed=1-100000", r"gives 100000 values; a range gives 1 to 1000: use a larger step"),
    ("cfg=3..7", r"'3\.\.7' is not a number: cfg values are numbers, e\.g\. cfg=3,5,7 or cfg=3-7 \[3\]"),
])
def test_a_range_that_cannot_be_drawn_is_refused_with_what_to_type(text, message):
    with pytest.raises(ValueError, match=message):
        parse_axis(text)


def test_a_random_seed_axis_records_the_seed_each_cell_was_drawn_with(pipe, tmp_path):
    """A1111 fixes seed=-1 values to random seeds before drawing: the label and the PNG say which seed made a cell,
    so a cell the user likes can be drawn again."""
    x = parse_axis("seed=-1,-1,7")
    result = xy_grid(pipe, None, GenerateRequest("a cat", steps=1), x, out_path=tmp_path / "seeds.png")
    seeds = [image.params.seed for image in result.images]
    assert seeds[2] == 7 and -1 not in seeds and seeds[0] != seeds[1]
    recorded = parse_parameters(read_png_parameters(result.path)).extra["X Values"]
    assert recorded == ", ".join(map(str, seeds))
    again = generate(pipe, None, GenerateRequest("a cat", steps=1, seed=seeds[1]))[0]
    assert numpy.array_equal(pixels(again), pixels(result.images[1]))


# ----------------------------------------------------------------------------- grid labels


def _ink_box(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """(width, height) of the dark pixels (text) inside `box` of a white label band."""
    band = numpy.asarray(image.crop(box).convert("L")) < 128
    rows, columns = numpy.nonzero(band.any(axis=1))[0], numpy.nonzero(band.any(axis=0))[0]
    return (int(columns[-1] - columns[0] + 1), int(rows[-1] - rows[0] + 1)) if rows.size else (0, 0)


@pytest.mark.parametrize("side, min_text_height", [(512, 14), (1024, 28)])
def test_grid_labels_grow_with_the_cells_and_keep_long_names_whole(side, min_text_height):
    """On SD 1.5 (512 px) and SDXL (1024 px) cells, 10 px labels vanish once the grid is shrunk to fit a screen,
    and a 110 px label column cut a run's checkpoint names that the cell had room for."""
    names = ["+toy-stripes-step000500", "+toy-stripes-step000750"]
    images = [Image.new("RGB", (side, side), (90, 90, 90))] * 4
    grid = make_grid(images, 2, column_labels=["w 0.5", "w 1"], row_labels=names)
    left = grid.width - 2 * (side + 2) - 2
    top = grid.height - 2 * (side + 2) - 2
    assert _ink_box(grid, (left, 0, left + side, top))[1] >= min_text_height
    row_text_width = _ink_box(grid, (0, top, left, top + side))[0]
    font_width = ImageDraw.Draw(grid).textlength(names[0])  # the name at the old 10 px
    assert row_text_width > 2 * font_width  # drawn whole, at a bigger size, not "…ripes-step000500"


def test_a_toy_grid_keeps_its_layout():
    images = [Image.new("RGB", (32, 32))] * 4
    grid = make_grid(images, 2, scale=3, column_labels=["a", "b"], row_labels=["c", "d"])
    assert grid.size == (110 + 2 * 98 + 2, 14 + 2 * 98 + 2)


# ----------------------------------------------------------------------------- PNG parameters


# A1111's modules/infotext_utils.py reads the settings line with this pattern; CivitAI's reader follows it.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@pytest.mark.parametrize("name", ["style, v2", "ink,wash,final", "plain"])
def test_lora_hashes_read_back_for_names_a1111_writes_without_commas(name):
    params = GenerationParams("a cat", "", 20, 7.0, "Euler a", 1, 512, 512,
                              loras=(LoraUse(name, 0.8, 0.8, "0123456789ab"), LoraUse("b", 1.0, 1.0, "ba9876543210")))
    text = params.to_text()
    a1111 = dict(A1111_PARAM.findall(text.splitlines()[-1]))
    assert a1111["Lora hashes"] == f'"{name.replace(",", "")}: 0123456789ab, b: ba9876543210"'
    assert [lora.hash for lora in parse_parameters(text).loras] == ["0123456789ab", "ba9876543210"]


def test_redrawing_a_png_refuses_a_changed_adapter_whose_name_has_a_comma(pipe, tmp_path):
    """The recorded hash is what tells the user the adapter file changed since the image was made."""
    adapters = tmp_path / "adapters"
    path = make_adapter(adapters / "ink, v2.safetensors", 5)
    made = generate(pipe, None, GenerateRequest("x <lora:ink, v2:1>", steps=1, adapters_dir=adapters))[0]
    make_adapter(adapters / "other.safetensors", 6).replace(path)
    with pytest.raises(ValueError, match=r"not the files the image was made with.*: ink, v2 \(recorded"):
        request_from_parameters(made.parameters_text, adapters, stack=AdapterStack.for_pipe(pipe))
