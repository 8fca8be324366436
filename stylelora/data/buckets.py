"""Owns aspect-ratio bucketing: bucket sizes, image → bucket, resize-and-crop, and the one-bucket batch sampler.

Training at one square size crops away the sides of every portrait and landscape image. Buckets are a
set of (width, height) sizes with about the same area as `resolution`² (so every batch costs about the
same memory), sides multiples of `step` (the VAE/UNet downsampling factor: 8 at toy size, 64 at SD
size) and between `min_side` and `max_side`. Each image goes to the bucket nearest its aspect ratio,
is resized to cover it and cropped; a batch only holds images of one bucket so it stacks.

Bucket area is rounded *down* (never above `resolution`², as in kohya, so memory use is bounded); the
shortfall is at most `step × max_side` pixels, i.e. a few percent at SD scale.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Iterator, Sequence

from PIL import Image, ImageOps
from torch.utils.data import Sampler

Size = tuple[int, int]  # (width, height) everywhere in this module


@dataclass(frozen=True)
class BucketConfig:
    resolution: int = 32  # buckets have about resolution² pixels (512 for SD 1.5)
    step: int = 8  # sides are multiples of this (64 at SD scale)
    min_side: int = 16
    max_side: int = 64
    no_upscale: bool = False  # never give an image a bucket larger than itself

    def __post_init__(self) -> None:
        for name in ("resolution", "min_side", "max_side"):
            value = getattr(self, name)
            if self.step <= 0 or value <= 0 or value % self.step:
                raise ValueError(f"bucket {name}={value} must be a positive multiple of step={self.step} "
                                 "(the model's downsampling factor)")
        if not self.min_side <= self.resolution <= self.max_side:
            raise ValueError(f"bucket sides must satisfy min_side ≤ resolution ≤ max_side, got "
                             f"{self.min_side} ≤ {self.resolution} ≤ {self.max_side}")


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes one bucket-sized training image (all sizes (width, height))."""

    original_size: Size
    resized_size: Size
    left: int
    top: int
    bucket: Size

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in resized-image pixels, as PIL's crop takes it."""
        return self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1]


def make_buckets(config: BucketConfig) -> list[Size]:
    """All bucket sizes, sorted from tallest to widest."""
    area = config.resolution ** 2
    sizes = {(config.resolution, config.resolution)}
    for width in range(config.min_side, config.max_side + 1, config.step):
        height = min(config.max_side, (area // width) // config.step * config.step)
        if height >= config.min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes, key=lambda size: (size[0] / size[1], size[0]))


def select_bucket(width: int, height: int, config: BucketConfig, buckets: Sequence[Size] | None = None) -> Size:
    """The bucket for an image of this size: nearest aspect ratio (on a log scale, so 2:1 and 1:2 are
    equally far from square); with `no_upscale`, only buckets that fit inside the image, else a bucket
    of the image's own size rounded down to `step`."""
    buckets = list(buckets) if buckets is not None else make_buckets(config)
    if config.no_upscale:
        buckets = [b for b in buckets if b[0] <= width and b[1] <= height]
        if not buckets:
            return _own_size_bucket(width, height, config)
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b))


def _own_size_bucket(width: int, height: int, config: BucketConfig) -> Size:
    # Small images keep their size (rounded down to whole steps) instead of being blown up.
    scale = min(1.0, math.sqrt(config.resolution ** 2 / (width * height)))
    def side(length: int) -> int:
        return min(config.max_side, max(config.step, int(length * scale) // config.step * config.step))
    return side(width), side(height)


def plan_crop(image_size: Size, bucket: Size, *, random_crop: bool = False, rng: random.Random | None = None) -> CropPlan:
    """Scale to cover the bucket (aspect kept), then take a centered or random bucket-sized window."""
    width, height = image_size
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        if rng is None:
            raise ValueError("random crops need an rng (random.Random) so they are reproducible")
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        left, top = spare_x // 2, spare_y // 2
    return CropPlan(original_size=(width, height), resized_size=resized, left=left, top=top, bucket=bucket)


def resize_and_crop(image: Image.Image, plan: CropPlan, *, flip: bool = False) -> Image.Image:
    """Apply a CropPlan (and an optional horizontal flip, after cropping) to an image (RGB pixels, or its alpha)."""
    if image.size != plan.original_size:
        raise ValueError(f"crop plan made for a {plan.original_size} image, got {image.size}")
    if plan.resized_size != image.size:
        image = image.resize(plan.resized_size, Image.Resampling.LANCZOS)
    image = image.crop(plan.crop_box)
    return ImageOps.mirror(image) if flip else image


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share a bucket, in an order fixed by (seed, epoch).

    `buckets[i]` is the bucket of dataset index i. Each epoch every index appears once (the last batch
    of a bucket may be smaller unless `drop_last`). With `num_replicas` > 1 every rank builds the same
    plan and takes every num_replicas-th batch, so ranks get distinct batches; the plan is padded by
    repeating its first batches so all ranks take the same number of steps (DDP needs that).
    `state_dict()` / `load_state_dict()` save and restore the position inside an epoch exactly.
    """

    def __init__(self, buckets: Sequence[Hashable], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.buckets = list(buckets)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._resume_at = 0  # batches to skip on the next iteration (set by load_state_dict)
        self._handed_out = 0  # batches yielded so far in the current epoch

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch; a resume position only survives if it is for this same epoch."""
        if epoch != self.epoch:
            self.epoch, self._resume_at, self._handed_out = epoch, 0, 0

    def __len__(self) -> int:
        total = sum(self._batches_per_bucket(len(ids)) for ids in self._indices_by_bucket().values())
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        # Not a generator itself: the position is reset when iteration starts, not at the first batch.
        batches = self.epoch_batches(self.epoch)
        start, self._resume_at = self._resume_at, 0
        self._handed_out = start
        return self._hand_out(batches[start:])

    def _hand_out(self, batches: list[list[int]]) -> Iterator[list[int]]:
        for batch in batches:
            self._handed_out += 1
            yield batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`, in order."""
        batches = self._global_batches(epoch)
        per_rank = len(self)
        if self.drop_last:
            batches = batches[: per_rank * self.num_replicas]
        else:
            while len(batches) < per_rank * self.num_replicas:  # pad: every rank steps equally often
                batches += batches[: per_rank * self.num_replicas - len(batches)]
        return batches[self.rank:: self.num_replicas]

    def state_dict(self, position: int | None = None) -> dict:
        """Where this sampler stands. `position` = batches consumed in this epoch; by default the number
        handed out, which is exact with num_workers=0. With worker prefetching the DataLoader pulls batches
        ahead of training, so pass the trainer's own count of steps done in this epoch."""
        return {"epoch": self.epoch, "position": self._handed_out if position is None else position,
                **self._plan_identity()}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly: the next iteration continues `state`'s epoch at `state`'s position."""
        changed = [f"{name}: {state.get(name)} → {value}" for name, value in self._plan_identity().items()
                   if state.get(name) != value]
        if changed:
            raise ValueError("cannot resume the batch order exactly: the data or sampler settings changed since "
                             f"the checkpoint ({'; '.join(changed)}). Restore them, or start a new run.")
        self.epoch, self._resume_at, self._handed_out = state["epoch"], state["position"], state["position"]

    def _plan_identity(self) -> dict:
        # Not the rank: every rank steps in lockstep, so one saved state resumes them all.
        digest = hashlib.sha256(repr(self.buckets).encode()).hexdigest()[:16]
        return {"seed": self.seed, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "num_replicas": self.num_replicas,
                "dataset_size": len(self.buckets), "buckets_digest": digest}

    def _global_batches(self, epoch: int) -> list[list[int]]:
        # A private RNG per (seed, epoch): the order does not depend on what else consumed randomness.
        rng = random.Random(f"stylelora-buckets:{self.seed}:{epoch}")
        batches = []
        for indices in self._indices_by_bucket().values():  # buckets in order of first appearance
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start: start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _indices_by_bucket(self) -> dict[Hashable, list[int]]:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.buckets):
            groups[bucket].append(index)
        return groups

    def _batches_per_bucket(self, count: int) -> int:
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)
