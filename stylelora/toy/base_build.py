"""`stylelora toy build-base` / `tune-base`: the seeded recipe that trains, tunes and writes the embedded toy base."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from .world import STYLE_TRIGGERS, caption, random_scene

TOY_BASE_DIR = Path(__file__).resolve().parents[1] / "models" / "toy" / "base"


def tokenizer_captions(n: int = 20_000, seed: int = 0) -> list[str]:
    """The text the tokenizer's BPE is learned from: plain captions plus the style trigger words."""
    rng = random.Random(seed)
    captions = [caption(random_scene(rng)) for _ in range(n)]
    return captions + [f"{t}, {c}" for t in STYLE_TRIGGERS.values() for c in captions[:200]]


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from .tokenizer import train_clip_tokenizer

    if not (folder / "vocab.json").exists():
        train_clip_tokenizer(tokenizer_captions(), folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_vae(work_dir: Path, steps: int, decoder_steps: int, seed: int, log, pool: dict):
    """Stage 1 trains the whole VAE (work_dir/vae); stage 2 fine-tunes its decoder alone (work_dir/vae_decoder)."""
    from diffusers import AutoencoderKL

    from .vae_train import finetune_decoder, train_vae

    first, second = work_dir / "vae", work_dir / "vae_decoder"
    if (second / "config.json").exists():
        log(f"reusing the VAE in {second}")
        return AutoencoderKL.from_pretrained(second)
    if (first / "config.json").exists():
        log(f"reusing the first-stage VAE in {first}")
        vae = AutoencoderKL.from_pretrained(first)
    else:
        vae = train_vae(first, steps=steps, seed=seed, log=log, **pool)
    return finetune_decoder(vae, second, steps=decoder_steps, seed=seed + 1, log=log, **pool)


def assemble(vae, text_encoder, tokenizer, unet, out_dir: Path) -> Path:
    """Write a StableDiffusionPipeline folder from the trained parts."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .denoiser_train import SCHEDULER_CONFIG

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return write_pipeline(pipe, out_dir)


def write_pipeline(pipe, out_dir: Path) -> Path:
    """Save in fp16 (the base ships under 20 MB) to a temp folder, then swap it in (out_dir may be the source)."""
    import torch

    pipe.to(torch.float16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def build_base(work_dir: Path, out_dir: Path = TOY_BASE_DIR, *, seed: int = 0, vae_steps: int = 4000,
               decoder_steps: int = 2000, denoiser_steps: int = 7000, tune: dict | None = None,
               pool_size: int | None = None, log=print) -> Path:
    """Tokenizer → VAE → decoder fine-tune → UNet + text encoder → pipeline folder → tuning (tune_base).

    Stages in work_dir are reused. tune: keyword arguments for tune_base (step counts).

    The decoder fine-tune leaves the encoder, hence every latent, bit-identical, so the UNet trains on the same
    latents whether it runs before or after that stage. pool_size (renders per stage) is for smoke tests only.
    """
    from .denoiser_train import train_denoiser

    tokenizer = build_tokenizer(work_dir / "tokenizer")
    pool = {} if pool_size is None else {"pool_size": pool_size}
    vae = build_vae(work_dir, vae_steps, decoder_steps, seed, log, pool)
    unet, text_encoder = train_denoiser(vae, tokenizer, work_dir / "denoiser", steps=denoiser_steps, seed=seed,
                                        log=log, **pool)
    final = work_dir / "denoiser" / f"step_{denoiser_steps:06d}"
    return assemble_from_snapshot(work_dir, final, out_dir, tune={**(tune or {}), **pool}, log=log)


def assemble_from_snapshot(work_dir: Path, snapshot: Path, out_dir: Path = TOY_BASE_DIR, *, tune: dict | None = None,
                           log=print) -> Path:
    """The base from one UNet + text-encoder snapshot, then tuned (tune_base: decoder, unknown words)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae_dir = work_dir / "vae_decoder"
    if not (vae_dir / "config.json").exists():  # a build from before the decoder stage existed
        vae_dir = work_dir / "vae"

    assemble(
        AutoencoderKL.from_pretrained(vae_dir),
        CLIPTextModel.from_pretrained(snapshot / "text_encoder"),
        CLIPTokenizer.from_pretrained(work_dir / "tokenizer"),
        UNet2DConditionModel.from_pretrained(snapshot / "unet"),
        out_dir,
    )
    return tune_base(out_dir, log=log, **(tune or {}))


def tune_base(base_dir: Path, out_dir: Path | None = None, *, texture_steps: int = 1500, denoiser_steps: int = 1000,
              word_steps: int = 500, pool_size: int | None = None, log=print) -> Path:
    """1. match the VAE decoder to the UNet (decoder_tune); 2. teach the UNet + text encoder to ignore words it
    never trained on (denoiser_train.teach_unknown_words). Writes the base to out_dir (default: in place)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .decoder_tune import tune_decoder
    from .denoiser_train import teach_unknown_words

    pool = {} if pool_size is None else {"pool_size": pool_size}
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    tune_decoder(pipe, texture_steps=texture_steps, denoiser_steps=denoiser_steps, log=log, **pool)
    teach_unknown_words(pipe, steps=word_steps, log=log, **pool)
    # Calling the tokenizer with padding/truncation leaves them switched on in what it would save: save it as loaded.
    pipe.tokenizer = CLIPTokenizer.from_pretrained(Path(base_dir) / "tokenizer")
    return write_pipeline(pipe, Path(out_dir or base_dir))
