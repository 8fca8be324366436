"""Owns the torch Dataset over checked images: repeats, bucket-sized pixels (or cached latents), per-epoch captions.

Index i is one (image, repeat) pair; `buckets` gives each index's bucket for `BucketBatchSampler`. An item
is a dict:
    pixels (3,H,W) float in [-1, 1]   — or `latents` when a LatentCache is attached
    caption str (after shuffle/dropout for this epoch), key str (stable image id: "folder/name"), index int
    loss_weight float: 1 for a training image, prior_loss_weight for a regularization image
    alpha_mask (H,W) float in [0, 1]   — with `alpha_mask`: the image's alpha, cropped and flipped as its pixels
    bucket (width, height), flipped bool,
    original_size (h, w), crops_coords_top_left (top, left), target_size (h, w)  — SDXL-style bookkeeping
Every random choice (flip, random crop, caption) comes from a generator private to (seed, epoch, index),
so items do not depend on worker count or sample order; call `set_epoch` before each epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from stylelora.data.buckets import BucketConfig, CropPlan, make_buckets, plan_crop, resize_and_crop, select_bucket
from stylelora.data.captions import CaptionOptions, process_caption, sample_rng
from stylelora.data.checks import CheckedImage, load_alpha_mask, load_rgb_image
from stylelora.data.latent_cache import LatentCache, LatentKey


@dataclass(frozen=True)
class DatasetOptions:
    buckets: BucketConfig = field(default_factory=BucketConfig)
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    random_crop: bool = False  # False: center crop (required with a latent cache)
    flip: bool = False  # horizontal flip with probability 1/2 per sample and epoch
    alpha_mask: bool = False  # each item carries its image's alpha, for a masked loss
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    image: CheckedImage
    repeat: int  # 0 .. repeats-1
    bucket: tuple[int, int]  # (width, height)
    loss_weight: float = 1.0


class TrainingDataset(Dataset):
    def __init__(self, images: Sequence[CheckedImage], options: DatasetOptions = DatasetOptions(), *,
                 latent_cache: LatentCache | None = None, reg_images: Sequence[CheckedImage] = (),
                 prior_loss_weight: float = 1.0):
        """images, then reg_images (kohya's regularization set), each `repeats` times; a reg sample's loss weighs
        prior_loss_weight."""
        if latent_cache is not None and options.random_crop:
            raise ValueError("random crops cannot use the latent cache: every epoch would need a new encode. "
                             "Turn off random_crop (center crops) or turn off latent caching.")
        self.options, self.latent_cache, self.epoch = options, latent_cache, 0
        bucket_sizes = make_buckets(options.buckets)
        self.samples = [
            Sample(image, repeat, select_bucket(image.width, image.height, options.buckets, bucket_sizes), weight)
            for group, weight in ((images, 1.0), (reg_images, prior_loss_weight))
            for image in group for repeat in range(image.item.repeats)
        ]

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Bucket of each index, for BucketBatchSampler."""
        return [sample.bucket for sample in self.samples]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        plan, flipped = self.crop_plan(index), self.is_flipped(index)
        caption_rng = sample_rng(self.options.seed, self.epoch, index, "caption")
        item = {
            "caption": process_caption(sample.image.item.caption, self.options.captions, caption_rng,
                                       sample.image.item.variants),
            "key": sample.image.item.key, "index": index, "bucket": sample.bucket, "flipped": flipped,
            "loss_weight": sample.loss_weight,
            **_sdxl_sizes(plan, flipped),
        }
        if self.options.alpha_mask:
            item["alpha_mask"] = self.alpha_mask(index, plan, flipped)
        if self.latent_cache is not None:
            key = self.latent_key(index)
            if get_worker_info() is not None and key not in self.latent_cache:
                # A DataLoader worker must not run the VAE (it may live on the GPU of the main process).
                raise RuntimeError("latent missing from the cache inside a DataLoader worker: call "
                                   "dataset.cache_latents() before training, or use num_workers=0")
            item["latents"] = self.latent_cache.get_or_encode(key, lambda: self.pixels(index, plan, flipped))
        else:
            item["pixels"] = self.pixels(index, plan, flipped)
        return item

    def crop_plan(self, index: int) -> CropPlan:
        sample = self.samples[index]
        rng = sample_rng(self.options.seed, self.epoch, index, "crop") if self.options.random_crop else None
        return plan_crop((sample.image.width, sample.image.height), sample.bucket,
                         random_crop=self.options.random_crop, rng=rng)

    def is_flipped(self, index: int) -> bool:
        if not self.options.flip:
            return False
        return sample_rng(self.options.seed, self.epoch, index, "flip").random() < 0.5

    def pixels(self, index: int, plan: CropPlan, flipped: bool) -> torch.Tensor:
        """(3,H,W) float32 in [-1, 1] at the bucket size."""
        image = resize_and_crop(load_rgb_image(self.samples[index].image.path), plan, flip=flipped)
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)

    def alpha_mask(self, index: int, plan: CropPlan, flipped: bool) -> torch.Tensor:
        """(H,W) float32 in [0, 1] at the bucket size: the alpha under each of `pixels`' pixels."""
        mask = resize_and_crop(load_alpha_mask(self.samples[index].image.path), plan, flip=flipped)
        return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)

    def latent_key(self, index: int, flipped: bool | None = None) -> LatentKey:
        if self.latent_cache is None:
            raise ValueError("this dataset has no latent cache; pass latent_cache=LatentCache(...)")
        flipped = self.is_flipped(index) if flipped is None else flipped
        sample, plan = self.samples[index], self.crop_plan(index)
        return self.latent_cache.key(sample.image.sha256, sample.bucket, plan.crop_box, flipped)

    def latent_requests(self) -> list[tuple[LatentKey, Callable[[], torch.Tensor]]]:
        """One request per distinct latent the training can ask for (both flips when flipping is on)."""
        requests, seen = [], set()
        for index, sample in enumerate(self.samples):
            for flipped in ((False, True) if self.options.flip else (False,)):
                key = self.latent_key(index, flipped)
                if key not in seen:  # repeats of an image share its latents
                    seen.add(key)
                    plan = self.crop_plan(index)
                    requests.append((key, lambda i=index, p=plan, f=flipped: self.pixels(i, p, f)))
        return requests

    def cache_latents(self, batch_size: int = 8, max_pixels: int | None = None) -> int:
        """Encode every latent not cached yet, before training; returns how many were encoded."""
        if self.latent_cache is None:
            raise ValueError("this dataset has no latent cache; pass latent_cache=LatentCache(...)")
        return self.latent_cache.fill(self.latent_requests(), batch_size=batch_size, max_pixels=max_pixels)


def collate_samples(items: list[dict]) -> dict:
    """Stack one bucket's items into a batch (tensors stacked, everything else as lists)."""
    batch = {name: [item[name] for item in items] for name in items[0]}
    for name in ("pixels", "latents", "alpha_mask"):
        if name in batch:
            batch[name] = torch.stack(batch[name])
    return batch


def _sdxl_sizes(plan: CropPlan, flipped: bool) -> dict:
    # As kohya does, a flipped image reports the crop measured from the other side.
    left = plan.resized_size[0] - plan.bucket[0] - plan.left if flipped else plan.left
    return {"original_size": (plan.original_size[1], plan.original_size[0]),
            "crops_coords_top_left": (plan.top, left),
            "target_size": (plan.bucket[1], plan.bucket[0])}

