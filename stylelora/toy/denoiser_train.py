"""Training the toy base's UNet and CLIP text encoder jointly on cached latents of plain captioned renders."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np

from .render import render
from .world import caption, random_scene

UNET_CONFIG = dict(
    sample_size=8,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=8,
    norm_num_groups=32,
)
TEXT_ENCODER_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=128,
)
# Stable Diffusion 1.x's noise schedule, so the toy base behaves like the real thing under every scheduler.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def text_encoder_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )


def plain_pool(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """The base's pretraining set: n seeded plain renders and their captions."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(render(s)) for s in scenes]).transpose(0, 3, 1, 2).copy()
    return pixels, [caption(s) for s in scenes]


def encode_latents(vae, pixels_uint8, batch: int = 512):
    """Scaled VAE posterior means for the whole pool (computed once: the UNet never waits on the VAE)."""
    import torch

    from .vae_train import to_unit

    chunks = []
    with torch.no_grad():
        for i in range(0, len(pixels_uint8), batch):
            chunks.append(vae.encode(to_unit(pixels_uint8[i:i + batch])).latent_dist.mode())
    return torch.cat(chunks) * vae.config.scaling_factor


def tokenize(tokenizer, captions: list[str]):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def denoise_loss(unet, text_encoder, scheduler, latents, input_ids, generator, snr_gamma: float = 5.0):
    import torch

    from stylelora.train.step import min_snr_weights  # the trainer's weighting: one definition for both

    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(input_ids)[0]
    pred = unet(noisy, timesteps, hidden).sample
    per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()


def train_denoiser(vae, tokenizer, out_dir: Path, *, steps: int, batch: int = 64, lr: float = 1e-3,
                   seed: int = 0, pool_size: int = 40_000, caption_dropout: float = 0.1,
                   ema_decay: float = 0.999, save_every: int = 1000, log=print):
    """Joint UNet + text-encoder training; writes EMA weights to out_dir/step_N/ every `save_every` steps."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    channels = vae.config.latent_channels
    unet = UNet2DConditionModel(in_channels=channels, out_channels=channels, **UNET_CONFIG)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)  # from_config drops the DDIM-only keys
    pixels, captions = plain_pool(pool_size, seed)
    latents = encode_latents(vae, pixels)
    input_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, min(300, steps // 10))
    lr_lambda = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(seed)
    t0, running = time.time(), None
    steps_done = denoiser_steps(unet, text_encoder, scheduler, latents, lambda idx: input_ids[idx].clone(), empty_ids,
                                opt, sched, params, steps=steps, batch=batch, caption_dropout=caption_dropout, gen=gen)
    for step, loss in steps_done:
        ema.step(params)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if step % 100 == 0:
            log(f"denoiser step {step}/{steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
        if step % save_every == 0 or step == steps:
            save_ema_snapshot(ema, params, unet, text_encoder, out_dir / f"step_{step:06d}")
    return unet, text_encoder


def denoiser_steps(unet, text_encoder, scheduler, latents, ids_for, empty_ids, opt, sched, params, *, steps: int,
                   batch: int, caption_dropout: float, gen):
    """The optimisation steps both toy-base passes share; yields (step, loss) after each one.

    Each step draws a batch of `latents`, takes its token ids from `ids_for(indices)` (which may draw from `gen`
    too), empties `caption_dropout` of the captions (the unconditional half of CFG), and takes one clipped step.
    """
    import torch

    from .vae_train import clipped_step

    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        ids = ids_for(idx)
        ids[torch.rand(batch, generator=gen) < caption_dropout] = empty_ids
        loss = denoise_loss(unet, text_encoder, scheduler, latents[idx], ids, gen)
        clipped_step(loss, opt, sched, params)
        yield step, loss.item()


def save_ema_snapshot(ema, params, unet, text_encoder, folder: Path) -> None:
    """Save the EMA weights (what ships) without disturbing the live training weights."""
    ema.store(params)
    ema.copy_to(params)
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    ema.restore(params)


def teach_unknown_words(pipe, *, steps: int = 500, lr: float = 1e-4, seed: int = 3, pool_size: int = 16_000,
                        unknown_word_rate: float = 0.5, batch: int = 64, caption_dropout: float = 0.1, log=print):
    """Fine-tune the base's UNet + text encoder (in place) on plain renders whose captions half the time start
    with a word the base never trained on ("stripestyle, a red circle ...").

    Why: a word the text encoder never saw keeps its random initial embedding and shifts every later token's
    hidden state; the UNet answered such prompts with striped shapes (16 % of prompts carrying a style's trigger
    word, 0 % without). A base should draw what the words it knows say and ignore the rest, as SD mostly ignores
    "sks"; an adapter then teaches its trigger from a neutral start.
    """
    import torch
    from diffusers import DDPMScheduler

    from .tokenizer import unknown_words, with_unknown_word

    unet, text_encoder, tokenizer = pipe.unet.train(), pipe.text_encoder.train(), pipe.tokenizer
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels, captions = plain_pool(pool_size, seed)
    latents = encode_latents(pipe.vae, pixels)
    words = unknown_words(tokenizer, captions)
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    empty_ids = tokenize(tokenizer, [""])[0]

    def ids_for(idx):
        return tokenize(tokenizer, [with_unknown_word(captions[i], words, gen, unknown_word_rate) for i in idx.tolist()])

    t0, running = time.time(), None
    for step, loss in denoiser_steps(unet, text_encoder, scheduler, latents, ids_for, empty_ids, opt, sched, params,
                                     steps=steps, batch=batch, caption_dropout=caption_dropout, gen=gen):
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if step % 100 == 0 or step == steps:
            log(f"unknown words step {step}/{steps} loss {running:.4f} {time.time() - t0:.0f}s")
    unet.eval(), text_encoder.eval()
    return pipe
