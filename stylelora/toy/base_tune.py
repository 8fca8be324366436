"""`stylelora toy tune-base`: the last build stage, run on an assembled toy base — decoder, then unknown words."""
from __future__ import annotations

from pathlib import Path


def tune_base(base_dir: Path, out_dir: Path | None = None, *, texture_steps: int = 1500, denoiser_steps: int = 1000,
              word_steps: int = 500, pool_size: int | None = None, log=print) -> Path:
    """1. match the VAE decoder to the UNet (decoder_tune); 2. teach the UNet + text encoder to ignore words it
    never trained on (denoiser_train.teach_unknown_words). Writes the base to out_dir (default: in place)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .base_build import write_pipeline
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
