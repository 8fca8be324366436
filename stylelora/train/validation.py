"""Owns the validation loss (kohya's --validation_split): which images are held out, and the loss measured on them.

Held-out images never train. Every measurement is the same computation on the same inputs — each image once, its
caption as written, the same timesteps and noise — so the curve moves only because the weights do, as sd-scripts
makes its own deterministic (its PR #1903). It is the training loss's weighting (min-SNR, --loss-type, --alpha-mask)
at fixed points of the schedule, without base preservation, company words or text noise: those shape training, while
this asks how well the adapter denoises images like its own that it never saw. A validation loss that rises while
the training loss falls is the usual sign of overfitting: fewer steps, or an earlier checkpoint.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

from stylelora.data.errors import DataError

if TYPE_CHECKING:
    from stylelora.config import TrainConfig
    from stylelora.data.checks import CheckedImage
    from stylelora.data.dataset import DatasetOptions, TrainingDataset

# Where on the schedule each image is scored: sd-scripts' timesteps 10, 350, 500, 650 and 990 of 1000, as fractions
# of the run's timestep range (--min-timestep to --max-timestep).
TIMESTEP_FRACTIONS = (0.01, 0.35, 0.5, 0.65, 0.99)
NAMED = 5  # held-out images named in the run's opening lines


def split_validation(kept: Sequence[CheckedImage], fraction: float, seed: int
                     ) -> tuple[list[CheckedImage], list[CheckedImage]]:
    """(training images, held-out images), drawn by `seed` in each kohya folder apart: round(fraction × its images)
    of each, but never its last one, so every folder (each concept, with its trigger) still trains; at least one
    image in all (from the largest folder) when rounding holds out none."""
    kept = list(kept)
    if fraction <= 0:
        return kept, []
    folders: dict[str, list[int]] = {}
    for index, image in enumerate(kept):
        folders.setdefault(image.item.folder, []).append(index)
    rng, held = random.Random(seed), set()
    for indices in folders.values():
        held.update(rng.sample(indices, min(len(indices) - 1, round(len(indices) * fraction))))
    largest = max(folders.values(), key=len)
    if not held and len(largest) >= 2:
        held.add(rng.choice(largest))
    if not held:
        raise DataError(f"--validation-split {fraction:g} holds out images, and no folder has 2 (each folder keeps "
                        "one to train): add images or leave the option out")
    return ([image for i, image in enumerate(kept) if i not in held],
            [image for i, image in enumerate(kept) if i in held])


def validation_note(held: Sequence[CheckedImage], total: int, train) -> str | None:
    """The run's line about the held-out images; `train`: the config's train section, which says when."""
    if not held:
        return None
    names = ", ".join(image.item.key for image in held[:NAMED]) + (", …" if len(held) > NAMED else "")
    epochs, steps = train.validate_every_n_epochs, train.validate_every  # epochs win, as with --save-every
    when = (f"every {epochs} epochs" if epochs and epochs > 1 else "at the end of each epoch" if epochs else
            f"every {steps} steps" if steps and steps > 1 else "at every step" if steps else "at the end of each epoch")
    return (f"validation: {len(held)} of {total} images held out ({names}); they never train, and their loss is "
            f"measured {when} and at the last step (metrics.csv val_loss, loss.png)")


def validation_dataset(held: Sequence[CheckedImage], options: DatasetOptions, latent_cache) -> TrainingDataset:
    """Each held-out image once, center-cropped, unflipped, its caption as written: no shuffled or dropped tags (with
    --caption-variants, one of its lines, the same one every time)."""
    from stylelora.data.captions import CaptionOptions
    from stylelora.data.dataset import TrainingDataset

    once = [replace(image, item=replace(image.item, repeats=1)) for image in held]
    fixed = replace(options, captions=CaptionOptions(variants=options.captions.variants), random_crop=False,
                    flip=False)
    return TrainingDataset(once, fixed, latent_cache=latent_cache)


@dataclass
class Validation:
    """The held-out images' loader and how many of its batches one measurement takes (None: all)."""

    loader: torch.utils.data.DataLoader
    max_batches: int | None
    seed: int


def build_validation(config: TrainConfig, dataset: TrainingDataset, accelerator) -> Validation:
    from stylelora.data.buckets import BucketBatchSampler
    from stylelora.data.dataset import collate_samples

    # Every process scores its share of the batches; measure() adds the shares up.
    sampler = BucketBatchSampler(dataset.buckets, config.train.batch_size, seed=validation_seed(config),
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=0)
    return Validation(loader=loader, max_batches=config.train.max_validation_steps, seed=validation_seed(config))


def validation_seed(config: TrainConfig) -> int:
    return config.data.validation_seed if config.data.validation_seed is not None else config.train.seed


def measure(validation: Validation, models, noise_scheduler, config: TrainConfig, accelerator, modules) -> float:
    """The mean loss over the held-out images (all processes together), with `modules` in eval mode (LoRA dropouts
    off) and every random generator the training draws from left as it was, so that a resume stays exact."""
    from stylelora.train.step import validation_losses

    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, image count
    with torch.no_grad(), evaluating(modules), torch.random.fork_rng(devices=_cuda_devices(accelerator)):
        generator = torch.Generator().manual_seed(validation.seed)
        for index, batch in enumerate(validation.loader):
            if validation.max_batches is not None and index >= validation.max_batches:
                break
            with accelerator.autocast():
                losses = validation_losses(batch, models, noise_scheduler, config, generator, TIMESTEP_FRACTIONS)
            total += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)))]).to(total.device)
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] else float("nan")


def _cuda_devices(accelerator) -> list:
    device = torch.device(accelerator.device)
    return [device] if device.type == "cuda" else []


@contextlib.contextmanager
def evaluating(modules):
    """The modules in eval mode for the block, then back to the mode each was in."""
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
