"""Dataset + latent / text-encoder caches: encode once, re-encode on any change, never serve stale latents."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from stylelora.data.buckets import BucketBatchSampler, BucketConfig
from stylelora.data.captions import CaptionOptions
from stylelora.data.checks import check_items
from stylelora.data.dataset import DatasetOptions, TrainingDataset, collate_samples
from stylelora.data.latent_cache import LatentCache, TextEmbeddingCache, model_identity
from stylelora.data.scan import scan_folder


class CountingEncoder:
    """Stands in for a VAE: an 8× average pool, counting how often and on what it runs."""

    def __init__(self):
        self.calls, self.samples = 0, 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.ndim == 4 and pixels.shape[1] == 3 and pixels.min() >= -1 and pixels.max() <= 1
        self.calls += 1
        self.samples += len(pixels)
        return torch.nn.functional.avg_pool2d(pixels, 8)


def _folder(root: Path) -> Path:
    """Kohya layout with square, landscape and portrait images, left half red and right half blue."""
    sizes = {"a.png": (40, 40), "b.png": (48, 48), "wide.png": (80, 48), "tall.png": (48, 80)}
    for name, size in sizes.items():
        image = Image.new("RGB", size, (255, 0, 0))
        image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
        (root / "2_zorb").mkdir(parents=True, exist_ok=True)
        image.save(root / "2_zorb" / name)
        (root / "2_zorb" / name).with_suffix(".txt").write_text(f"zorb, {name[:-4]}, red, blue")
    return root


def _dataset(root: Path, cache: LatentCache | None = None, **options) -> TrainingDataset:
    items, _ = scan_folder(root)
    images = check_items(items).kept
    return TrainingDataset(images, DatasetOptions(buckets=BucketConfig(), **options), latent_cache=cache)


def test_dataset_items_are_bucket_sized_pixels_in_range(tmp_path):
    dataset = _dataset(_folder(tmp_path), captions=CaptionOptions(shuffle_tags=True, keep_tokens=1))
    assert len(dataset) == 8  # 4 images × 2 repeats
    for index in range(len(dataset)):
        item = dataset[index]
        width, height = item["bucket"]
        assert item["pixels"].shape == (3, height, width) and item["pixels"].dtype == torch.float32
        assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
        assert item["caption"].startswith("zorb, ")
        assert item["target_size"] == (height, width)
    wide = next(dataset[i] for i in range(len(dataset)) if dataset[i]["key"] == "2_zorb/wide.png")
    assert wide["bucket"] == (40, 24) and wide["original_size"] == (48, 80)
    assert wide["pixels"][0, 12, 2] == 1.0 and wide["pixels"][2, 12, 37] == 1.0  # red left, blue right


def test_flip_and_captions_vary_by_epoch_but_are_reproducible(tmp_path):
    root = _folder(tmp_path)
    options = dict(flip=True, captions=CaptionOptions(shuffle_tags=True, keep_tokens=1))
    first, second = _dataset(root, **options), _dataset(root, **options)
    flips = {}
    for epoch in range(4):
        first.set_epoch(epoch)
        flips[epoch] = [first.is_flipped(i) for i in range(8)]
    assert any(flips.values()) and len({tuple(f) for f in flips.values()}) > 1
    for epoch in range(3):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for index in range(8):
            a, b = first[index], second[index]
            assert a["caption"] == b["caption"] and a["flipped"] == b["flipped"]
            assert torch.equal(a["pixels"], b["pixels"])
            if a["flipped"]:  # flipped: blue now on the left
                assert a["pixels"][2, 0, 1] == 1.0


def test_dataloader_with_bucket_sampler_stacks_one_bucket_per_batch(tmp_path):
    dataset = _dataset(_folder(tmp_path))
    sampler = BucketBatchSampler(dataset.buckets, batch_size=2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples)
    batches = list(loader)
    assert len(batches) == len(sampler) == 4
    for batch in batches:
        assert batch["pixels"].shape[0] == 2 and len(set(batch["bucket"])) == 1


def test_second_pass_does_not_call_the_encoder(tmp_path):
    encoder = CountingEncoder()
    cache = LatentCache(encoder, vae_id="toy-vae@1")
    dataset = _dataset(_folder(tmp_path), cache)
    assert dataset.cache_latents(batch_size=8) == 4  # repeats share one latent each
    assert encoder.samples == 4 and encoder.calls == 3  # three distinct bucket sizes → three batches
    assert dataset.cache_latents() == 0
    for index in range(len(dataset)):
        item = dataset[index]
        width, height = item["bucket"]
        assert item["latents"].shape == (3, height // 8, width // 8) and "pixels" not in item
    assert encoder.calls == 3 and cache.stats.hits == len(dataset)


@pytest.mark.parametrize("images_per_batch, calls", [(1, 4), (2, 3)])
def test_a_pixel_budget_bounds_how_many_images_the_vae_sees_at_once(tmp_path, images_per_batch, calls):
    """Large images are encoded a few (or one) at a time: the VAE's activations grow with the pixels it sees."""
    encoder = CountingEncoder()
    dataset = _dataset(_folder(tmp_path), LatentCache(encoder, vae_id="toy-vae@1"))
    largest = max(width * height for width, height in dataset.buckets)
    assert dataset.cache_latents(batch_size=8, max_pixels=images_per_batch * largest) == 4
    assert encoder.samples == 4 and encoder.calls == calls  # the two square images share a batch only at 2


def test_disk_cache_persists_atomically_and_is_read_lazily(tmp_path):
    root, cache_dir = _folder(tmp_path / "data"), tmp_path / "cache"
    first = CountingEncoder()
    _dataset(root, LatentCache(first, "toy-vae@1", cache_dir)).cache_latents()
    files = sorted(cache_dir.glob("*/*.safetensors"))
    assert len(files) == 4 and not list(cache_dir.rglob("*.tmp"))

    second = CountingEncoder()  # a new run: same files, same VAE
    cache = LatentCache(second, "toy-vae@1", cache_dir)
    dataset = _dataset(root, cache)
    assert dataset.cache_latents() == 0 and second.calls == 0
    latents = dataset[0]["latents"]
    assert cache.store.tensors_in_memory == 0  # nothing kept in RAM
    flipped = dataset.is_flipped(0)
    expected = CountingEncoder()(dataset.pixels(0, dataset.crop_plan(0), flipped)[None])[0]
    assert torch.equal(latents, expected)


def test_changed_image_content_is_re_encoded_alone(tmp_path):
    root = _folder(tmp_path / "data")
    encoder = CountingEncoder()
    _dataset(root, LatentCache(encoder, "toy-vae@1", tmp_path / "cache")).cache_latents()
    Image.new("RGB", (40, 40), (0, 255, 0)).save(root / "2_zorb" / "a.png")  # same name, new pixels

    encoder = CountingEncoder()
    dataset = _dataset(root, LatentCache(encoder, "toy-vae@1", tmp_path / "cache"))
    assert dataset.cache_latents() == 1 and encoder.samples == 1
    index = next(i for i in range(len(dataset)) if dataset[i]["key"] == "2_zorb/a.png")
    assert dataset[index]["latents"][1].mean() == 1.0  # green, not the stale red/blue latent


def test_another_vae_re_encodes_everything(tmp_path):
    root = _folder(tmp_path / "data")
    _dataset(root, LatentCache(CountingEncoder(), "toy-vae@1", tmp_path / "cache")).cache_latents()
    encoder = CountingEncoder()
    assert _dataset(root, LatentCache(encoder, "toy-vae@2", tmp_path / "cache")).cache_latents() == 4
    assert encoder.samples == 4


def test_flip_variants_are_cached_separately(tmp_path):
    encoder = CountingEncoder()
    dataset = _dataset(_folder(tmp_path), LatentCache(encoder, "toy-vae@1"), flip=True)
    assert dataset.cache_latents() == 8 and encoder.samples == 8
    index = 0
    plain, mirrored = (dataset.latent_cache.get_or_encode(dataset.latent_key(index, f), lambda: None)
                       for f in (False, True))
    assert torch.allclose(mirrored, plain.flip(-1), atol=1e-6)  # same pixels, summed in another order
    assert not torch.allclose(mirrored, plain)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        assert [dataset[i]["latents"].shape for i in range(8)]
    assert encoder.samples == 8


def test_corrupt_cache_file_is_recomputed(tmp_path):
    root, cache_dir = _folder(tmp_path / "data"), tmp_path / "cache"
    _dataset(root, LatentCache(CountingEncoder(), "toy-vae@1", cache_dir)).cache_latents()
    victim = sorted(cache_dir.glob("*/*.safetensors"))[0]
    victim.write_bytes(b"garbage")
    encoder = CountingEncoder()
    dataset = _dataset(root, LatentCache(encoder, "toy-vae@1", cache_dir))
    for index in range(len(dataset)):
        dataset[index]
    assert encoder.samples == 1


def test_random_crop_cannot_use_the_latent_cache(tmp_path):
    with pytest.raises(ValueError, match="random crops cannot use the latent cache"):
        _dataset(_folder(tmp_path), LatentCache(CountingEncoder(), "toy-vae@1"), random_crop=True)


@pytest.mark.parametrize("cache_dir", [None, "te-cache"])
def test_text_embedding_cache(tmp_path, cache_dir):
    calls = []

    def encode(captions: list[str]) -> torch.Tensor:
        calls.append(list(captions))
        return torch.stack([torch.full((3, 4), float(len(c))) for c in captions])

    directory = tmp_path / cache_dir if cache_dir else None
    cache = TextEmbeddingCache(encode, "toy-clip@1", directory)
    first = cache.get_or_encode(["zorb, red", "", "zorb, red"])
    assert first.shape == (3, 3, 4) and calls == [["zorb, red", ""]]
    assert torch.equal(cache.get_or_encode(["", "zorb, red"]), first[[1, 0]]) and len(calls) == 1
    other = TextEmbeddingCache(encode, "toy-clip@2", directory)
    other.get_or_encode([""])
    assert calls[-1] == [""]


def test_model_identity_changes_with_weights_and_dtype():
    model = torch.nn.Linear(4, 2)
    before = model_identity("vae", model)
    assert before == model_identity("vae", model) and before.startswith("vae@")
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert model_identity("vae", model) != before
    assert model_identity("vae", model.half()) != model_identity("vae", model.float())


def test_missing_identity_is_refused():
    with pytest.raises(ValueError, match="vae_id must name"):
        LatentCache(CountingEncoder(), "")


def test_caption_variants_give_an_image_each_of_its_lines_across_epochs(tmp_path):
    """A caption file of two lines with --caption-variants trains the image on one line at a time (kohya's
    --enable_wildcard), drawn per epoch; without it, on both lines joined as tags."""
    folder = _folder(tmp_path)
    (folder / "2_zorb" / "a.txt").write_text("zorb, a red zorb on a beige background\nzorb, a red zorb\n")
    seen = {}
    for variants in (False, True):
        dataset = _dataset(folder, captions=CaptionOptions(variants=variants))
        index = next(i for i in range(len(dataset)) if dataset[i]["key"] == "2_zorb/a.png")
        captions = set()
        for epoch in range(12):
            dataset.set_epoch(epoch)
            captions.add(dataset[index]["caption"])
        seen[variants] = captions
    assert seen[False] == {"zorb, a red zorb on a beige background, zorb, a red zorb"}
    assert seen[True] == {"zorb, a red zorb on a beige background", "zorb, a red zorb"}


def test_alpha_masks_follow_the_pixels_through_crop_and_flip(tmp_path):
    """--alpha-mask: each item's mask is its image's alpha where its pixels came from (the transparent right half
    of a cut-out, mirrored when the image is), 1 everywhere in an image without alpha; batches stack them."""
    root = _folder(tmp_path)
    cutout = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    cutout.paste((0, 0, 0, 0), (20, 0, 40, 40))
    cutout.save(root / "2_zorb" / "a.png")  # replaces the opaque a.png
    dataset = _dataset(root, flip=True, alpha_mask=True)
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            mask = item["alpha_mask"]
            assert mask.shape == item["pixels"].shape[1:]
            if not item["key"].endswith("a.png"):
                assert torch.equal(mask, torch.ones_like(mask))
                continue
            left, right = mask[:, :mask.shape[1] // 2 - 1], mask[:, mask.shape[1] // 2 + 1:]
            opaque, clear = (right, left) if item["flipped"] else (left, right)
            assert opaque.min() > 0.99 and clear.max() < 0.01
            assert (item["pixels"][:, mask < 0.01] > 0.99).all()  # the transparent part trains as white
            seen.add(item["flipped"])
    assert seen == {True, False}
    batch = collate_samples([dataset[0], dataset[1]])
    assert batch["alpha_mask"].shape == (2, *dataset[0]["alpha_mask"].shape)
    assert "alpha_mask" not in _dataset(root)[0]  # only when asked
