"""Learning-rate schedules by name, as kohya's --lr_scheduler takes them: the factor of the base rate at each step."""
from __future__ import annotations

import math

import pytest
import torch

from stylelora.config import load_config
from stylelora.train.optim import build_lr_scheduler

STEPS = 20


def factors(**optim) -> list[float]:
    """The rate at each of STEPS steps as a share of the base rate (no warmup)."""
    config = load_config(None, {"data.dir": "d", "train.steps": STEPS, "optim.warmup_steps": 0,
                                **{f"optim.{key}": value for key, value in optim.items()}})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule, seen = build_lr_scheduler(config, optimizer), []
    for _ in range(STEPS):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


@pytest.mark.parametrize("optim, expected", [
    ({"lr_scheduler": "cosine"}, lambda step: 0.5 * (1 + math.cos(math.pi * step / STEPS))),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 4},  # back to the top every 5 steps
     lambda step: 0.5 * (1 + math.cos(math.pi * (4 * step / STEPS % 1)))),
    ({"lr_scheduler": "polynomial", "lr_scheduler_power": 2.0}, lambda step: (1 - step / STEPS) ** 2),
    ({"lr_scheduler": "polynomial"}, lambda step: 1 - step / STEPS),  # power 1: linear, as kohya's default
])
def test_each_schedule_gives_its_curve(optim, expected):
    assert factors(**optim) == pytest.approx([expected(step) for step in range(STEPS)], abs=1e-6)


def test_the_file_says_how_its_schedule_restarted(tmp_path, tiny_base, stripes_dataset):
    from stylelora.train.loop import run_training
    from train_fixtures import adapter_metadata, reset_accelerate, tiny_overrides

    try:
        adapter = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "r", tiny_base, **{
            "train.steps": 1, "optim.lr_scheduler": "cosine_with_restarts", "optim.lr_scheduler_num_cycles": 3})))
    finally:
        reset_accelerate()
    metadata = adapter_metadata(adapter)
    assert (metadata["ss_lr_scheduler"], metadata["ss_lr_scheduler_num_cycles"]) == ("cosine_with_restarts", "3")
    assert "ss_lr_scheduler_power" not in metadata
