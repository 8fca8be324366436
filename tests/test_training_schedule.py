"""The training schedule: --zero-terminal-snr (kohya's --zero_terminal_snr) makes its last timestep pure noise,
min-SNR weighs that step by its limit instead of dividing by zero, and debiased estimation, which cannot, is refused
for it; --min-timestep / --max-timestep bound the timesteps drawn."""
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


def test_timesteps_are_drawn_between_the_bounds(tmp_path, tiny_base, stripes_dataset, monkeypatch):
    """kohya's --min_timestep / --max_timestep: the step draws from min up to below max."""
    from stylelora.train.loop import run_training

    seen = []
    real_add_noise = DDPMScheduler.add_noise

    def recording(self, latents, noise, timesteps):
        seen.extend(timesteps.tolist())
        return real_add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    try:
        adapter = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "t", tiny_base, **{
            "train.steps": 6, "train.min_timestep": 500, "train.max_timestep": 600})))
    finally:
        reset_accelerate()
    assert len(seen) >= 24 and all(500 <= t < 600 for t in seen)
    assert (adapter_metadata(adapter)["ss_min_timestep"], adapter_metadata(adapter)["ss_max_timestep"]) == ("500",
                                                                                                          "600")


@pytest.mark.parametrize("values, message", [
    ({"train.min_timestep": 600, "train.max_timestep": 600}, r"train.max_timestep must be above train.min_timestep"),
    ({"train.max_timestep": 1001}, r"must lie within the base's 1000 training timesteps"),
])
def test_bounds_outside_the_schedule_are_refused(tmp_path, tiny_base, stripes_dataset, values, message):
    from stylelora.train.dry_run import dry_run

    with pytest.raises(ConfigError, match=message):
        dry_run(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "dry", tiny_base, **values)))
