"""Owns sample grids during training: the same prompts and seeds every time, so grids from different steps compare."""
from __future__ import annotations

from pathlib import Path

import torch

from stylelora.config import TRIGGER_PLACEHOLDER, TrainConfig
from stylelora.generate import prompt_schedule
from stylelora.grid import save_grid
from stylelora.share import PREVIEW_NAME
from stylelora.train.sample_prompts import SamplePrompt, parse_sample_prompt

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
    """Generate one image per prompt line (seed = sample_seed + column, unless the line's --d sets one; the other
    kohya options as `sample_prompts` reads them) with the LoRA active, and save them as a grid."""
    samples = [parse_sample_prompt(line) for line in prompts]
    unet_was_training, te_was_training = pipe.unet.training, pipe.text_encoder.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    images: list = [None] * len(samples)
    try:
        for settings, columns in _batches(samples, config).items():
            for column, image in zip(columns, _draw(pipe, [samples[c] for c in columns], columns, settings, config)):
                images[column] = image
    finally:
        pipe.unet.train(unet_was_training)
        pipe.text_encoder.train(te_was_training)
    # Prompts are too long to label 32 px tiles legibly: they go next to the grids, one per column.
    grid = save_grid(images, path, columns=len(images))
    # The first prompt carries the trigger: its image is the adapter's preview (stylelora.share).
    _save_preview(images[0], path.parent / PREVIEW_NAME)
    _write_prompts(path.parent / "prompts.txt", prompts, samples, config)
    return grid


def _batches(samples: list[SamplePrompt], config: TrainConfig) -> dict[tuple, list[int]]:
    """Columns drawn in one pipeline call: those that share size, steps, CFG and whether they have a negative prompt
    (an empty one is not the same as none on SDXL, whose pipeline then uses zeros)."""
    t, size = config.train, config.data.resolution
    batches: dict[tuple, list[int]] = {}
    for column, sample in enumerate(samples):
        key = (sample.width or size, sample.height or size, sample.steps or t.sample_steps,
               sample.guidance if sample.guidance is not None else t.sample_guidance, bool(sample.negative))
        batches.setdefault(key, []).append(column)
    return batches


def _draw(pipe, samples: list[SamplePrompt], columns: list[int], settings: tuple, config: TrainConfig) -> list:
    width, height, steps, guidance, negative = settings
    generators = [torch.Generator("cpu").manual_seed(_seed(sample, column, config))
                  for sample, column in zip(samples, columns)]
    # Read as `stylelora generate` reads a prompt: (word:1.2), [from:to:when], past 75 tokens.
    return prompt_schedule.draw(pipe, [sample.prompt for sample in samples],
                                [sample.negative for sample in samples] if negative else None, steps=steps,
                                guidance_scale=guidance, generator=generators, height=height, width=width,
                                output_type="pil").images


def _seed(sample: SamplePrompt, column: int, config: TrainConfig) -> int:
    return sample.seed if sample.seed is not None else config.train.sample_seed + column


def _save_preview(image, path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_prompts(path: Path, prompts: list[str], samples: list[SamplePrompt], config: TrainConfig) -> None:
    from stylelora.atomic import write_text_atomic

    lines = [f"column {i + 1} (seed {_seed(sample, i, config)}): {line}"
             for i, (line, sample) in enumerate(zip(prompts, samples))]
    write_text_atomic(path, "\n".join(lines) + "\n")
