"""Owns the noise a training step draws: Gaussian noise with kohya's noise offset and multi-resolution layers, and
the input perturbation the noisy latents get on top of it; and the schedule's zero terminal SNR. Every draw comes
from the step's generator, in a fixed order, so a resumed run draws the same noise; an option that is off draws
nothing, so a run without it draws the numbers it drew before the option existed.
"""
from __future__ import annotations

import torch


def sample_noise(latents: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like `latents` (drawn on the generator's device, then moved: same noise on any device)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset > 0:
        # A shift shared by every pixel of a channel: lets the model change an image's mean brightness.
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """`noise` plus `iterations` layers of noise drawn at ever coarser sizes and scaled up, layer i weighted
    discount ** i, the sum rescaled to unit deviation: multi-resolution ("pyramid") noise, as kohya's
    --multires_noise_iterations / --multires_noise_discount count them (layer 0 is drawn at full size).

    Why: pure per-pixel noise leaves an image's coarse layout nearly intact at every timestep, so a model learns to
    keep it; noise with low-frequency parts lets an adapter change overall contrast and composition (J. Whitaker,
    "Multi-resolution noise for diffusion model training", 2023)."""
    import torch.nn.functional as F

    batch, channels, height, width = noise.shape
    total = noise.float()
    for level in range(iterations):
        shrink = (2 + 2 * torch.rand((), generator=generator).item()) ** level  # each layer 2-4× coarser
        rows, columns = max(1, int(height / shrink)), max(1, int(width / shrink))
        layer = torch.randn((batch, channels, rows, columns), generator=generator).to(total.device)
        total = total + F.interpolate(layer, size=(height, width), mode="bilinear") * discount ** level
        if rows == 1 or columns == 1:
            break  # a single value per channel: no coarser layer exists
    return (total / total.std()).to(noise.dtype)


def drawn(strength: float, at_random: bool, generator: torch.Generator) -> float:
    """`strength`, or with kohya's --noise_offset_random_strength / --ip_noise_gamma_random_strength a strength drawn
    evenly between 0 and it for the batch: the adapter sees every amount up to it, not one fixed amount."""
    if not at_random or strength <= 0:
        return strength
    return strength * torch.rand((), generator=generator).item()


def perturbed(noise: torch.Tensor, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """The noise the latents are noised with: `noise` itself, or with input perturbation (Ning et al., arXiv
    2301.11706; kohya's --ip_noise_gamma) `noise` + γ × fresh noise, while the target stays `noise`: training sees
    inputs a little off the noise it is asked for, as sampling does after its own errors."""
    if gamma <= 0:
        return noise
    fresh = torch.randn(noise.shape, generator=generator, dtype=torch.float32)
    return noise + gamma * fresh.to(device=noise.device, dtype=noise.dtype)


def zero_terminal_snr(on: bool) -> dict:
    """What the training scheduler is built with for train.zero_terminal_snr (diffusers' own rescale); a base whose
    scheduler already rescales keeps it either way."""
    return {"rescale_betas_zero_snr": True} if on else {}
