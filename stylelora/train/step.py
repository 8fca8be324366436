"""Owns the training step: one pure function from a batch to the diffusion loss.

    latents   cached (already scaled) or VAE-encoded from pixels now
    noise     N(0, I), plus `noise_offset` × a per-channel constant (helps very dark / bright images); with
              `multires_noise_iterations`, coarser noise layers added and the sum rescaled (multires_noise)
    t         uniform over the scheduler's training timesteps (or kohya's min_timestep to max_timestep)
    noisy     scheduler.add_noise(latents, noise, t); with `ip_noise_gamma`, of noise + γ × fresh noise, which the
              target leaves out (input perturbation)
    text      cached text-encoder outputs (frozen TE, static captions) or TE(tokens) with gradients; SDXL: both
              encoders, pooled embeddings and add_time_ids (stylelora/train/models.py)
    target    noise for epsilon prediction, scheduler.get_velocity(...) for v_prediction (read from the scheduler)
    loss      per-sample MSE (or `loss_type`: stylelora/train/losses.py) × min-SNR-γ weight (Hang et al. 2023;
              × 1/√SNR with `debiased_estimation_loss`; × `prior_loss_weight` on regularization samples), averaged;
              with `alpha_mask`, each element's loss × the image's alpha over it first (sd-scripts' masked loss)
    preserve  + preserve_base × the same weighted MSE between the LoRA model and the frozen base, both given half
              of the batch's noisy latents with their trigger words removed or replaced by a decoy word
              (stylelora/train/preservation.py); with `decoy_company`, part of the samples keep their trigger
              with a company word beside it, trained toward the data as usual, so stacked prompts turn it on; with
              `made_up_company` half the words are made-up, and a copy keeps such a word: alone it gives the base
    text noise  with `text_noise`, N(0, σ²) on the hidden states of the samples trained toward the data, so the
              adapter still reads its trigger after another adapter's text encoder has moved it (with_text_noise)

All randomness comes from the `generator` argument, so a (state, batch) pair always gives the same loss, which is
what makes resuming exact; kohya's LoRA dropouts, when on, draw inside the model from torch's generator, which
checkpoints save too (stylelora/train/lora_dropout.py says why). The loop owns everything else (optimizer,
accumulation, autocast, logging).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from stylelora.config import HUBER_LOSSES
from stylelora.train.losses import debiased_weights, huber_scales, per_sample_loss
from stylelora.train.models import SdxlText
from stylelora.train.noise import drawn, multires_noise, perturbed, sample_noise
from stylelora.train.preservation import (accompanied_captions, base_prediction, preserved_samples,
                                          with_made_up_company)

if TYPE_CHECKING:
    from stylelora.config import TrainConfig
    from stylelora.train.models import TrainModels

PREDICTION_TYPES = ("epsilon", "v_prediction")


def loss_step(batch: dict, models: TrainModels, noise_scheduler, config: TrainConfig,
              generator: torch.Generator) -> torch.Tensor:
    """The weighted diffusion loss of one batch (a scalar with gradients into the trainable LoRA weights)."""
    t = config.train
    latents = models.batch_latents(batch)
    noise = sample_noise(latents, drawn(t.noise_offset, t.noise_offset_random_strength, generator), generator)
    if t.multires_noise_iterations:
        noise = multires_noise(noise, t.multires_noise_iterations, t.multires_noise_discount, generator)
    timesteps = torch.randint(t.min_timestep, t.max_timestep or noise_scheduler.config.num_train_timesteps,
                              (latents.shape[0],), generator=generator).to(latents.device)
    gamma = drawn(t.ip_noise_gamma, t.ip_noise_gamma_random_strength, generator)
    noisy = noise_scheduler.add_noise(latents, perturbed(noise, gamma, generator), timesteps)
    weights = loss_weights(noise_scheduler, timesteps, t)
    if config.data.prior_loss_weight != 1:  # kohya's --prior_loss_weight on the reg samples
        weights = weights * torch.tensor(batch["loss_weight"], dtype=weights.dtype, device=weights.device)
    scales = loss_scales(noise_scheduler, timesteps, t)
    preserved = preserved_samples(list(batch["caption"]), models.triggers, config.train.preserve_base, models.decoys,
                                  config.train.preserve_decoys, generator)
    captions = accompanied_captions(list(batch["caption"]), models.triggers, models.company,
                                    config.train.decoy_company, generator)
    if config.train.made_up_company:
        made_up = set(models.company) - set(models.decoys)  # the quiet company words are decoys, the coined ones not
        preserved = with_made_up_company(preserved, list(batch["caption"]), captions, made_up)
    index = torch.tensor([i for i, _ in preserved], dtype=torch.long, device=latents.device)
    # One UNet call for the batch and its trigger-free copies: one forward per backward, as DDP requires.
    text = models.encode_captions(captions + [caption for _, caption in preserved])
    text = with_text_noise(text, len(captions), config.train.text_noise, generator)
    time_ids = models.time_ids(batch)
    prediction = models.denoise(models.unet, torch.cat([noisy, noisy[index]]), torch.cat([timesteps, timesteps[index]]),
                                text, None if time_ids is None else torch.cat([time_ids, time_ids[index]]))
    prediction, preserved_prediction = prediction[:len(captions)], prediction[len(captions):]
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    loss = weighted_loss(prediction, target, weights, t.loss_type, scales, batch.get("alpha_mask"))
    if preserved:
        base = base_prediction(models, noisy[index], timesteps[index], [caption for _, caption in preserved],
                               None if time_ids is None else time_ids[index])
        loss = loss + t.preserve_base * weighted_loss(preserved_prediction, base, weights[index], t.loss_type,
                                                      None if scales is None else scales[index])
    return loss


def validation_losses(batch: dict, models: TrainModels, noise_scheduler, config: TrainConfig,
                      generator: torch.Generator, fractions: tuple[float, ...]) -> torch.Tensor:
    """Each sample's loss (B,), averaged over the timesteps at `fractions` of the run's timestep range, with the
    training loss's weighting and none of its augmentations (stylelora/train/validation.py says why)."""
    t = config.train
    latents = models.batch_latents(batch)
    text = models.encode_captions(list(batch["caption"]))
    time_ids = models.time_ids(batch)
    low, high = t.min_timestep, (t.max_timestep or noise_scheduler.config.num_train_timesteps) - 1
    losses = []
    for fraction in fractions:
        timesteps = torch.full((latents.shape[0],), round(low + fraction * (high - low)), dtype=torch.long,
                               device=latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        prediction = models.denoise(models.unet, noise_scheduler.add_noise(latents, noise, timesteps), timesteps,
                                    text, time_ids)
        losses.append(per_sample_loss(prediction, prediction_target(noise_scheduler, latents, noise, timesteps),
                                      t.loss_type, loss_scales(noise_scheduler, timesteps, t), batch.get("alpha_mask"))
                      * loss_weights(noise_scheduler, timesteps, t))
    return torch.stack(losses).mean(dim=0)


def with_text_noise(text, count: int, std: float, generator: torch.Generator):
    """`text` with N(0, std²) added to the hidden states of its first `count` samples (those trained toward the
    data; the preservation copies after them keep the exact text the base's target was computed from). SDXL: to
    the hidden states, not the pooled embedding.

    Why: in a blend, another adapter's text-encoder LoRA moves the tokens around this adapter's trigger (by about
    the hidden states' own size on the toy base: benchmarks/text_encoder_reach.py), and an adapter whose UNet only
    ever saw its own text encoder's reading loses its style there. Trained through noisy readings, it keeps it
    (docs/results.md, "Blending"). Noise on embeddings while fine-tuning, as NEFTune (arXiv 2310.05914) does.
    """
    if std <= 0:
        return text
    if isinstance(text, SdxlText):
        return replace(text, hidden=with_text_noise(text.hidden, count, std, generator))
    noise = torch.randn(text[:count].shape, generator=generator).to(device=text.device, dtype=text.dtype)
    return torch.cat([text[:count] + std * noise, text[count:]])


def weighted_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, loss_type: str = "l2",
                  scales: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss: each sample's (losses.per_sample_loss, masked by its alpha with `mask`) times its weight,
    averaged."""
    return (per_sample_loss(prediction, target, loss_type, scales, mask) * weights).mean()


def loss_scales(noise_scheduler, timesteps: torch.Tensor, train) -> torch.Tensor | None:
    """Each sample's c for the huber and smooth_l1 losses (losses.huber_scales); None for the others."""
    if train.loss_type not in HUBER_LOSSES:
        return None
    return huber_scales(noise_scheduler, timesteps, train.huber_schedule, train.huber_c)


def loss_weights(noise_scheduler, timesteps: torch.Tensor, train) -> torch.Tensor:
    """Each sample's weight: min-SNR-γ's, times debiased estimation's with `debiased_estimation_loss`."""
    weights = min_snr_weights(noise_scheduler, timesteps, train.min_snr_gamma)
    if train.debiased_estimation_loss:
        v_prediction = prediction_type(noise_scheduler) == "v_prediction"
        weights = weights * debiased_weights(snr(noise_scheduler, timesteps), v_prediction)
    return weights


def prediction_type(noise_scheduler) -> str:
    kind = noise_scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"The base model's scheduler predicts {kind!r}; stylelora trains "
                         f"{' or '.join(PREDICTION_TYPES)} "
                         "models (SD 1.x / 2.x). Use a base whose scheduler_config.json has one of those.")
    return kind


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should output: the noise (epsilon) or the velocity α·ε − σ·x₀ (v_prediction)."""
    if prediction_type(noise_scheduler) == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v-prediction; 1 when γ = 0.

    Without it the many nearly-clean timesteps (huge SNR, trivial to denoise) dominate the gradient; capping
    their weight at γ makes training converge faster (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"). The v-prediction form accounts for v's target already scaling with 1/(SNR+1).
    """
    if gamma <= 0:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    ratio = snr(noise_scheduler, timesteps)
    if prediction_type(noise_scheduler) == "epsilon":
        # a zero SNR (the last timestep with --zero-terminal-snr) weighs min(SNR, γ)/SNR's limit, 1
        return torch.where(ratio > 0, ratio.clamp(max=gamma) / ratio, torch.ones_like(ratio))
    return ratio.clamp(max=gamma) / (ratio + 1.0)
