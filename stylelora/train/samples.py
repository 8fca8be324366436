"""Owns sample grids during training: the same prompts and seeds every time, so grids from different steps compare."""
from __future__ import annotations

from pathlib import Path

import torch

from stylelora.config import TRIGGER_PLACEHOLDER, TrainConfig
from stylelora.grid import save_grid
from stylelora.share import PREVIEW_NAME

SAMPLES_DIR = "samples"


def fill_trigger(prompts: tuple[str, ...], trigger: str) -> list[str]:
    """Put the run's trigger words where a prompt says {trigger}; without a trigger, drop the placeholder cleanly."""
    filled = []
    for prompt in prompts:
        if trigger:
            filled.append(prompt.replace(TRIGGER_PLACEHOLDER, trigger))
        else:
            filled.append(prompt.replace(f"{TRIGGER_PLACEHOLDER}, ", "").replace(TRIGGER_PLACEHOLDER, "").strip())
    return filled


def sample_path(run_dir: Path, step: int) -> Path:
    return run_dir / SAMPLES_DIR / f"step-{step:06d}.png"


def save_samples(pipe, prompts: list[str], config: TrainConfig, path: Path) -> Path:
    """Generate one image per prompt (seed = sample_seed + column) with the LoRA active, and save them as a grid."""
    unet_was_training, te_was_training = pipe.unet.training, pipe.text_encoder.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    try:
        generators = [torch.Generator("cpu").manual_seed(config.train.sample_seed + i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=config.train.sample_steps,
                      guidance_scale=config.train.sample_guidance, generator=generators,
                      height=config.data.resolution, width=config.data.resolution, output_type="pil").images
    finally:
        pipe.unet.train(unet_was_training)
        pipe.text_encoder.train(te_was_training)
    # Prompts are too long to label 32 px tiles legibly: they go next to the grids, one per column.
    grid = save_grid(images, path, columns=len(images))
    # The first prompt carries the trigger: its image is the adapter's preview (stylelora.share).
    _save_preview(images[0], path.parent / PREVIEW_NAME)
    _write_prompts(path.parent / "prompts.txt", prompts, config)
    return grid


def _save_preview(image, path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_prompts(path: Path, prompts: list[str], config: TrainConfig) -> None:
    from stylelora.atomic import write_text_atomic

    lines = [f"column {i + 1} (seed {config.train.sample_seed + i}): {p}" for i, p in enumerate(prompts)]
    write_text_atomic(path, "\n".join(lines) + "\n")
