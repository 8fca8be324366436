"""A Z axis for grids, as A1111's X/Y/Z plot has: one X/Y grid per Z value, side by side under its Z value, in one
PNG that records `Z Type` / `Z Values`; the CLI's `grid --z`, the app's Compare tab (service), and the refusals of
axes that cannot make one grid. Also: the grid PNG records the axes' values as typed, as A1111 does."""
from __future__ import annotations

import numpy
import pytest
from gen_fixtures import load_tiny_base, make_adapter
from PIL import Image

from stylelora.cli import main
from stylelora.generate.generate import GenerateRequest, generate
from stylelora.generate.pngmeta import parse_parameters, read_png_parameters
from stylelora.generate.xy_grid import parse_axis, xy_grid
from stylelora.grid import make_grid
from stylelora.lora.spec import AdapterSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd_base):
    """The tiny base (16 px images) and adapters a and b in one adapters folder."""
    adapters = tmp_path_factory.mktemp("z_axis") / "adapters"
    adapters.mkdir()
    return {"base": tiny_sd_base, "adapters": adapters, "a": make_adapter(adapters / "a.safetensors", 1),
            "b": make_adapter(adapters / "b.safetensors", 2)}


def stylelora(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err


def grid_args(world, out, *axes: str) -> list[str]:
    return ["grid", "a red cat", *axes, "--base", str(world["base"]), "--adapters-dir", str(world["adapters"]),
            "--device", "cpu", "--steps", "2", "--seed", "4", "--out", str(out)]


def band_ink(image: Image.Image, box: tuple[int, int, int, int]) -> numpy.ndarray:
    """The columns of `box` that hold dark pixels (text)."""
    return numpy.nonzero((numpy.asarray(image.crop(box).convert("L")) < 128).any(axis=0))[0]


def test_a_z_axis_lays_one_xy_grid_per_value_side_by_side_under_its_value(world, tmp_path, capsys):
    """Weight (X) x seed (Y) x adapter (Z), 2x1x2: the PNG is the two X/Y grids that `grid` draws without --z, side by
    side under the Z values, and every cell is the image `generate` draws with its settings."""
    code, out, err = stylelora(grid_args(world, tmp_path / "z.png", "--x", "weight=0,1", "--y", "Seed=4",
                                         "--z", "adapter=a,b"), capsys)
    assert code == 0, err
    pipe = load_tiny_base(world["base"])
    x, y = parse_axis("weight=0,1"), parse_axis("seed=4")
    sub_grids = []
    for adapter in ("a", "b"):
        alone = [generate(pipe, None, GenerateRequest("a red cat", steps=2, seed=4,
                                                      loras=(AdapterSpec(world[adapter], weight),)))[0]
                 for weight in (0.0, 1.0)]
        sub_grids.append(make_grid([image.image for image in alone], 2, scale=3,
                                   column_labels=[x.label(v) for v in x.values],
                                   row_labels=[y.label(v) for v in y.values]))
    sub = sub_grids[0]
    with Image.open(out) as grid:
        grid = grid.convert("RGB")
    title, margin = 14, 8  # at 10 px text, a toy cell's: the sub-grids' label band, and a gap between them
    assert grid.size == (2 * sub.width + margin, title + sub.height)
    for index, expected in enumerate(sub_grids):
        left = index * (sub.width + margin)
        assert numpy.array_equal(numpy.asarray(grid.crop((left, title, left + sub.width, title + sub.height))),
                                 numpy.asarray(expected))  # every cell's pixels, and the X/Y labels
        ink = band_ink(grid, (left, 0, left + sub.width, title))
        assert ink.size and abs((ink[0] + ink[-1]) / 2 - sub.width / 2) < 8  # the Z value, centred above its grid
    assert not band_ink(grid, (sub.width, 0, sub.width + margin, grid.height)).size  # nothing between the grids
    extra = parse_parameters(read_png_parameters(out)).extra
    assert (extra["X Type"], extra["X Values"], extra["Y Type"], extra["Y Values"]) == ("weight", "0,1", "Seed", "4")
    assert (extra["Z Type"], extra["Z Values"]) == ("adapter", "a,b")


def test_a_z_axis_without_a_y_axis_is_one_row_per_z_value_as_in_a1111(world, tmp_path, capsys):
    code, out, err = stylelora(grid_args(world, tmp_path / "zx.png", "--x", "seed=1,2", "--z", "CFG Scale=3,5"),
                               capsys)
    assert code == 0, err
    pipe = load_tiny_base(world["base"])
    x = parse_axis("seed=1,2")
    rows = [make_grid([generate(pipe, None, GenerateRequest("a red cat", steps=2, seed=seed, cfg=cfg))[0].image
                       for seed in (1, 2)], 2, scale=3, column_labels=[x.label(v) for v in x.values])
            for cfg in (3.0, 5.0)]
    with Image.open(out) as grid:
        grid = grid.convert("RGB")
    title, margin = 14, 8
    assert grid.size == (2 * rows[0].width + margin, title + rows[0].height)
    for index, expected in enumerate(rows):
        left = index * (rows[0].width + margin)
        box = (left, title, left + rows[0].width, title + rows[0].height)
        assert numpy.array_equal(numpy.asarray(grid.crop(box)), numpy.asarray(expected))
    extra = parse_parameters(read_png_parameters(out)).extra
    assert (extra["Z Type"], extra["Z Values"]) == ("CFG Scale", "3,5") and "Y Type" not in extra


def test_progress_counts_every_cell_of_every_xy_grid(world):
    pipe = load_tiny_base(world["base"])
    reports = []
    result = xy_grid(pipe, None, GenerateRequest("a red cat", steps=1, seed=3), parse_axis("seed=1,2"),
                     parse_axis("cfg=3"), parse_axis("steps=1,2"),
                     progress=lambda done, total: reports.append((done, total)))
    assert reports == [(done, 4) for done in range(1, 5)]
    # Row-major per X/Y grid, one grid per Z value in turn.
    assert [(image.params.seed, image.params.steps) for image in result.images] == [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize("axes, message", [
    (["--x", "seed=1,2", "--y", "cfg=3,5", "--z", "seed=3"],
     "error: The X and Z axes are both seed: pick a different kind for each axis"),
    (["--x", "seed=1,2", "--y", "CFG Scale=3,5", "--z", "cfg=7"],
     "error: The Y and Z axes are both cfg: pick a different kind for each axis"),
    (["--x", "seed=1,2", "--y", "Seed=3", "--z", "cfg=3,5"],
     "error: The X and Y axes are both seed: pick a different kind for each axis"),
    (["--x", "seed=1,2", "--z", "Seed=3"],  # no Y axis: still two axes of one kind
     "error: The X and Z axes are both seed: pick a different kind for each axis"),
])
def test_axes_that_cannot_make_one_grid_are_refused_before_the_base_loads(world, tmp_path, capsys, monkeypatch,
                                                                          axes, message):
    import stylelora.generate.command as command

    monkeypatch.setattr(command, "_load_pipe", lambda args: pytest.fail("the base was loaded"))
    code, out, err = stylelora(grid_args(world, tmp_path / "g.png", *axes), capsys)
    assert code == 2 and out == "" and err.startswith(message) and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("text, typed", [
    ("CFG Scale=3,5", "3,5"),  # not "3.0, 5.0"
    ("weight=0-1 [3]", "0-1 [3]"),  # A1111's range, as typed
    ("blocks=none;1,0,0,0,1,1,1,1", "none;1,0,0,0,1,1,1,1"),
    ('prompt=red, "blue, striped"', 'red, "blue, striped"'),
])
def test_the_grid_png_records_axis_values_as_typed_where_they_read_back_the_same(text, typed):
    axis = parse_axis(text)
    assert axis.values_text() == typed
    assert parse_axis(f"{text.partition('=')[0]}={axis.values_text()}").values == axis.values


def test_seeds_drawn_for_minus_one_are_recorded_as_drawn_not_as_typed(world, tmp_path):
    """seed=-1 is replaced by the seeds drawn (on a Z axis too), so that the grid can be drawn again: the typed -1
    did not draw it."""
    pipe = load_tiny_base(world["base"])
    result = xy_grid(pipe, None, GenerateRequest("a red cat", steps=1), parse_axis("cfg=7"), parse_axis("steps=1"),
                     parse_axis("seed=-1,5"), out_path=tmp_path / "seeds.png")
    seeds = [image.params.seed for image in result.images]
    assert seeds[1] == 5 and seeds[0] != -1
    extra = parse_parameters(read_png_parameters(result.path)).extra
    assert (extra["Z Type"], extra["Z Values"]) == ("Seed", ", ".join(map(str, seeds)))


# ----------------------------------------------------------------------------- the app's Compare tab


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from test_app_fixtures import make_toy_adapter, toy_base

    from stylelora.app.service import AppService

    folder = tmp_path_factory.mktemp("z_adapters")
    make_toy_adapter(folder / "stripes.safetensors", seed=1, trigger="stripestyle")
    make_toy_adapter(folder / "pastel.safetensors", seed=2, trigger="pastelstyle")
    app = AppService(folder)
    app.preload("toy", toy_base())
    return app


def settings(*names: str, **changes):
    from test_app_fixtures import PROMPT

    from stylelora.app.service import AdapterWeight, GenerateSettings

    values = {"prompt": PROMPT, "steps": 2, "seed": 7, **changes}
    return GenerateSettings(adapters=tuple(AdapterWeight(name, 1.0) for name in names), **values)


def test_the_compare_tab_draws_a_z_axis_with_the_cli_s_library_calls(service):
    reports = []
    path = service.grid(settings("stripes", "pastel"), "weight=0,1", "seed=1", "blend_mode=sum,split",
                        progress=lambda done, total: reports.append((done, total)))
    extra = parse_parameters(read_png_parameters(path)).extra
    assert (extra["Z Type"], extra["Z Values"], extra["X Values"]) == ("blend_mode", "sum,split", "0,1")
    assert reports[-1] == (2 * 1 * 2 * 2, 2 * 1 * 2 * 2)  # sampling steps over every cell of both X/Y grids
    with Image.open(path) as grid:
        assert grid.width > 2 * (2 * 32 * 3) and grid.height > 32 * 3  # two sub-grids of 2x1 cells, shown 3x


def test_the_compare_tab_refuses_a_z_axis_as_the_cli_does_and_counts_its_cells(service):
    from stylelora.app.errors import AppError

    before = sorted(service.grids_dir.glob("*")) if service.grids_dir.exists() else []
    over = r"A grid of 3x3x3 = 27 cells \(3 X/Y grids of 3x3\) is over this server's limit of 25 cells " \
           r"\(--max-grid-cells\): use fewer values"
    with pytest.raises(AppError, match=over):
        service.grid(settings(), "seed=1,2,3", "cfg=1,2,3", "steps=1,2,3")
    with pytest.raises(AppError, match="The X and Z axes are both seed: pick a different kind for each axis"):
        service.grid(settings(), "seed=1,2", "cfg=3", "Seed=3")
    with pytest.raises(AppError, match=r"A grid of 13x1x2 = 26 cells \(2 X/Y grids of 13x1\) is over"):
        service.grid(settings(), "seed=1-13", None, "cfg=3,5")  # no Y axis: one row per Z value
    with pytest.raises(AppError, match="Grid axis steps: a value must be between 1 and 150"):
        service.grid(settings(), "seed=1,2", "cfg=3", "steps=2,1000")  # held to the X and Y axes' limits
    after = sorted(service.grids_dir.glob("*")) if service.grids_dir.exists() else []
    assert after == before  # a refused grid leaves no file behind
