"""Checkpoints and sample grids every N epochs (kohya's --save_every_n_epochs / --sample_every_n_epochs): every N ×
the steps an epoch takes, said in the settings, and a run that checkpoints at each epoch's end."""
from __future__ import annotations

import pytest

from stylelora.config import ConfigError, load_config, with_epoch_steps
from train_fixtures import reset_accelerate, tiny_overrides


@pytest.mark.parametrize("values, batches, expected", [
    ({"train.save_every_n_epochs": 2}, 188, {"save_every": 376, "sample_every": 250}),
    ({"train.save_every_n_epochs": 2, "optim.grad_accum": 3}, 188, {"save_every": 126, "sample_every": 250}),
    ({"train.sample_every_n_epochs": 1}, 10, {"save_every": 250, "sample_every": 10}),
])
def test_epochs_become_steps(values, batches, expected):
    config = with_epoch_steps(load_config(None, {"data.dir": "d", **values}), batches)
    assert {key: getattr(config.train, key) for key in expected} == expected


def test_the_settings_say_where_the_steps_come_from_and_what_they_replace():
    config = with_epoch_steps(load_config(None, {"data.dir": "d", "train.save_every": 100,
                                                 "train.save_every_n_epochs": 1}), 40)
    assert config.train.save_every == 40
    assert config.source_of("train.save_every").startswith("train.save_every_n_epochs = 1 × 40 steps an epoch; the "
                                                           "100 given")


def test_zero_epochs_is_refused():
    with pytest.raises(ConfigError, match=r"train.save_every_n_epochs must be at least 1 \(one epoch\)"):
        load_config(None, {"data.dir": "d", "train.save_every_n_epochs": 0})


def test_a_run_checkpoints_at_each_epochs_end(tmp_path, tiny_base, stripes_dataset):
    from stylelora.train.checkpoint import complete_checkpoints
    from stylelora.train.loop import run_training

    try:  # 8 images × 2 repeats in batches of 4: 4 steps an epoch
        run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "e", tiny_base, **{
            "train.steps": 8, "train.save_every_n_epochs": 1})))
    finally:
        reset_accelerate()
    assert [path.name for path in complete_checkpoints(tmp_path / "e")] == ["step-000004", "step-000008"]
