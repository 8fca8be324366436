"""A CivitAI uploader trains with --no-samples, runs `stylelora share` and uploads the zip: the bundle must hold a
preview image. It had none: share zipped NAME.preview.png only where training had kept a sample. Now share draws one
as `stylelora generate` would (the card's prompt on the base the adapter records, seed 0), or takes --preview, and
where the base is not on this machine it still writes the zip and says how to add one."""
from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from stylelora.generate.pngmeta import read_png_parameters
from train_fixtures import reset_accelerate, write_kohya_dataset


def cli(capsys, *args) -> tuple[int, str, str]:
    """`stylelora ARGS` through the CLI entry point in this process: (exit status, stdout, stderr)."""
    from stylelora.cli import main

    capsys.readouterr()
    try:
        status = main([str(arg) for arg in args])
    except SystemExit as exit:  # argparse's refusals
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def no_samples_run(tmp_path_factory):
    """`stylelora train DATA --steps 2 --no-samples` on the toy base: a run folder with no preview."""
    from stylelora.cli import main

    root = tmp_path_factory.mktemp("share_preview")
    data = write_kohya_dataset(root / "data" / "stripes")
    status = main(["train", str(data), "--base", "toy", "--steps", "2", "--no-samples", "--output", str(root / "run"),
                   "--output-name", "run"])
    reset_accelerate()
    assert status in (0, None) and not (root / "run" / "run.preview.png").exists()
    return root / "run"


def copy_run(run, tmp_path, base: str | None = None):
    """A copy of the run folder, its config.toml naming `base` instead (a base on another machine)."""
    copy = shutil.copytree(run, tmp_path / "run")
    if base is not None:
        config = copy / "config.toml"
        config.write_text(config.read_text(encoding="utf-8").replace('base = "toy"', f'base = "{base}"', 1),
                          encoding="utf-8")
    return copy


def members(zip_path) -> set[str]:
    return set(zipfile.ZipFile(zip_path).namelist())


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_run_without_samples_is_shared_with_a_drawn_preview(no_samples_run, tmp_path, capsys):
    run = copy_run(no_samples_run, tmp_path)
    status, out, err = cli(capsys, "share", run, "--out", tmp_path / "run.zip")
    assert status == 0, err
    assert "run/run.preview.png" in members(tmp_path / "run.zip")
    preview = run / "run.preview.png"
    assert zipfile.ZipFile(tmp_path / "run.zip").read("run/run.preview.png") == preview.read_bytes()
    assert "drawing run.preview.png on the base toy" in err
    # Drawn as `stylelora generate` draws: the card's prompt (the trigger) with the adapter, seed 0, the toy base's
    # default steps and CFG, its A1111 parameters in the PNG.
    parameters = read_png_parameters(preview)
    assert parameters.startswith("stripestyle <lora:run:1>\n"), parameters
    for field in ("Steps: 20", "CFG scale: 5", "Seed: 0", "Model: toy", 'Lora hashes: "run: '):
        assert field in parameters, field
    status, _, err = cli(capsys, "generate", "stripestyle", "--lora", f"{run / 'run.safetensors'}:1", "--seed", "0",
                         "--out", tmp_path / "generated.png")
    assert status == 0, err
    assert np.array_equal(pixels(preview), pixels(tmp_path / "generated.png"))
    # The card written again names the preview now beside the adapter.
    card = zipfile.ZipFile(tmp_path / "run.zip").read("run/README.md").decode()
    assert "(with `run.preview.png` and `run.json`)" in card


def test_a_base_not_on_this_machine_leaves_the_preview_out_and_says_how_to_add_one(no_samples_run, tmp_path,
                                                                                   capsys):
    gone = "/home/alice/models/sd15.safetensors"
    run = copy_run(no_samples_run, tmp_path, base=gone)
    status, out, err = cli(capsys, "share", run, "--out", tmp_path / "run.zip")
    assert status == 0, err
    assert out.strip() == str(tmp_path / "run.zip")
    assert members(tmp_path / "run.zip") == {"run/run.safetensors", "run/run.json", "run/README.md"}
    assert "no preview image (run.preview.png)" in err and gone in err and "does not exist" in err
    assert "--preview IMAGE.png" in err and "--base PATH" in err
    assert "`run.preview.png`" not in (run / "README.md").read_text(encoding="utf-8")

    status, _, err = cli(capsys, "share", run, "--out", tmp_path / "run.zip", "--overwrite", "--base", "toy")
    assert status == 0, err
    assert "run/run.preview.png" in members(tmp_path / "run.zip") and "warning" not in err


def test_share_takes_the_preview_given_or_none(no_samples_run, tmp_path, capsys):
    run = copy_run(no_samples_run, tmp_path, base="/home/alice/models/sd15.safetensors")
    mine = tmp_path / "mine.png"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(mine)
    status, _, err = cli(capsys, "share", run, "--out", tmp_path / "a.zip", "--preview", mine)
    assert status == 0 and err == "", err
    assert zipfile.ZipFile(tmp_path / "a.zip").read("run/run.preview.png") == mine.read_bytes()
    assert "(with `run.preview.png` and `run.json`)" in (run / "README.md").read_text(encoding="utf-8")

    (run / "run.preview.png").unlink()
    status, _, err = cli(capsys, "share", run, "--out", tmp_path / "b.zip", "--no-preview")
    assert status == 0 and err == "", err
    assert "run/run.preview.png" not in members(tmp_path / "b.zip")


@pytest.mark.parametrize("preview, said", [
    ("missing.png", "--preview {}: no such image"),
    ("notes.png", "is not an image that can be read"),
])
def test_share_refuses_a_preview_it_cannot_use_before_writing(no_samples_run, tmp_path, capsys, preview, said):
    (tmp_path / "notes.png").write_text("not an image")
    status, _, err = cli(capsys, "share", no_samples_run, "--out", tmp_path / "x.zip", "--preview",
                         tmp_path / preview)
    assert status == 2 and said.format(tmp_path / preview) in err, err
    assert not (tmp_path / "x.zip").exists() and not (no_samples_run / "run.preview.png").exists()


def test_an_adapter_that_records_no_base_is_shared_with_the_reason(tmp_path, capsys):
    from gen_fixtures import make_adapter

    adapter = make_adapter(tmp_path / "ink.safetensors", 1, trigger="ink")
    status, _, err = cli(capsys, "share", adapter)
    assert status == 0 and (tmp_path / "ink.zip").is_file()
    assert "the adapter does not record the base it was trained on" in err and "--preview IMAGE.png" in err


def test_a_preview_added_later_keeps_the_cards_sample_grid(tmp_path):
    """The card is written again to name the preview; the samples it showed stay in it."""
    from gen_fixtures import make_adapter

    from stylelora.share import add_preview, write_bundle

    adapter = make_adapter(tmp_path / "ink.safetensors", 1, trigger="ink")
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "samples" / "step-000004.png")
    write_bundle(adapter, preview=None, grid=tmp_path / "samples" / "step-000004.png")
    mine = tmp_path / "mine.jpg"
    Image.new("RGB", (32, 32), (0, 90, 200)).save(mine)
    assert add_preview(adapter, mine) == tmp_path / "ink.preview.png"
    with Image.open(tmp_path / "ink.preview.png") as written:
        assert written.format == "PNG"  # a JPEG given is converted: the file is what its name says
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "![sample grid](samples/step-000004.png)" in card and "(with `ink.preview.png` and `ink.json`)" in card


def test_a_preview_added_later_keeps_the_sidecar_the_user_edited(tmp_path):
    """A1111's metadata editor writes NAME.json: adding a preview to the same adapter leaves the user's edits."""
    import json

    from gen_fixtures import make_adapter

    from stylelora.share import add_preview, write_bundle

    adapter = make_adapter(tmp_path / "ink.safetensors", 1, trigger="ink")
    write_bundle(adapter, preview=None)
    sidecar = tmp_path / "ink.json"
    edited = dict(json.loads(sidecar.read_text(encoding="utf-8")), description="my ink", **{"preferred weight": 0.7})
    sidecar.write_text(json.dumps(edited), encoding="utf-8")
    Image.new("RGB", (32, 32), (0, 90, 200)).save(tmp_path / "mine.png")
    assert add_preview(adapter, tmp_path / "mine.png") == tmp_path / "ink.preview.png"
    assert json.loads(sidecar.read_text(encoding="utf-8")) == edited
    assert "(with `ink.preview.png` and `ink.json`)" in (tmp_path / "README.md").read_text(encoding="utf-8")
    sidecar.unlink()  # none there: the preview's card names one, so it is written
    add_preview(adapter, tmp_path / "mine.png")
    assert json.loads(sidecar.read_text(encoding="utf-8"))["activation text"] == "ink"
