"""kohya's validation loss (--validation-split): held-out images never train, their loss is measured the same way
each time and logged, and measuring it leaves the training itself unchanged."""
from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest

from stylelora.config import ConfigError, load_config
from stylelora.data.errors import DataError
from stylelora.train import loop
from stylelora.train.loop import run_training
from stylelora.train.validation import split_validation
from train_fixtures import adapter_tensors, reset_accelerate, tiny_overrides


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


def images(**folders: int) -> list:
    """Stand-ins for checked images: `count` in each kohya folder, as split_validation reads them."""
    return [SimpleNamespace(item=SimpleNamespace(folder=folder, key=f"{folder}/{i}.png"))
            for folder, count in folders.items() for i in range(count)]


@pytest.mark.parametrize("folders, fraction, held", [
    ({"10_a": 30}, 0.0, {}), ({"10_a": 30}, 0.1, {"10_a": 3}), ({"10_a": 5}, 0.01, {"10_a": 1}),
    ({"10_a": 2}, 0.9, {"10_a": 1}), ({"10_a": 10}, 0.95, {"10_a": 9}),
    # each folder apart, never its last image: a one-image concept still trains
    ({"10_a": 20, "5_b": 10, "1_c": 1}, 0.1, {"10_a": 2, "5_b": 1}),
    ({"10_a": 4, "5_b": 3}, 0.1, {"10_a": 1}),  # rounding holds out none: one from the largest folder
])
def test_the_split_holds_out_that_fraction_of_each_folder_keeping_one_of_each_to_train(folders, fraction, held):
    kept = images(**folders)
    train, validation = split_validation(kept, fraction, seed=0)
    counts = {folder: sum(image.item.folder == folder for image in validation) for folder in folders}
    assert {folder: count for folder, count in counts.items() if count} == held
    assert len(train) + len(validation) == len(kept) and {image.item.folder for image in train} == set(folders)
    assert split_validation(kept, fraction, seed=0) == (train, validation)  # the same images on every run


def test_the_seed_picks_the_images_and_one_image_a_folder_cannot_be_split():
    kept = images(a=30)
    assert split_validation(kept, 0.1, 0)[1] != split_validation(kept, 0.1, 1)[1]
    with pytest.raises(DataError, match="no folder has 2 \\(each folder keeps one to train\\)"):
        split_validation(images(a=1, b=1), 0.1, 0)


@pytest.mark.parametrize("overrides, message", [
    ({"train.validate_every": 10}, "train.validate_every only apply to the validation loss, and no images are held "
                                   "out for one: give --validation-split 0.1"),
    ({"data.validation_split": 1.0}, "data.validation_split is a fraction from 0 \\(off\\) to below 1"),
    ({"data.validation_split": 0.1, "train.max_validation_steps": 0}, "train.max_validation_steps .* at least 1"),
])
def test_validation_settings_that_cannot_work_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data.dir": str(tmp_path), **overrides})


def _rows(run_dir):
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_held_out_images_never_train_and_their_loss_is_logged_where_asked(tmp_path, tiny_base, stripes_dataset,
                                                                          monkeypatch, capsys):
    trained_keys, measured = set(), []
    real_step, real_measure = loop.loss_step, loop.measure

    def spy_step(batch, *args):
        trained_keys.update(batch["key"])
        return real_step(batch, *args)

    def measure_twice(*args):
        measured.append((real_measure(*args), real_measure(*args)))
        return measured[-1][0]

    monkeypatch.setattr(loop, "loss_step", spy_step)
    monkeypatch.setattr(loop, "measure", measure_twice)
    run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base, **{
        "data.validation_split": 0.25, "train.validate_every": 2, "train.steps": 5})))
    said = capsys.readouterr().err
    held = said.split("validation: 2 of 8 images held out (")[1].split(")")[0].split(", ")
    assert len(held) == 2 and not set(held) & trained_keys and len(trained_keys) == 6
    rows = _rows(tmp_path / "run")
    logged = {int(row["step"]): float(row["val_loss"]) for row in rows if row["val_loss"]}
    assert sorted(logged) == [2, 4, 5]  # every 2 steps, and the last
    assert all(first == second for first, second in measured)  # the same weights give the same loss
    assert [first for first, _ in measured] == [logged[step] for step in (2, 4, 5)]
    assert all(math.isfinite(value) and value > 0 for value in logged.values())
    assert "step 4: validation loss" in said


def test_measuring_the_validation_loss_changes_nothing_in_training(tmp_path, tiny_base, stripes_dataset):
    """Its noise comes from its own generator and the models leave eval mode after it, so a run that measures at every
    step (with LoRA dropout, which draws from torch's generator) trains the very same adapter as one that measures
    only at the end."""
    adapters = []
    for every in (1, 100):
        run_dir = tmp_path / f"every{every}"
        adapters.append(run_training(load_config(None, tiny_overrides(stripes_dataset, run_dir, tiny_base, **{
            "data.validation_split": 0.25, "train.validate_every": every, "network.dropout": 0.1}))))
        reset_accelerate()
    first, second = (adapter_tensors(path) for path in adapters)
    assert first.keys() == second.keys() and all((first[key] == second[key]).all() for key in first)
    assert sum(bool(row["val_loss"]) for row in _rows(tmp_path / "every1")) == 4
