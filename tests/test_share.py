"""The share bundle: every run writes NAME.preview.png, A1111's NAME.json sidecar and a README model card, the
adapter carries the model-spec fields sites read, and `stylelora share` zips it all."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import zipfile

import pytest
from PIL import Image

from stylelora.config import load_config
from stylelora.lora.adapter_file import read_header
from stylelora.train.loop import run_training
from train_fixtures import REPO, build_tiny_base, reset_accelerate, subprocess_env, tiny_overrides, write_kohya_dataset


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    base = build_tiny_base(root / "base")
    data = write_kohya_dataset(root / "data" / "stripes")
    out = root / "run"
    run_training(load_config(None, tiny_overrides(data, out, base, **{"train.license": "CC-BY-4.0", "train.output_name": "run"})))
    reset_accelerate()
    return out


def test_a_run_writes_preview_sidecar_and_model_card(run_dir):
    preview = Image.open(run_dir / "run.preview.png")
    assert preview.size == (32, 32)
    sidecar = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert sidecar["activation text"] == "stripestyle" and sidecar["preferred weight"] == 1.0
    assert sidecar["sd version"] == "SD1" and "stripestyle" in sidecar["description"]
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    for text in ("Trigger words: stripestyle", "<lora:run:1>", "load_lora_weights", "License: CC-BY-4.0",
                 "Dataset: 8 images", "![sample grid](samples/step-000004.png)"):
        assert text in card, text


def test_the_adapter_carries_the_model_spec_fields_sites_read(run_dir):
    _, metadata = read_header(run_dir / "run.safetensors")
    assert metadata["modelspec.title"] == "run" and metadata["modelspec.trigger_phrase"] == "stripestyle"
    assert metadata["modelspec.license"] == "CC-BY-4.0" and "stripestyle" in metadata["modelspec.description"]
    assert metadata["modelspec.resolution"] == "32x32" and metadata["modelspec.date"]
    kind, _, data = metadata["modelspec.thumbnail"].partition(";base64,")
    assert kind == "data:image/jpeg"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (256, 256)
    shown = subprocess.run([sys.executable, "-m", "stylelora.cli", "inspect", str(run_dir / "run.safetensors")],
                           cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert "license        CC-BY-4.0" in shown.stdout and "thumbnail      image/jpeg" in shown.stdout


def test_share_packs_the_bundle(run_dir, tmp_path):
    out = tmp_path / "run.zip"
    result = subprocess.run([sys.executable, "-m", "stylelora.cli", "share", str(run_dir), "--out", str(out)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = set(zipfile.ZipFile(out).namelist())
    # In a run/ folder: two bundles unzipped into models/Lora keep their own README.md and samples/.
    assert {f"run/{name}" for name in ("run.safetensors", "run.preview.png", "run.json", "README.md",
                                       "samples/step-000004.png")} <= names
    empty = subprocess.run([sys.executable, "-m", "stylelora.cli", "share", str(tmp_path)], cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "exactly one adapter" in empty.stderr


def test_blend_writes_the_same_bundle(run_dir, tmp_path, capsys):
    """A saved blend gets preview, sidecar and card; a second blend in the same folder keeps the first one's card.

    The first blend runs `python -m stylelora.cli blend` as a process; the others call the same entry point
    (stylelora.cli.main) in this process, its exit status, stdout and stderr read as a process's would be: each
    process paid seconds of imports for a blend of milliseconds."""
    import shutil
    from types import SimpleNamespace

    from stylelora.cli import main

    inputs = [shutil.copyfile(run_dir / "run.safetensors", tmp_path / f"{name}.safetensors") for name in "ab"]
    out = tmp_path / "mix" / "mix.safetensors"

    def arguments(target, extra):
        return ["blend", f"{inputs[0]}:1", f"{inputs[1]}:0.5", "--out", str(target), *extra]

    def blend(target, *extra):
        capsys.readouterr()
        try:
            returncode = main(arguments(target, extra))
        except SystemExit as exit:  # argparse's refusals
            returncode = exit.code
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=returncode, stdout=captured.out, stderr=captured.err)

    result = subprocess.run([sys.executable, "-m", "stylelora.cli", *arguments(out, ["--preview",
                                                                                  str(run_dir / "run.preview.png")])],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out.parent / "mix.preview.png").read_bytes() == (run_dir / "run.preview.png").read_bytes()
    sidecar = json.loads((out.parent / "mix.json").read_text(encoding="utf-8"))
    assert sidecar["activation text"] == "stripestyle" and sidecar["sd version"] == "SD1"
    assert sidecar["notes"] == "Blended with stylelora from run (1.0), run (0.5). License: CC-BY-4.0."
    card = (out.parent / "README.md").read_text(encoding="utf-8")
    assert "<lora:mix:1>" in card and "License: CC-BY-4.0" in card  # both inputs carry CC-BY-4.0
    assert "## Blend" in card and "not trained" not in card  # a blend's card tells its inputs, not a training run
    assert "run (`a.safetensors`): UNet 1.0, text encoder 1.0" in card and "UNet 0.5, text encoder 0.5" in card
    assert "`mix.preview.png`" in card
    _, metadata = read_header(out)
    assert metadata["modelspec.license"] == "CC-BY-4.0" and metadata["modelspec.thumbnail"].startswith("data:image/")

    second = blend(out.with_name("mix2.safetensors"), "--license", "CC0-1.0")
    assert second.returncode == 0, second.stderr
    assert "License: CC0-1.0" in (out.parent / "mix2.md").read_text(encoding="utf-8")
    assert (out.parent / "README.md").read_text(encoding="utf-8") == card
    assert "preview.png" not in (out.parent / "mix2.md").read_text(encoding="utf-8")  # none was written for it
    again = blend(out)
    assert again.returncode == 2 and "exists already" in again.stderr and "--overwrite" in again.stderr
    assert (out.parent / "README.md").read_text(encoding="utf-8") == card  # refused before anything was written
    replaced = blend(out, "--overwrite", "--license", "CC0-1.0")
    assert replaced.returncode == 0, replaced.stderr
    # The folder now holds two blends, so mix's new card is mix.md; README.md, its old card, would contradict it.
    assert "License: CC0-1.0" in (out.parent / "mix.md").read_text(encoding="utf-8")
    assert not (out.parent / "README.md").exists()
    assert "License: CC0-1.0" in (out.parent / "mix2.md").read_text(encoding="utf-8")  # the other blend's card stays
    own = tmp_path / "project"
    own.mkdir()
    (own / "README.md").write_text("# my notes\n", encoding="utf-8")
    assert blend(own / "mix.safetensors").returncode == 0
    assert (own / "README.md").read_text(encoding="utf-8") == "# my notes\n"  # the user's README is kept
    assert "## Blend" in (own / "mix.md").read_text(encoding="utf-8")
    runs = tmp_path / "outputs"  # a folder of run folders, as outputs/ is
    (runs / "run").mkdir(parents=True)
    shutil.copyfile(run_dir / "run.safetensors", runs / "run" / "run.safetensors")
    assert blend(runs / "mix.safetensors").returncode == 0
    assert (runs / "mix.md").is_file() and not (runs / "README.md").exists()
    (tmp_path / "notes.png").write_text("not an image")
    unreadable = blend(out.with_name("mix4.safetensors"), "--preview", str(tmp_path / "notes.png"))
    assert unreadable.returncode == 2 and "is not an image that can be read" in unreadable.stderr
    onto_input = blend(inputs[0])
    assert onto_input.returncode == 2 and "one of the adapters being blended" in onto_input.stderr
    assert inputs[0].read_bytes() == (run_dir / "run.safetensors").read_bytes()  # the input is kept
    missing = blend(out.with_name("mix3.safetensors"), "--preview", str(tmp_path / "nope.png"))
    assert missing.returncode != 0 and "no such image" in missing.stderr
    assert not out.with_name("mix3.safetensors").exists()  # bad input is refused before anything is written


def test_a_rank_blends_card_gives_its_error_as_inspect_does():
    from stylelora.share import BLEND_KEY, _blend_lines

    record = {"mode": "rank", "rank": 8, "max_relative_error": 0.42852842204270425, "inputs": []}
    lines = _blend_lines({BLEND_KEY: json.dumps(record), "ss_network_dim": "8", "ss_network_alpha": "8"})
    assert "rank 8 by SVD, largest relative error 4.29e-01" in lines[2]  # not seventeen digits


def test_a_compact_ties_blends_card_says_what_rank_it_was_stored_at():
    """A ties blend saved without --rank or --exact is stored at the inputs' total rank (rank None in its record);
    its card said "rank None by SVD"."""
    from stylelora.share import BLEND_KEY, _blend_lines

    record = {"mode": "svd", "rank": None, "blend_mode": "ties", "max_relative_error": 0.18, "inputs": []}
    lines = _blend_lines({BLEND_KEY: json.dumps(record), "ss_network_dim": "32", "ss_network_alpha": "32"})
    assert "ties; the inputs' total rank by SVD, largest relative error 1.80e-01" in lines[2]


@pytest.mark.parametrize("clip_skip, said", [("2", True), ("1", False), ("None", False)])
def test_a_card_and_sidecar_name_the_clip_skip_a_file_was_trained_at(clip_skip, said):
    from stylelora.share import a1111_sidecar, model_card

    metadata = {"ss_clip_skip": clip_skip, "modelspec.trigger_phrase": "animestyle"}
    card, notes = model_card("anime", metadata, grid=None), a1111_sidecar(metadata)["notes"]
    assert ("- Clip skip: 2 (A1111's *Clip skip* setting, ComfyUI's *CLIP Set Last Layer* at -2" in card) is said
    assert ("Trained at clip skip 2: set Clip skip to 2." in notes) is said
