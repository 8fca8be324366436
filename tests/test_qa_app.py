"""What an A1111/ComfyUI user met in the app and the app now does otherwise: a server limit the default size went
past, messages that named the CLI's flags or wrote a seed as 4.29497e+09, a server path in Inspect's JSON, number
boxes whose checks gradio dropped (or whose values it rounded) without a word, and a blend saved in another mode than
Generate drew it, unsaid. The page's side (a slider's clamp note, error badges) is in test_app_browser and reading a
PNG's parameters in test_app_client; these call the service and the widgets directly, with no server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_app_fixtures import make_toy_adapter

from stylelora.app.errors import AppError
from stylelora.app.service import AppService, GenerateSettings, Limits


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "datasets").mkdir()
    return {"adapters_dir": tmp_path / "adapters", "datasets_dir": tmp_path / "datasets"}


def test_max_side_below_the_native_size_holds_for_the_default_size_too(folders):
    """`stylelora app --max-side 16` said "images up to 16 px a side", then drew the toy base's 32 px native images."""
    from stylelora.app.ui import size_box

    small = AppService(**folders, limits=Limits(max_side=16))
    with pytest.raises(AppError, match=r"The native size of toy is 32 px a side, over this server's limit of 16 px "
                                       r"\(--max-side when starting the app\): choose a size up to 16 px, e\.g\. "
                                       r"16x16\."):
        small.request(GenerateSettings("a red circle", steps=1, seed=1))  # size "native", the box's old default
    assert small.size_choices("toy") == ["16x16"]
    assert size_box(small, "toy")["value"] == "16x16"  # the box starts on a size the server draws
    assert small.request(GenerateSettings("a red circle", steps=1, seed=1, size="16x16")).width == 16
    roomy = AppService(**folders, limits=Limits(max_side=32))
    assert roomy.request(GenerateSettings("a red circle", steps=1, seed=1)).width is None  # native 32: allowed


def test_a_size_the_app_cannot_read_is_refused_in_the_apps_words(folders):
    """The app said "--size 'abc': ..." to a user who has no --size, only a Size box."""
    service = AppService(**folders)
    with pytest.raises(AppError) as refused:
        service.request(GenerateSettings("a red circle", size="40*24"))
    assert str(refused.value) == ("Image size '40*24': write WIDTHxHEIGHT or one number for a square, or choose one "
                                  "the Size box lists for this base.")


def test_a_bound_is_written_as_a_number_a_person_reads(folders):
    """A seed over the largest one said "between -1 and 4.29497e+09"."""
    service = AppService(**folders)
    with pytest.raises(AppError, match=r"^Seed must be between -1 and 4294967295 \(got 4294967296\)\.$"):
        service.request(GenerateSettings("a red circle", seed=2**32))
    with pytest.raises(AppError, match=r"between 0 and 30 \(got 30\.5\)"):
        service.request(GenerateSettings("a red circle", cfg=30.5))


def test_inspect_as_json_names_the_file_inside_the_adapters_folder(folders):
    """Every message writes the adapters folder by its name; Inspect's JSON gave the server's absolute path."""
    adapters = folders["adapters_dir"]
    make_toy_adapter(adapters / "styles" / "stripes.safetensors", seed=1, trigger="stripestyle")
    info = json.loads(AppService(**folders).inspect("styles/stripes", as_json=True))
    assert info["file"] == "adapters/styles/stripes.safetensors"
    assert str(adapters.parent) not in json.dumps(info)


def test_number_checks_outlive_gradios_per_page_copy_of_a_widget(folders):
    """Once an event updates a widget (a weight row's label, when an adapter is chosen), gradio serves that page from
    a copy rebuilt from the widget's class: the app's checks were patched onto the instance and were lost there, so
    a weight typed as 3 came back as gradio's "Value 3 is greater than maximum value 2." (no field named)."""
    import gradio as gr

    from stylelora.app import ui

    with gr.Blocks():
        inputs = ui.GenerateInputs(AppService(**folders))
    unet, seed = inputs.weights[0], inputs.seed
    rebuilt = [type(widget)(**{**widget.constructor_args, "render": False}) for widget in (unet, seed)]
    assert rebuilt[0].preprocess(3.0) == 3.0  # passed on: the service refuses it, naming the adapter's UNet weight
    with pytest.raises(gr.Error, match=r"Seed must be at least -1 \(got -7\)\."):
        rebuilt[1].preprocess(-7)
    # gradio rounded a seed typed as 1.5 to 2 and drew seed 2 without a word.
    for box in (seed, rebuilt[1]):
        with pytest.raises(gr.Error, match=r"Seed must be a whole number \(got 1\.5\)\."):
            box.preprocess(1.5)
    assert rebuilt[1].preprocess(5) == 5
    assert unet.get_block_name() == "slider" and seed.get_block_name() == "number"  # drawn by gradio's own page
    # gradio writes a .pyi stub beside a module whose class statement subclasses a component: none beside ui.py.
    assert not Path(ui.__file__).with_suffix(".pyi").exists()


def test_the_blend_tab_says_when_the_file_will_mix_the_adapters_otherwise_than_generate_drew_them():
    """"Save the Generate tab's current mix": Generate draws two adapters in split by default, the file mixes them by
    sum, so the saved blend drew other images than the ones it was saved from, and nothing said so."""
    from stylelora.app.ui import _describe_mix

    rows = [1.0] * 8 + [""] * 4
    view = _describe_mix(["styles/stripes", "pastel"], *rows, "split", "sum")
    assert view.startswith("Current mix: **styles/stripes** (UNet 1, TE 1), **pastel** (UNet 1, TE 1)")
    assert ("Generate draws this mix in blend mode **split** (which no file can hold); the file will mix it by "
            "**sum** (Blend mode below), so its images can differ: compare both with a Compare grid, "
            "`blend_mode=split,sum`.") in view
    assert "Generate draws" not in _describe_mix(["styles/stripes", "pastel"], *rows, "ties", "ties")
    assert "Generate draws" not in _describe_mix(["pastel"], *rows, "split", "sum")  # one adapter: every mode alike


def test_a_grid_says_it_does_not_use_the_generate_tabs_batch(folders):
    """A grid draws one image per cell with the Generate tab's settings; a Batch of 3 there was dropped unsaid."""
    from test_app_fixtures import toy_base

    service = AppService(**folders)
    service.preload("toy", toy_base())
    notes = []
    service.grid(GenerateSettings("a red circle", steps=1, seed=1, batch_size=3), "seed=1,2", notify=notes.append)
    assert notes == ["A grid draws one image per cell: the Generate tab's Batch (3) is not used here."]
    notes.clear()
    service.grid(GenerateSettings("a red circle", steps=1, seed=1), "seed=1,2", notify=notes.append)
    assert notes == []
