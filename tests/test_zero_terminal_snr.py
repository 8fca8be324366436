"""--zero-terminal-snr (kohya's --zero_terminal_snr): the training schedule's last timestep is pure noise, min-SNR
weighs it by its limit instead of dividing by zero, and debiased estimation, which cannot, is refused for it."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from stylelora.config import ConfigError, load_config
from stylelora.train.noise import zero_terminal_snr
from stylelora.train.step import min_snr_weights, snr
from train_fixtures import adapter_metadata, reset_accelerate, tiny_overrides

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
EVERY_STEP = torch.arange(1000)


@pytest.mark.parametrize("prediction, last_weight", [("epsilon", 1.0), ("v_prediction", 0.0)])
def test_min_snr_weighs_the_pure_noise_step_by_its_limit(prediction, last_weight):
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction, **zero_terminal_snr(True))
    assert snr(scheduler, EVERY_STEP)[-1] == 0  # the last step is pure noise
    weights = min_snr_weights(scheduler, EVERY_STEP, 5.0)
    assert torch.isfinite(weights).all() and weights[-1] == last_weight


def test_min_snr_weights_on_the_usual_schedule_are_unchanged():
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    ratio = snr(scheduler, EVERY_STEP)
    assert torch.equal(min_snr_weights(scheduler, EVERY_STEP, 5.0), ratio.clamp(max=5.0) / ratio)  # the formula


def test_a_run_trains_on_the_rescaled_schedule_and_says_so(tmp_path, tiny_base, stripes_dataset):
    from stylelora.train.loop import run_training

    try:
        adapter = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "zt", tiny_base, **{
            "train.steps": 2, "train.zero_terminal_snr": True})))
    finally:
        reset_accelerate()
    assert adapter_metadata(adapter)["ss_zero_terminal_snr"] == "True"
    losses = (tmp_path / "zt" / "metrics.csv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(line.split(",")[1])) for line in losses)


def test_debiased_estimation_on_an_epsilon_base_is_refused_before_it_loads(tmp_path, tiny_base, stripes_dataset):
    from stylelora.train.dry_run import dry_run

    config = load_config(None, tiny_overrides(stripes_dataset, tmp_path / "dry", tiny_base, **{
        "train.zero_terminal_snr": True, "train.debiased_estimation_loss": True}))
    with pytest.raises(ConfigError, match=r"weighs each sample 1/sqrt\(SNR\), and with --zero-terminal-snr the last "
                                          r"timestep's SNR is 0 on this epsilon-prediction base"):
        dry_run(config)
