"""Aspect-ratio buckets, crop plans and the one-bucket batch sampler (determinism, resume, DDP shards)."""

import math
import random

import pytest
from PIL import Image

from stylelora.data.buckets import (BucketBatchSampler, BucketConfig, make_buckets, plan_crop, resize_and_crop,
                                   select_bucket)

TOY = BucketConfig(resolution=32, step=8, min_side=16, max_side=64)
SD = BucketConfig(resolution=512, step=64, min_side=256, max_side=1024)


@pytest.mark.parametrize("config, min_area_ratio", [(TOY, 0.75), (SD, 0.8)])
def test_buckets_preserve_area_and_respect_step_and_sides(config, min_area_ratio):
    buckets = make_buckets(config)
    area = config.resolution ** 2
    assert (config.resolution, config.resolution) in buckets
    for width, height in buckets:
        assert width % config.step == 0 and height % config.step == 0
        assert config.min_side <= min(width, height) and max(width, height) <= config.max_side
        assert area - config.step * config.max_side <= width * height <= area  # the documented tolerance
        assert width * height >= min_area_ratio * area
        assert (height, width) in buckets  # portrait and landscape alike


@pytest.mark.parametrize("kwargs, message", [
    (dict(resolution=30), "multiple of step"),
    (dict(min_side=40), "min_side ≤ resolution ≤ max_side"),
    (dict(step=0), "multiple of step"),
])
def test_bad_bucket_config_explains_itself(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BucketConfig(**kwargs)


@pytest.mark.parametrize("size, expected", [
    ((64, 64), (32, 32)),
    ((500, 500), (32, 32)),
    ((80, 48), (40, 24)),
    ((48, 80), (24, 40)),
    ((400, 100), (64, 16)),
    ((100, 400), (16, 64)),
])
def test_image_goes_to_the_nearest_aspect_bucket(size, expected):
    assert select_bucket(*size, TOY) == expected


@pytest.mark.parametrize("size", [(20, 20), (30, 17), (50, 40), (33, 90), (64, 64), (300, 200)])
def test_no_upscale_never_picks_a_bucket_larger_than_the_image(size):
    config = BucketConfig(resolution=32, step=8, min_side=16, max_side=64, no_upscale=True)
    width, height = select_bucket(*size, config)
    assert width <= size[0] and height <= size[1]
    assert width % 8 == 0 and height % 8 == 0


def test_no_upscale_small_image_keeps_its_own_size():
    config = BucketConfig(resolution=512, step=64, min_side=256, max_side=1024, no_upscale=True)
    assert select_bucket(300, 300, config) == (256, 256)
    assert select_bucket(1000, 1000, config) == (512, 512)  # big images still shrink to the base area


@pytest.mark.parametrize("image_size, bucket, resized, offset", [
    ((64, 64), (32, 32), (32, 32), (0, 0)),
    ((100, 50), (40, 24), (48, 24), (4, 0)),
    ((50, 100), (24, 40), (24, 48), (0, 4)),
    ((20, 20), (32, 32), (32, 32), (0, 0)),  # upscale when allowed
])
def test_center_crop_plan(image_size, bucket, resized, offset):
    plan = plan_crop(image_size, bucket)
    assert (plan.resized_size, (plan.left, plan.top)) == (resized, offset)
    assert plan.crop_box == (offset[0], offset[1], offset[0] + bucket[0], offset[1] + bucket[1])


def test_random_crop_is_reproducible_and_in_range():
    plans = [plan_crop((100, 50), (40, 24), random_crop=True, rng=random.Random(seed)) for seed in range(50)]
    assert {p.top for p in plans} == {0} and {p.left for p in plans} <= set(range(9))
    assert len({p.left for p in plans}) > 3
    again = plan_crop((100, 50), (40, 24), random_crop=True, rng=random.Random(3))
    assert again == plans[3]


def test_resize_and_crop_size_and_flip():
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    image.paste((0, 0, 255), (50, 0, 100, 50))  # left red, right blue
    plan = plan_crop(image.size, (40, 24))
    plain, flipped = resize_and_crop(image, plan), resize_and_crop(image, plan, flip=True)
    assert plain.size == flipped.size == (40, 24)
    assert plain.getpixel((2, 12)) == (255, 0, 0) and flipped.getpixel((2, 12)) == (0, 0, 255)
    with pytest.raises(ValueError, match="crop plan made for"):
        resize_and_crop(image.resize((10, 10)), plan)


# ---- sampler ---------------------------------------------------------------------------------------------

BUCKETS = [(32, 32)] * 23 + [(40, 24)] * 10 + [(24, 40)] * 7 + [(64, 16)] * 1


def _all(sampler: BucketBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("batch_size, drop_last", [(1, False), (4, False), (4, True), (8, False)])
def test_batches_come_from_one_bucket_and_cover_every_index_once(batch_size, drop_last):
    sampler = BucketBatchSampler(BUCKETS, batch_size, seed=1, drop_last=drop_last)
    batches = _all(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len({BUCKETS[i] for i in batch}) == 1
        assert len(batch) == batch_size or not drop_last
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    if not drop_last:
        assert sorted(seen) == list(range(len(BUCKETS)))


def test_order_is_fixed_by_seed_and_epoch():
    first = _all(BucketBatchSampler(BUCKETS, 4, seed=5), epoch=2)
    assert first == _all(BucketBatchSampler(BUCKETS, 4, seed=5), epoch=2)
    assert first != _all(BucketBatchSampler(BUCKETS, 4, seed=5), epoch=3)
    assert first != _all(BucketBatchSampler(BUCKETS, 4, seed=6), epoch=2)
    ordered = _all(BucketBatchSampler(BUCKETS, 4, shuffle=False))
    assert ordered[0] == [0, 1, 2, 3]


@pytest.mark.parametrize("stop_after", [0, 1, 5, 12])
def test_resume_continues_exactly_where_it_stopped(stop_after):
    sampler = BucketBatchSampler(BUCKETS, 4, seed=9)
    sampler.set_epoch(3)
    full = list(sampler)
    iterator = iter(sampler)
    done = [next(iterator) for _ in range(stop_after)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["position"] == stop_after

    resumed = BucketBatchSampler(BUCKETS, 4, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a trainer calls this at the start of the epoch: it must keep the position
    assert done + list(resumed) == full
    assert list(resumed) == full  # the position is used once; the next pass is a whole epoch
    resumed.set_epoch(4)
    assert list(resumed) == _all(BucketBatchSampler(BUCKETS, 4, seed=9), epoch=4)


def test_state_dict_takes_the_trainers_step_count_when_workers_prefetch():
    sampler = BucketBatchSampler(BUCKETS, 4, seed=9)
    list(sampler)  # as if a DataLoader pulled the whole epoch ahead
    state = sampler.state_dict(position=2)
    resumed = BucketBatchSampler(BUCKETS, 4, seed=9)
    resumed.load_state_dict(state)
    assert list(resumed) == _all(BucketBatchSampler(BUCKETS, 4, seed=9))[2:]


@pytest.mark.parametrize("change", [dict(seed=1), dict(batch_size=2), dict(buckets=BUCKETS[:-1]),
                                    dict(buckets=BUCKETS[::-1])])
def test_resume_refuses_a_changed_plan(change):
    state = BucketBatchSampler(BUCKETS, 4, seed=9).state_dict()
    kwargs = dict(buckets=BUCKETS, batch_size=4, seed=9) | change
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        BucketBatchSampler(kwargs.pop("buckets"), **kwargs).load_state_dict(state)


@pytest.mark.parametrize("replicas, drop_last", [(2, False), (3, False), (4, True), (2, True)])
def test_ddp_ranks_get_distinct_batches_and_equal_step_counts(replicas, drop_last):
    shards = [_all(BucketBatchSampler(BUCKETS, 2, seed=4, num_replicas=replicas, rank=r, drop_last=drop_last),
                   epoch=1) for r in range(replicas)]
    assert len({len(shard) for shard in shards}) == 1
    single = _all(BucketBatchSampler(BUCKETS, 2, seed=4, drop_last=drop_last), epoch=1)
    per_rank = len(shards[0])
    distinct = min(len(single), per_rank * replicas)  # beyond this, batches are padding repeats
    interleaved = [shards[r][k] for k in range(per_rank) for r in range(replicas)]
    assert interleaved[:distinct] == single[:distinct]
    unpadded = [tuple(b) for b in interleaved[:distinct]]
    assert len(set(unpadded)) == len(unpadded)
    indices = [i for batch in unpadded for i in batch]
    assert len(indices) == len(set(indices))  # no image twice across ranks within the real batches
    if not drop_last:
        assert sorted(indices) == list(range(len(BUCKETS)))
        assert per_rank == math.ceil(len(single) / replicas)


def test_ddp_shards_are_disjoint_when_batches_divide_evenly():
    buckets = [(32, 32)] * 16 + [(40, 24)] * 8  # 12 batches of 2 → 3 per rank on 4 ranks
    shards = [set(map(tuple, _all(BucketBatchSampler(buckets, 2, num_replicas=4, rank=r)))) for r in range(4)]
    assert all(len(s) == 3 for s in shards)
    assert len(set().union(*shards)) == 12


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank must be in"):
        BucketBatchSampler(BUCKETS, 2, num_replicas=2, rank=2)
