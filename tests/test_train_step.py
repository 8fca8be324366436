"""The loss step: targets for epsilon and v-prediction, min-SNR weights, noise offset, determinism, gradients."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from stylelora.config import load_config
from stylelora.train.models import TrainModels
from stylelora.train.step import loss_step, min_snr_weights, prediction_target, sample_noise, snr


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def config(**overrides):
    return load_config(None, {"data.dir": "d", **overrides})


class ZeroUNet(torch.nn.Module):
    """Predicts zeros, so the loss is exactly the weighted mean square of the target."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, noisy, timesteps, hidden):
        self.calls.append((noisy, timesteps, hidden))
        return SimpleNamespace(sample=noisy * self.scale)


def fake_models(unet) -> TrainModels:
    models = TrainModels(unet=unet, text_encoder=None, tokenizer=None, vae=None, device=torch.device("cpu"),
                         dtype=torch.float32)
    models.encode_captions = lambda captions: torch.zeros(len(captions), 77, 8)  # type: ignore[method-assign]
    return models


def batch(size: int = 6) -> dict:
    torch.manual_seed(1)
    return {"latents": torch.randn(size, 4, 8, 8), "caption": ["a"] * size}


def expected_loss(batch_, noise_scheduler, cfg, seed):
    """The loss recomputed by hand from the same random draws, in the same order as loss_step makes them."""
    generator = torch.Generator().manual_seed(seed)
    latents = batch_["latents"]
    noise = sample_noise(latents, cfg.train.noise_offset, generator)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    weights = min_snr_weights(noise_scheduler, timesteps, cfg.train.min_snr_gamma)
    return (target.pow(2).mean(dim=(1, 2, 3)) * weights).mean(), noise, timesteps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_loss_is_weighted_mse_to_the_right_target(prediction, gamma):
    noise_scheduler, cfg, unet = scheduler(prediction), config(**{"train.min_snr_gamma": gamma}), ZeroUNet()
    loss = loss_step(batch(), fake_models(unet), noise_scheduler, cfg, torch.Generator().manual_seed(3))
    expected, noise, timesteps = expected_loss(batch(), noise_scheduler, cfg, seed=3)
    torch.testing.assert_close(loss, expected)
    noisy, seen_timesteps, _ = unet.calls[0]
    assert torch.equal(seen_timesteps, timesteps)
    torch.testing.assert_close(noisy, noise_scheduler.add_noise(batch()["latents"], noise, timesteps))


def test_epsilon_target_is_the_noise_and_v_target_is_the_velocity():
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([10, 500, 990])
    assert torch.equal(prediction_target(scheduler("epsilon"), latents, noise, timesteps), noise)
    v_scheduler = scheduler("v_prediction")
    alpha_bar = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target(v_scheduler, latents, noise, timesteps), velocity)


def test_unsupported_prediction_type_is_refused_clearly():
    with pytest.raises(ValueError, match="predicts 'sample'.*epsilon or v_prediction"):
        prediction_target(scheduler("sample"), torch.zeros(1), torch.zeros(1), torch.tensor([1]))


def test_min_snr_weights():
    noise_scheduler = scheduler()
    timesteps = torch.tensor([0, 100, 400, 999])
    ratio = snr(noise_scheduler, timesteps)
    assert ratio[0] > 5 > ratio[-1]  # early steps are nearly clean, late ones nearly pure noise
    eps = min_snr_weights(noise_scheduler, timesteps, 5.0)
    torch.testing.assert_close(eps, torch.minimum(ratio, torch.tensor(5.0)) / ratio)
    assert eps[-1] == 1.0 and eps[0] < 0.01  # capped where SNR > γ, untouched below
    v = min_snr_weights(scheduler("v_prediction"), timesteps, 5.0)
    torch.testing.assert_close(v, torch.minimum(ratio, torch.tensor(5.0)) / (ratio + 1))
    assert torch.equal(min_snr_weights(noise_scheduler, timesteps, 0.0), torch.ones(4))


def test_noise_offset_shifts_each_channel_by_a_constant():
    latents = torch.zeros(2, 4, 8, 8)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, 0.1, torch.Generator().manual_seed(0))
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert 0 < shift.abs().max() < 1.0


def test_same_generator_state_same_loss_and_gradients_reach_trainable_weights():
    cfg, unet = config(), ZeroUNet()
    unet.scale.data.fill_(0.5)
    first = loss_step(batch(), fake_models(unet), scheduler(), cfg, torch.Generator().manual_seed(9))
    second = loss_step(batch(), fake_models(unet), scheduler(), cfg, torch.Generator().manual_seed(9))
    assert torch.equal(first, second)
    first.backward()
    assert unet.scale.grad is not None and unet.scale.grad != 0


def test_pixels_are_encoded_when_latents_are_not_cached():
    class Vae(torch.nn.Module):
        config = SimpleNamespace(scaling_factor=0.5, shift_factor=None)

        def encode(self, pixels):
            mean = pixels[:, :1].repeat(1, 4, 1, 1)
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mean))

        @property
        def dtype(self):
            return torch.float32

    models = fake_models(ZeroUNet())
    models.vae = Vae()
    pixels = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(models.batch_latents({"pixels": pixels}), pixels[:, :1].repeat(1, 4, 1, 1) * 0.5)
