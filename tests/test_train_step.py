"""The loss step: targets for epsilon and v-prediction, min-SNR weights, noise offset, multi-resolution noise, input
perturbation, determinism, gradients."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from stylelora.config import load_config
from stylelora.train.models import TrainModels
from stylelora.train.preservation import preserved_samples
from stylelora.train.noise import multires_noise, sample_noise
from stylelora.train.step import (
    loss_step,
    min_snr_weights,
    prediction_target,
    snr,
    weighted_loss,
    with_text_noise,
)


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def config(**overrides):
    """A config as the loop gets it after the family preset, noise off unless a test asks: the step's exact math."""
    return load_config(None, {"data.dir": "d", "train.text_noise": 0.0, **overrides})


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


def coarse_share(noise: torch.Tensor) -> float:
    """The share of the noise's variance in its 2x2-pixel block means (0.25 for white noise)."""
    return float(torch.nn.functional.avg_pool2d(noise, 2).var() / noise.var())


def test_multires_noise_adds_coarse_layers_at_unit_deviation():
    plain = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    layered = multires_noise(plain, 6, 0.5, torch.Generator().manual_seed(1))
    assert abs(layered.std().item() - 1) < 1e-5 and layered.shape == plain.shape
    assert coarse_share(plain) == pytest.approx(0.25, abs=0.01) and coarse_share(layered) > 0.28
    stronger = multires_noise(plain, 6, 0.8, torch.Generator().manual_seed(1))
    assert coarse_share(stronger) > coarse_share(layered) + 0.1  # the discount weighs the coarse layers
    again = multires_noise(plain, 6, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(layered, again)  # drawn from the generator alone: a resumed run draws the same
    # On a 2x2 latent the layers stop at one value a channel instead of drawing zero-size noise.
    assert multires_noise(torch.randn(1, 4, 2, 2), 10, 0.3, torch.Generator().manual_seed(0)).shape == (1, 4, 2, 2)


def test_multires_noise_is_the_noise_and_the_target_of_the_step():
    cfg, unet = config(**{"train.multires_noise_iterations": 4}), ZeroUNet()
    loss = loss_step(batch(), fake_models(unet), scheduler(), cfg, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    noise = multires_noise(sample_noise(batch()["latents"], 0.0, generator), 4, 0.3, generator)
    timesteps = torch.randint(0, 1000, (6,), generator=generator)
    weights = min_snr_weights(scheduler(), timesteps, cfg.train.min_snr_gamma)
    torch.testing.assert_close(loss, (noise.pow(2).mean(dim=(1, 2, 3)) * weights).mean())
    torch.testing.assert_close(unet.calls[0][0], scheduler().add_noise(batch()["latents"], noise, timesteps))


def test_input_perturbation_noises_the_input_more_than_the_target_asks():
    cfg, unet = config(**{"train.ip_noise_gamma": 0.1}), ZeroUNet()
    loss = loss_step(batch(), fake_models(unet), scheduler(), cfg, torch.Generator().manual_seed(3))
    expected, noise, timesteps = expected_loss(batch(), scheduler(), cfg, seed=3)
    torch.testing.assert_close(loss, expected)  # the target is the noise drawn, without the perturbation
    generator = torch.Generator().manual_seed(3)
    sample_noise(batch()["latents"], 0.0, generator)  # the noise and the timesteps, drawn before the perturbation
    torch.randint(0, 1000, (6,), generator=generator)
    fresh = torch.randn(noise.shape, generator=generator)
    noised = unet.calls[0][0]
    torch.testing.assert_close(noised, scheduler().add_noise(batch()["latents"], noise + 0.1 * fresh, timesteps))
    assert not torch.allclose(noised, scheduler().add_noise(batch()["latents"], noise, timesteps))


def test_random_strengths_draw_each_batchs_offset_and_perturbation_up_to_the_value():
    cfg = config(**{"train.noise_offset": 0.1, "train.noise_offset_random_strength": True,
                    "train.ip_noise_gamma": 0.1, "train.ip_noise_gamma_random_strength": True})
    unet = ZeroUNet()
    loss_step(batch(), fake_models(unet), scheduler(), cfg, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    offset = 0.1 * torch.rand((), generator=generator).item()
    noise = sample_noise(batch()["latents"], offset, generator)
    timesteps = torch.randint(0, 1000, (6,), generator=generator)
    gamma = 0.1 * torch.rand((), generator=generator).item()
    fresh = torch.randn(noise.shape, generator=generator)
    assert 0 < offset < 0.1 and 0 < gamma < 0.1
    torch.testing.assert_close(unet.calls[0][0], scheduler().add_noise(batch()["latents"], noise + gamma * fresh,
                                                                       timesteps))


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


# ----------------------------------------------------------------------------- base preservation


class AdapterUNet(torch.nn.Module):
    """noisy × (base + lora), or × base alone while its adapters are disabled (the peft-integration methods)."""

    peft_config = {"default": None}

    def __init__(self, base: float, lora: float):
        super().__init__()
        self.base, self.lora = base, torch.nn.Parameter(torch.tensor(lora))
        self.disabled = False
        self.calls = []

    def disable_adapters(self):
        self.disabled = True

    def enable_adapters(self):
        self.disabled = False

    def forward(self, noisy, timesteps, hidden):
        self.calls.append({"batch": len(noisy), "disabled": self.disabled, "grad": torch.is_grad_enabled()})
        return SimpleNamespace(sample=noisy * (self.base + (0.0 if self.disabled else self.lora)))


class FakeTextEncoder(torch.nn.Module):
    """Records the token ids it encodes; hidden states of zeros."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, ids):
        self.seen.append(ids)
        return (torch.zeros(len(ids), 77, 8),)


def preserving_models(unet: AdapterUNet, triggers=("sks",)) -> tuple[TrainModels, list]:
    models = fake_models(unet)
    models.triggers = triggers
    seen: list = []
    def encode_captions(captions, text_encoder=None):  # the base pass names the unwrapped text encoder
        seen.append(list(captions) if text_encoder is None else ("base", list(captions)))
        return torch.zeros(len(captions), 77, 8)

    models.encode_captions = encode_captions
    models.text_encoder = FakeTextEncoder()
    return models, seen


CAPTIONS = ["sks, a red circle", "a blue star", "sks, a sks on gray", "sks", "plain"]


@pytest.mark.parametrize("weight, triggers, expected", [
    (1.0, ("sks",), [(0, "a red circle"), (2, "a on gray")]),  # half (rounded up) of the 3 with the trigger
    (0.0, ("sks",), []),  # off
    (1.0, (), []),  # no trigger words: nothing to tie the adapter to
    (1.0, ("zorb",), []),  # no caption holds the trigger
])
def test_preserved_samples_are_half_of_the_triggered_ones_without_the_trigger(weight, triggers, expected):
    assert preserved_samples(CAPTIONS, triggers, weight) == expected


def test_preservation_adds_the_gap_to_the_frozen_base_on_trigger_free_captions():
    data = {"latents": torch.randn(5, 4, 8, 8), "caption": CAPTIONS}
    cfg = config(**{"train.preserve_base": 0.5})
    unet = AdapterUNet(base=0.2, lora=0.3)
    models, seen = preserving_models(unet)
    loss = loss_step(data, models, scheduler(), cfg, torch.Generator().manual_seed(4))

    generator = torch.Generator().manual_seed(4)
    noise = sample_noise(data["latents"], 0.0, generator)
    timesteps = torch.randint(0, 1000, (5,), generator=generator)
    noisy = scheduler().add_noise(data["latents"], noise, timesteps)
    weights = min_snr_weights(scheduler(), timesteps, cfg.train.min_snr_gamma)
    main = weighted_loss(noisy * 0.5, noise, weights)
    index = torch.tensor([0, 2])
    gap = weighted_loss(noisy[index] * 0.5, noisy[index] * 0.2, weights[index])
    torch.testing.assert_close(loss, main + 0.5 * gap)
    # One UNet pass with gradients over the batch + its 2 trigger-free copies, one frozen-base pass without.
    assert unet.calls == [{"batch": 2, "disabled": True, "grad": False}, {"batch": 7, "disabled": False, "grad": True}] \
        or unet.calls == [{"batch": 7, "disabled": False, "grad": True}, {"batch": 2, "disabled": True, "grad": False}]
    assert CAPTIONS + ["a red circle", "a on gray"] in seen and ("base", ["a red circle", "a on gray"]) in seen
    assert not unet.disabled  # the adapter is back on after the base pass
    loss.backward()
    assert unet.lora.grad != 0


def captions_seen_with_decoys(**overrides) -> list:
    """What the text encoder was asked to encode in one step whose decoy pool and company words are just "meadow"."""
    data = {"latents": torch.randn(5, 4, 8, 8), "caption": CAPTIONS}
    models, seen = preserving_models(AdapterUNet(base=0.2, lora=0.3))
    models.decoys = models.company = ("meadow",)
    loss_step(data, models, scheduler(), config(**overrides), torch.Generator().manual_seed(4))
    return seen


def test_decoy_captions_go_to_the_adapted_and_the_base_pass_alike():
    seen = captions_seen_with_decoys(**{"train.preserve_decoys": 1.0, "train.decoy_company": 0.0})
    copies = ["meadow, a red circle", "meadow, a meadow on gray"]
    assert CAPTIONS + copies in seen and ("base", copies) in seen


def test_company_changes_what_the_adapted_pass_reads_but_copies_come_from_the_captions_as_written():
    seen = captions_seen_with_decoys(**{"train.preserve_decoys": 0.0, "train.decoy_company": 1.0})
    adapted = next(captions for captions in seen if isinstance(captions, list))
    assert all("meadow" in adapted[i].split(", ") and "sks" in adapted[i] for i in (0, 2, 3))
    assert (adapted[1], adapted[4]) == ("a blue star", "plain")  # no trigger: as written
    assert adapted[5:] == ["a red circle", "a on gray"] and ("base", ["a red circle", "a on gray"]) in seen


def test_made_up_company_words_stay_in_the_copies_and_reach_the_base_pass():
    # A coined word beside the trigger is trained toward the data; the trigger-free copy starts with it and is
    # trained toward the base, so the word alone (another adapter's coined trigger) does not turn the adapter on.
    data = {"latents": torch.randn(5, 4, 8, 8), "caption": CAPTIONS}
    models, seen = preserving_models(AdapterUNet(base=0.2, lora=0.3))
    models.decoys, models.company = ("meadow",), ("kitaru",)  # company words outside the decoys are the coined ones
    settings = {"train.preserve_decoys": 0.0, "train.decoy_company": 1.0}
    loss_step(data, models, scheduler(), config(**settings, **{"train.made_up_company": True}),
              torch.Generator().manual_seed(4))
    copies = ["kitaru, a red circle", "kitaru, a on gray"]
    assert ("base", copies) in seen
    adapted = next(captions for captions in seen if isinstance(captions, list))
    assert adapted[5:] == copies and all("kitaru" in adapted[i].split(", ") and "sks" in adapted[i] for i in (0, 2))
    models, seen = preserving_models(AdapterUNet(base=0.2, lora=0.3))
    models.decoys, models.company = ("meadow",), ("kitaru",)
    loss_step(data, models, scheduler(), config(**settings), torch.Generator().manual_seed(4))
    assert ("base", ["a red circle", "a on gray"]) in seen  # off (the default): the copies as written


def test_an_adapter_equal_to_the_base_pays_no_preservation_loss():
    data = {"latents": torch.randn(5, 4, 8, 8), "caption": CAPTIONS}
    losses = []
    for weight in (0.0, 1.0):
        models, _ = preserving_models(AdapterUNet(base=0.2, lora=0.0))
        losses.append(loss_step(data, models, scheduler(), config(**{"train.preserve_base": weight}),
                                torch.Generator().manual_seed(4)))
    torch.testing.assert_close(losses[0], losses[1])


def test_adapters_disabled_runs_a_peft_unet_as_its_base_and_restores_the_adapter():
    from gen_fixtures import tiny_pipeline

    from stylelora.lora.inject import adapters_disabled, add_lora

    pipe = tiny_pipeline()
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32))
    base = pipe.unet(*inputs).sample
    add_lora(pipe.unet, pipe.text_encoder, rank=4, alpha=4, init_lora_weights=False)
    adapted = pipe.unet(*inputs).sample
    assert not torch.allclose(adapted, base)
    with adapters_disabled(pipe.unet, pipe.text_encoder, None):
        torch.testing.assert_close(pipe.unet(*inputs).sample, base)
    torch.testing.assert_close(pipe.unet(*inputs).sample, adapted)


def test_text_noise_reaches_only_the_samples_trained_toward_the_data():
    """The preservation copies after them keep the exact text their base target came from."""
    text = torch.zeros(5, 77, 64)
    noisy = with_text_noise(text, 3, 0.2, torch.Generator().manual_seed(1))
    assert noisy[:3].std().item() == pytest.approx(0.2, rel=0.05) and torch.equal(noisy[3:], text[3:])
    assert torch.equal(noisy, with_text_noise(text, 3, 0.2, torch.Generator().manual_seed(1)))  # exact resume
    assert with_text_noise(text, 3, 0.0, torch.Generator()) is text


def test_text_noise_on_sdxl_moves_the_hidden_states_not_the_pooled_embedding():
    from stylelora.train.models import SdxlText

    text = SdxlText(hidden=torch.zeros(2, 77, 32), pooled=torch.ones(2, 16))
    noisy = with_text_noise(text, 2, 0.2, torch.Generator().manual_seed(0))
    assert isinstance(noisy, SdxlText) and noisy.hidden.abs().sum() > 0 and torch.equal(noisy.pooled, text.pooled)
