"""Matching the toy base's VAE decoder to its denoiser: the last build stage, run on an assembled base folder.

The VAE was trained on renders; the UNet draws latents that are close to, but not exactly, those of renders. Dark
plain shapes (brown above all) sit close to their striped versions in latent space, and the decoder turned the
UNet's brown latents into diagonal stripes: the base drew stripes on ~22 % of prompts that never asked for them.
Two decoder-only passes fix that while the encoder, hence every latent the UNet and any adapter trained on, stays
bit-identical:

1. texture   reconstruction with an extra L1 on image gradients, which weighs faint false texture (a stripe
             in a dark shape costs little MSE) as much as a missing edge;
2. denoiser  half of each batch is exact latents of renders of every style (so real stripes and pastel still
             decode), half is what the base's own UNet makes of plain renders' latents noised part-way into the
             sampling schedule and denoised with guidance, as at generation; the target is the plain render.
             Half of those captions start with a word the base never trained on ("zorb, ...", "ange, ..."): such
             words (an adapter's future trigger among them) pushed the UNet's latents further towards stripes,
             and a base should draw what the words it knows say.
"""
from __future__ import annotations

import time

from .denoiser_train import plain_pool, tokenize
from .tokenizer import unknown_words, with_unknown_word
from .vae_train import clipped_step, decoder_lr_schedule, false_stripes_rate, psnr_by_style, render_pool, to_unit

TEXTURE_WEIGHT = 0.5
GUIDANCE = 5.0
SAMPLING_STEPS = 25  # the evaluate default; SDEdit starts at a random step of this schedule
FIRST_STEP_RANGE = (8, 20)  # of 25: begin with 5..17 denoising steps left (never from pure noise: no target)


def texture_loss(decoded, target):
    """L1 between horizontal and vertical image gradients: penalises texture the target does not have."""
    import torch

    return sum((torch.diff(decoded, dim=d) - torch.diff(target, dim=d)).abs().mean() for d in (-1, -2))


def reconstruction_loss(decoded, target):
    return (decoded - target).pow(2).mean() + 0.1 * (decoded - target).abs().mean() \
        + TEXTURE_WEIGHT * texture_loss(decoded, target)


class DenoiserLatents:
    """Latents the base's UNet produces from plain renders noised part-way, as a sampler would denoise them."""

    def __init__(self, pipe, generator):
        import torch

        self.pipe, self.generator = pipe, generator
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(SAMPLING_STEPS)
        with torch.no_grad():
            self.empty = self.encode([""])

    def encode(self, captions):
        return self.pipe.text_encoder(tokenize(self.pipe.tokenizer, captions))[0]

    def __call__(self, latents, captions):
        """latents: the renders' unscaled posterior means; returns the UNet's result, unscaled likewise."""
        import torch

        scale = self.pipe.vae.config.scaling_factor
        with torch.no_grad():
            cond = torch.cat([self.empty.expand(len(captions), -1, -1), self.encode(captions)])
            first = int(torch.randint(*FIRST_STEP_RANGE, (1,), generator=self.generator))
            timesteps = self.scheduler.timesteps[first:]
            noise = torch.randn(latents.shape, generator=self.generator)
            z = self.scheduler.add_noise(latents * scale, noise, timesteps[:1].repeat(len(captions)))
            for t in timesteps:
                uncond, text = self.pipe.unet(torch.cat([z, z]), t, cond).sample.chunk(2)
                z = self.scheduler.step(uncond + GUIDANCE * (text - uncond), t, z).prev_sample
        return z / scale


def _train_decoder(vae, steps: int, lr: float, batch_fn, label: str, judge, log) -> None:
    import torch

    params = list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = decoder_lr_schedule(opt, steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        latents, target = batch_fn()
        loss = reconstruction_loss(vae.decode(latents).sample, target)
        clipped_step(loss, opt, sched, params)
        if step % 250 == 0 or step == steps:
            scores = psnr_by_style(vae, 32, 20_000)
            log(f"decoder ({label}) step {step} loss {loss.item():.5f} psnr min {min(scores.values()):.2f} dB "
                f"false stripes {false_stripes_rate(vae, judge):.3f} {time.time() - t0:.0f}s")


def tune_decoder(pipe, *, texture_steps: int = 1500, denoiser_steps: int = 1000, seed: int = 7,
                 pool_size: int = 16_000, log=print):
    """Run both passes on the fp32 pipeline's VAE decoder (in place); returns the pipeline."""
    import torch

    from .judge import load_judge

    vae, judge = pipe.vae, load_judge()
    pipe.unet.eval(), pipe.text_encoder.eval()
    vae.requires_grad_(False).eval()  # eval: the held-out checks run as the pipeline will
    vae.decoder.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    renders = render_pool(pool_size, seed)
    plain_pixels, captions = plain_pool(pool_size // 2, seed + 1)
    denoised = DenoiserLatents(pipe, gen)

    def encode(pixels):
        with torch.no_grad():
            return vae.encode(pixels).latent_dist.mode()

    def exact_batch(n=16):
        x = to_unit(renders[torch.randint(0, len(renders), (n,), generator=gen).numpy()])
        return encode(x), x

    words = unknown_words(pipe.tokenizer, captions)

    def mixed_batch():
        latents, x = exact_batch(8)
        idx = torch.randint(0, len(plain_pixels), (8,), generator=gen).numpy()
        plain = to_unit(plain_pixels[idx])
        prompts = [with_unknown_word(captions[i], words, gen) for i in idx]
        return torch.cat([latents, denoised(encode(plain), prompts)]), torch.cat([x, plain])

    log(f"decoder: false stripes before tuning {false_stripes_rate(vae, judge):.3f}; {len(words)} unknown words")
    _train_decoder(vae, texture_steps, 3e-4, exact_batch, "texture", judge, log)
    _train_decoder(vae, denoiser_steps, 2e-4, mixed_batch, "denoiser latents", judge, log)
    vae.requires_grad_(True)
    return pipe
