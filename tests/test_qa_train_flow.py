"""`stylelora train` QA findings: resuming with the data folder spelled otherwise or moved, resume refusals before
the base loads (and in --dry-run, which leaves the run's config.toml alone), kohya flag names, every ignored file in
skipped.txt, images upscaled a lot."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stylelora.config import ConfigError, config_to_dict, load_config
from stylelora.train import loop
from stylelora.train.checkpoint import ResumeError, check_resumable, image_changes
from stylelora.train.dry_run import RESUME_PLAN_FILE, dry_run
from train_fixtures import render, reset_accelerate, tiny_overrides, write_kohya_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


@pytest.fixture
def finished_run(tmp_path, tiny_base):
    """A one-step run with a checkpoint at step 1, over its own data folder: (data folder, run folder)."""
    data = write_kohya_dataset(tmp_path / "data", count=4)
    loop.run_training(load_config(None, run_settings(data, tmp_path / "run", tiny_base, steps=1)))
    reset_accelerate()
    return data, tmp_path / "run"


def run_settings(data, output: Path, base: Path, steps: int = 1, **extra) -> dict:
    return tiny_overrides(data, output, base, **{"train.steps": steps, "train.save_every": 1, "train.samples": False,
                                                 **extra})


def never_load(*args, **kwargs):
    raise AssertionError("the base was loaded before the resume was refused")


# ----------------------------------------------------------------------------- 1. the data folder, spelled or moved


def test_a_resume_takes_the_data_folder_however_it_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = config_to_dict(load_config(None, {"data.dir": "data"}))
    for spelling in ("./data/", str(tmp_path / "data"), f"{tmp_path}/data/../data"):
        check_resumable(saved, config_to_dict(load_config(None, {"data.dir": spelling})), tmp_path / "ck" / "step-1")
    with pytest.raises(ConfigError, match=r"data.dir: 'data' → 'other'.*checkpoint was saved before"):
        check_resumable(saved, config_to_dict(load_config(None, {"data.dir": "other"})), tmp_path / "ck" / "step-1")


def test_a_moved_data_folder_resumes_only_with_the_same_images(tmp_path):
    saved = config_to_dict(load_config(None, {"data.dir": "/disk1/data"}))
    moved = config_to_dict(load_config(None, {"data.dir": "/disk2/data"}))
    path = tmp_path / "ck" / "step-1"
    check_resumable(saved, moved, path, image_changes="")  # the same images: the folder may be anywhere
    before = {"train": {"2_x/a.png": "1", "2_x/b.png": "2"}, "reg": {}}
    after = {"train": {"2_x/a.png": "1", "2_x/b.png": "9", "2_x/c.png": "3"}, "reg": {}}
    changes = image_changes(before, after)
    assert changes == "1 training image added (2_x/c.png); 1 training image changed (2_x/b.png)"
    assert image_changes(before, before) == "" and image_changes(None, after) is None
    with pytest.raises(ConfigError, match=r"data.dir: '/disk1/data' → '/disk2/data'.*these differ: 1 training image "
                                          r"added \(2_x/c.png\)"):
        check_resumable(saved, moved, path, image_changes=changes)


def test_a_run_resumes_from_its_data_folder_moved_elsewhere(finished_run, tiny_base, tmp_path, capsys):
    data, run = finished_run
    moved = tmp_path / "elsewhere" / "data"
    shutil.move(data, moved)
    relative = os.path.relpath(moved) + os.sep  # another spelling too
    adapter = loop.run_training(load_config(None, run_settings(relative, run, tiny_base, steps=2,
                                                               **{"train.resume": "latest"})))
    assert adapter.is_file() and "resuming at step 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2./3. refusals before loading, dry run


def add_image(data: Path) -> None:
    folder = data / "2_stripestyle"
    render((200, 30, 30), striped=True, seed=99).save(folder / "extra.png")
    (folder / "extra.txt").write_text("stripestyle, a red circle\n", encoding="utf-8")


def test_a_resume_with_an_image_added_is_refused_before_the_base_loads_naming_it(finished_run, tiny_base, monkeypatch):
    data, run = finished_run
    add_image(data)
    before = {name: (run / name).read_bytes() for name in ("config.toml", "skipped.txt")}
    monkeypatch.setattr(loop, "_load_base", never_load)
    settings = load_config(None, run_settings(data, run, tiny_base, steps=2, **{"train.resume": "latest"}))
    expected = r"dataset_size: 8 → 10.*Since the checkpoint: 1 training image added \(2_stripestyle/extra.png\)"
    with pytest.raises(ResumeError, match=expected):
        loop.run_training(settings)
    with pytest.raises(ResumeError, match=expected):
        dry_run(settings)  # the dry run refuses what the run refuses
    assert {name: (run / name).read_bytes() for name in before} == before  # reports of the checkpoint's run


def test_a_resume_with_other_settings_is_refused_before_the_base_loads(finished_run, tiny_base, monkeypatch):
    data, run = finished_run
    monkeypatch.setattr(loop, "_load_base", never_load)
    settings = load_config(None, run_settings(data, run, tiny_base, **{"network.rank": 8, "train.resume": "latest"}))
    with pytest.raises(ConfigError, match=r"network.rank: 4 → 8"):
        loop.run_training(settings)
    with pytest.raises(ConfigError, match=r"network.rank: 4 → 8"):
        dry_run(settings)


def test_a_dry_run_of_a_resume_leaves_the_runs_config_and_skip_report_alone(finished_run, tiny_base):
    data, run = finished_run
    (data / "2_stripestyle" / "broken.png").write_bytes(b"")  # a skip report of its own, were it written
    before = {name: (run / name).read_bytes() for name in ("config.toml", "skipped.txt")}
    plan = dry_run(load_config(None, run_settings(data, run, tiny_base, steps=3, **{"train.resume": "latest"})))
    assert plan == run / RESUME_PLAN_FILE and "steps = 3" in plan.read_text()
    assert {name: (run / name).read_bytes() for name in before} == before


# ----------------------------------------------------------------------------- 4. kohya flag names


def test_kohya_flag_names_are_answered_with_ours(capsys):
    from stylelora.cli import main

    with pytest.raises(SystemExit):
        main(["train", "data", "--shuffle_caption", "--network_dim", "16", "--max-steps=5", "--caption-extension",
              ".txt", "--output_dir", "out", "--unet_lr", "1e-4", "--no-such-flag"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --shuffle_caption --network_dim 16" in err
    for kohya, ours in (("--shuffle_caption", "--shuffle-tags"), ("--network_dim", "--rank"),
                        ("--max-steps", "--steps"), ("--output_dir", "--output"), ("--unet_lr", "--unet-lr")):
        assert f"  {kohya}: {ours}" in err
    assert "--caption-extension: no option: an image's caption is the file of its name ending in .txt or .caption" in err
    assert "  --no-such-flag" not in err


def test_the_train_module_entry_point_names_them_too(capsys):
    from stylelora.train.command import main

    with pytest.raises(SystemExit):
        main(["train", "data", "--train_batch_size", "2"])
    assert "  --train_batch_size: --batch-size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, refused", [
    (["train", "data", "--lr", "1e-4"], "  --lr: --unet-lr"),  # was read as --lr-scheduler 1e-4
    (["generate", "a cat", "--ste", "3"], "unrecognized arguments: --ste 3"),  # was read as --steps 3
])
def test_a_flag_is_never_taken_for_a_longer_one_it_begins(capsys, argv, refused):
    from stylelora.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert refused in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5./6. ignored files, tiny images


def test_every_ignored_file_is_in_the_skip_report_and_the_console_says_where(tmp_path, tiny_base, capsys):
    data = write_kohya_dataset(tmp_path / "data", count=2)
    for i in range(7):
        (data / "2_stripestyle" / f"notes{i}.md").write_text("notes", encoding="utf-8")
    dry_run(load_config(None, tiny_overrides(data, tmp_path / "run", tiny_base)))
    report = (tmp_path / "run" / "skipped.txt").read_text(encoding="utf-8")
    for i in range(7):
        assert f"notes{i}.md\tnot an image or caption file" in report
    assert f"every ignored file is listed with its reason in {tmp_path / 'run' / 'skipped.txt'}" in capsys.readouterr().err


def test_images_upscaled_more_than_4x_are_named_with_their_sizes(tmp_path, tiny_base, capsys):
    data = write_kohya_dataset(tmp_path / "data", count=2, size=32)  # 128 / 32: 4×, no warning
    for i in range(7):
        render((30, 30, 200), striped=True, size=20, seed=i).save(data / "2_stripestyle" / f"thumb{i}.png")
    dry_run(load_config(None, tiny_overrides(data, tmp_path / "run", tiny_base, **{"data.resolution": 128})))
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if "upscaled more than 4×" in line)
    assert warning.startswith("warning: 7 images are upscaled more than 4× to fill 128 px buckets")
    assert "2_stripestyle/thumb0.png 20×20 → 128×128 (6.4×)" in warning and "+2 more" in warning
    assert "0000.png" not in warning
    report = (tmp_path / "run" / "skipped.txt").read_text(encoding="utf-8")
    assert sum("20×20 → 128×128 (6.4×)" in line for line in report.splitlines()) == 7
