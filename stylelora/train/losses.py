"""Owns how far a prediction is from its target, per sample: the loss kinds kohya's --loss_type offers (squared,
absolute, and the pseudo-Huber pair with its timestep schedule) and debiased estimation's per-timestep weight.

Why a choice: the squared error lets a few badly captioned or corrupted images pull hard on the adapter; the
pseudo-Huber loss grows only linearly past its scale c, so such outliers weigh less (Khrapov et al., "Improving
Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss", arXiv 2403.16728). Its schedule
keeps the squared error's behaviour on the nearly clean timesteps, where details are learned, and uses the small
c on the noisy ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stylelora.config import HUBER_LOSSES, LOSS_TYPES, ConfigError

if TYPE_CHECKING:
    from stylelora.config import TrainConfig

SNR_CLAMP = 1000.0  # debiased estimation: nearly clean timesteps would otherwise weigh next to nothing


def huber_scales(noise_scheduler, timesteps: torch.Tensor, schedule: str, c: float) -> torch.Tensor:
    """The pseudo-Huber scale of each sample's timestep: c throughout ("constant"); from 1 at t = 0 down to c at the
    last timestep ("exponential", c ** (t / T)); or (1 − c) / (1 + σ_t)² + c with σ_t = √((1 − ᾱ_t) / ᾱ_t) ("snr":
    near 1 where the latents are nearly clean, near c where they are nearly noise)."""
    t = timesteps.to(torch.float32)
    if schedule == "constant":
        return torch.full_like(t, c)
    if schedule == "exponential":
        return c ** (t / noise_scheduler.config.num_train_timesteps)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return (1 - c) / (1 + sigmas) ** 2 + c


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    scales: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample, averaged over its elements. huber: 2c(√(d² + c²) − c), which is d² near 0 and 2c|d|
    far from it; smooth_l1: the same divided by c (|d|-like, 2|d| far from 0); `scales` holds each sample's c.
    `mask` (B,H,W) in [0, 1] at pixel size: each latent element's loss times the mask's mean over the pixels it
    covers, still averaged over all elements, as sd-scripts' masked loss (a half-transparent image weighs half)."""
    difference = prediction.float() - target.float()
    if loss_type == "l2":
        elements = difference.pow(2)
    elif loss_type == "l1":
        elements = difference.abs()
    elif loss_type in HUBER_LOSSES:
        c = scales.to(difference.device).view(-1, *([1] * (difference.ndim - 1)))
        elements = 2 * ((difference.pow(2) + c.pow(2)).sqrt() - c)
        elements = elements * c if loss_type == "huber" else elements
    else:
        raise ValueError(f"unknown loss type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    if mask is not None:
        mask = torch.nn.functional.interpolate(mask.unsqueeze(1).to(elements), size=elements.shape[2:], mode="area")
        elements = elements * mask
    return elements.mean(dim=tuple(range(1, difference.ndim)))


def debiased_weights(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al., arXiv 2310.08442; kohya's --debiased_estimation_loss): each sample weighted
    1/√SNR (1/√(SNR + 1) for v-prediction), SNR capped at SNR_CLAMP, so the loss no longer favours the nearly clean
    timesteps."""
    capped = snr.clamp(max=SNR_CLAMP)
    return 1 / (capped + 1).sqrt() if v_prediction else 1 / capped.sqrt()


def check_schedule(config: TrainConfig, base_configs: Path) -> str:
    """Refuse, from the base's scheduler config (no weights), timestep bounds outside its schedule, and debiased
    estimation on an epsilon base whose last timestep is pure noise: it weighs a sample 1/√SNR, and that SNR is 0.
    Returns a note for --zero-terminal-snr on an epsilon base ("" otherwise)."""
    from stylelora.models.family import folder_configs

    scheduler = folder_configs(base_configs)["scheduler"]
    length, t = scheduler.get("num_train_timesteps", 1000), config.train
    if (t.max_timestep or length) > length or t.min_timestep >= length:
        raise ConfigError(f"train.min_timestep / max_timestep ({t.min_timestep} / {t.max_timestep}) must lie within "
                          f"the base's {length} training timesteps: max_timestep at most {length}.")
    epsilon = scheduler.get("prediction_type", "epsilon") == "epsilon"
    zero = t.zero_terminal_snr or scheduler.get("rescale_betas_zero_snr", False)
    if zero and t.debiased_estimation_loss and epsilon:
        source = "--zero-terminal-snr" if t.zero_terminal_snr else "the base's scheduler"
        raise ConfigError(f"train.debiased_estimation_loss weighs each sample 1/sqrt(SNR), and with {source} the "
                          "last timestep's SNR is 0 on this epsilon-prediction base: drop one of them.")
    if t.zero_terminal_snr and epsilon:
        # As sd-scripts warns: its last step asks the model for the noise it was given, which teaches nothing there.
        return ("note: --zero-terminal-snr on an epsilon-prediction base: its last timestep is pure noise, which an "
                "epsilon model returns as it is; the schedule is meant for v-prediction bases fine-tuned with it, "
                "and images may come out other than the base's sampler expects.")
    return ""
