"""Loss kinds (kohya's --loss_type, --huber_schedule, --huber_c) and debiased estimation, against hand-computed
values, and in the training step."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from stylelora.config import load_config
from stylelora.train.losses import debiased_weights, huber_scales, per_sample_loss
from stylelora.train.noise import sample_noise
from stylelora.train.step import loss_step, min_snr_weights
from test_train_step import ZeroUNet, batch, fake_models, scheduler

DIFFERENCES = torch.tensor([[0.0, 0.1, 3.0]])  # one sample, three elements: prediction − target


@pytest.mark.parametrize("loss_type, elements", [
    ("l2", [0.0, 0.01, 9.0]),
    ("l1", [0.0, 0.1, 3.0]),
    # 2c(√(d² + c²) − c) at c = 0.1: squared-like near 0, 2c|d| far from it
    ("huber", [0.0, 0.2 * (math.sqrt(0.02) - 0.1), 0.2 * (math.sqrt(9.01) - 0.1)]),
    ("smooth_l1", [0.0, 2 * (math.sqrt(0.02) - 0.1), 2 * (math.sqrt(9.01) - 0.1)]),
])
def test_each_loss_kind_by_hand(loss_type, elements):
    loss = per_sample_loss(DIFFERENCES, torch.zeros_like(DIFFERENCES), loss_type, torch.tensor([0.1]))
    assert loss.item() == pytest.approx(sum(elements) / 3, rel=1e-5)


def test_an_outlier_pulls_the_huber_loss_linearly_not_quadratically():
    small, large = torch.full((1, 4), 10.0), torch.full((1, 4), 100.0)
    zero, c = torch.zeros(1, 4), torch.tensor([0.1])
    assert per_sample_loss(large, zero, "l2") / per_sample_loss(small, zero, "l2") == pytest.approx(100)
    assert per_sample_loss(large, zero, "huber", c) / per_sample_loss(small, zero, "huber", c) == \
        pytest.approx(10, rel=0.02)


def test_an_alpha_mask_weighs_each_latent_element_by_the_pixels_it_covers():
    """sd-scripts' masked loss: the mask area-averaged to the latent's size, times each element's loss, averaged
    over all elements (so a half-transparent image's loss is about half)."""
    difference = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # one sample, one channel, a 2×2 latent
    mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0],   # 4×4 pixels: the left half opaque,
                          [1.0, 1.0, 0.0, 0.0],   # the bottom-right quarter half transparent
                          [1.0, 1.0, 0.5, 0.5],
                          [1.0, 1.0, 0.5, 0.5]]])
    loss = per_sample_loss(difference, torch.zeros_like(difference), "l2", mask=mask)
    assert loss.item() == pytest.approx((1 * 1 + 4 * 0 + 9 * 1 + 16 * 0.5) / 4)
    assert per_sample_loss(difference, torch.zeros_like(difference), "l2", mask=torch.ones(1, 4, 4)).item() == \
        per_sample_loss(difference, torch.zeros_like(difference), "l2").item()


def test_huber_scales_follow_their_schedule():
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    timesteps = torch.tensor([0, 500, 999])
    assert huber_scales(noise_scheduler, timesteps, "constant", 0.1).tolist() == pytest.approx([0.1] * 3)
    assert huber_scales(noise_scheduler, timesteps, "exponential", 0.1).tolist() == \
        pytest.approx([1.0, 0.1 ** 0.5, 0.1 ** 0.999])
    by_snr = huber_scales(noise_scheduler, timesteps, "snr", 0.1).tolist()
    assert by_snr[0] > 0.9 and by_snr[0] > by_snr[1] > by_snr[2] and by_snr[2] == pytest.approx(0.1, abs=0.01)


def test_debiased_weights_are_one_over_the_root_of_the_snr_capped():
    snr = torch.tensor([4.0, 1e6])
    assert debiased_weights(snr, v_prediction=False).tolist() == pytest.approx([0.5, 1 / math.sqrt(1000)])
    assert debiased_weights(snr, v_prediction=True).tolist() == pytest.approx([1 / math.sqrt(5), 1 / math.sqrt(1001)])


def test_the_step_uses_the_loss_kind_and_the_debiased_weights():
    cfg = load_config(None, {"data.dir": "d", "train.text_noise": 0.0, "train.loss_type": "huber",
                             "train.huber_schedule": "exponential", "train.debiased_estimation_loss": True})
    loss = loss_step(batch(), fake_models(ZeroUNet()), scheduler(), cfg, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    noise = sample_noise(batch()["latents"], 0.0, generator)
    timesteps = torch.randint(0, 1000, (6,), generator=generator)
    c = (0.1 ** (timesteps / 1000)).view(-1, 1, 1, 1)
    per_sample = (2 * c * ((noise.pow(2) + c.pow(2)).sqrt() - c)).mean(dim=(1, 2, 3))  # the prediction is 0
    ratio = scheduler().alphas_cumprod[timesteps] / (1 - scheduler().alphas_cumprod[timesteps])
    weights = min_snr_weights(scheduler(), timesteps, 5.0) / ratio.clamp(max=1000).sqrt()
    torch.testing.assert_close(loss, (per_sample * weights).mean())
