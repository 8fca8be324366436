"""Training the toy base's VAE (AutoencoderKL, f=4) on renders of every style, and measuring its reconstruction PSNR."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np

from .render import render
from .world import STYLE_MIXES, random_styled_scene

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    # 8 latent channels (SD uses 4): 6× compression instead of 12× lets a 1 M-parameter VAE reach clean
    # (≥ 28 dB) reconstructions of sharp edges and stripes within minutes on 2 CPU cores.
    latent_channels=8,
    norm_num_groups=32,
    sample_size=32,
)


def render_pool(n: int, seed: int, mix: str | None = None) -> np.ndarray:
    """n seeded renders as a uint8 array (n, 3, H, W)."""
    rng = random.Random(seed)
    images = [np.asarray(render(random_styled_scene(rng, mix))) for _ in range(n)]
    return np.stack(images).transpose(0, 3, 1, 2).copy()


def to_unit(pixels_uint8):
    import torch

    return torch.from_numpy(pixels_uint8).float().div(127.5).sub(1.0)


def psnr_by_style(vae, n_per_style: int = 96, seed: int = 10_000) -> dict[str, float]:
    """Held-out reconstruction PSNR (dB, pixels in [0,1]) for each style mix, using the posterior mean."""
    import torch

    scores = {}
    for k, mix in enumerate(sorted(STYLE_MIXES)):
        x = to_unit(render_pool(n_per_style, seed + k, mix))
        mse = ((reconstruct(vae, x) - x) / 2).pow(2).mean().item()
        scores[mix] = 10 * math.log10(1.0 / max(mse, 1e-12))
    return scores


def to_images(y) -> list:
    """Pixels in [-1, 1], (n, 3, H, W), back to RGB PIL images (the inverse of `to_unit`, rounded)."""
    from PIL import Image

    return [Image.fromarray(array) for array in y.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()]


def reconstruct(vae, x):
    """Encode to the posterior mean and decode, as everything downstream uses the VAE; clamped to [-1, 1]."""
    import torch

    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


def vae_round_trip(vae, images: list, batch: int = 256) -> list:
    """RGB PIL images encoded by `vae` and decoded again (`reconstruct`), `batch` at a time: what a denoiser that drew
    the right latents would give back."""
    out = []
    for start in range(0, len(images), batch):
        pixels = to_unit(np.stack([np.asarray(image) for image in images[start:start + batch]])).permute(0, 3, 1, 2)
        out += to_images(reconstruct(vae, pixels))
    return out


def train_vae(out_dir: Path, *, steps: int = 4000, batch: int = 16, lr: float = 1e-3, seed: int = 0,
              pool_size: int = 16_000, target_psnr: float = 29.0, log=print):
    """Train until every style reconstructs at ≥ target_psnr dB (checked every 250 steps) or `steps` run out."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    pool = render_pool(pool_size, seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, pool_size, (batch,), generator=gen)
        x = to_unit(pool[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mean, not a sample: the sampling noise (std ≈ 1 at init) blurs sharp edges and
        # stalled PSNR at ~23 dB; everything downstream encodes with the mean anyway (see encode_latents).
        y = vae.decode(posterior.mode()).sample
        # MSE drives PSNR; a little L1 sharpens edges; a tiny KL keeps the latent scale bounded (SD-style).
        loss = (y - x).pow(2).mean() + 0.1 * (y - x).abs().mean() + 1e-6 * posterior.kl().mean()
        clipped_step(loss, opt, sched, vae.parameters())
        if step % 250 == 0 or step == steps:
            scores = _held_out_psnr(vae)
            log(f"vae step {step} loss {loss.item():.5f} psnr min {min(scores.values()):.2f} dB "
                f"{ {k: round(v, 1) for k, v in scores.items()} } {time.time() - t0:.0f}s")
            if min(scores.values()) >= target_psnr:
                break
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, pool[:2048]))
    vae.save_pretrained(out_dir)
    return vae


def clipped_step(loss, opt, sched, params) -> None:
    """One optimizer step with gradient clipping to norm 1 (every toy-base training stage)."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _held_out_psnr(vae) -> dict[str, float]:
    vae.eval()
    scores = psnr_by_style(vae)
    vae.train()
    return scores


def false_stripes_rate(vae, judge, n: int = 256, seed: int = 30_000) -> float:
    """How often the judge sees stripes in reconstructions of plain renders (the renders themselves: 0)."""
    y = reconstruct(vae, to_unit(render_pool(n, seed, "plain")))
    return sum(v["stripes"] for v in judge.predict(to_images(y))) / n


def finetune_decoder(vae, out_dir: Path, *, steps: int = 2000, batch: int = 16, lr: float = 5e-4, seed: int = 1,
                     pool_size: int = 16_000, log=print):
    """Second VAE stage: train the decoder alone with the encoder frozen (SD's ft-MSE VAE did the same).

    Why: after the first stage the decoder still paints faint stripes into some plain dark shapes (the judge saw
    stripes in ~13 % of reconstructed plain renders), which the base would inherit. Freezing the encoder keeps
    every latent bit-identical, so the latent scaling factor and anything trained on the latents stay valid.
    """
    import torch

    from .judge import load_judge

    judge = load_judge()
    torch.manual_seed(seed)
    pool = render_pool(pool_size, seed)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    params = list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = decoder_lr_schedule(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        x = to_unit(pool[torch.randint(0, pool_size, (batch,), generator=gen).numpy()])
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mode()
        y = vae.decode(latents).sample
        loss = (y - x).pow(2).mean() + 0.1 * (y - x).abs().mean()
        clipped_step(loss, opt, sched, params)
        if step % 500 == 0 or step == steps:
            scores = _held_out_psnr(vae)
            log(f"vae decoder step {step} loss {loss.item():.5f} psnr min {min(scores.values()):.2f} dB "
                f"false stripes {false_stripes_rate(vae, judge):.3f} {time.time() - t0:.0f}s")
    vae.eval()
    vae.requires_grad_(True)
    vae.save_pretrained(out_dir)
    return vae


def decoder_lr_schedule(opt, steps: int):
    """100 warmup steps, then cosine to 0: every decoder-only pass (here and in decoder_tune)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def latent_scaling_factor(vae, pixels_uint8) -> float:
    """1/std of the latents, so the diffusion model sees unit-variance inputs (what SD's 0.18215 is for its VAE)."""
    import torch

    with torch.no_grad():
        latents = vae.encode(to_unit(pixels_uint8)).latent_dist.mode()
    return float(1.0 / latents.std())
