"""Shared helpers of the app tests: LoRA adapters for the shipped toy base, a tiny training folder, and the
config files of an SD-sized base.

The adapters are random but seeded (the same seed gives the same file), made with the project's own LoRA injection
and writer, so they carry the kohya keys and metadata (trigger words) a trained adapter has. The single test here
checks they do what the app tests rely on: each loads on the toy base and visibly changes its images.
"""
from __future__ import annotations

import shutil
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
STRIPES = REPO / "datasets" / "toy-stripes"
PROMPT = "a red circle on a white background"
_BASE_CACHE: dict = {}


def toy_base():
    """The toy base, loaded once per test process (tests that need their own copy load it themselves)."""
    if "toy" not in _BASE_CACHE:
        from stylelora.models.load import load_base

        pipe = load_base("toy", device="cpu")
        pipe.set_progress_bar_config(disable=True)
        _BASE_CACHE["toy"] = pipe
    return _BASE_CACHE["toy"]


def make_toy_adapter(path: Path, seed: int, *, trigger: str = "style", rank: int = 4, scale: float = 0.15) -> Path:
    """A seeded random LoRA (UNet + text encoder) for the toy base, written in kohya format with metadata."""
    import copy

    import torch

    from stylelora.lora.inject import add_lora
    from stylelora.lora.io import kohya_metadata, save_adapter

    base = toy_base()
    unet, text_encoder = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    torch.manual_seed(seed)
    add_lora(unet, text_encoder, rank=rank, alpha=float(rank), unet_targets="kohya", train_text_encoder=True,
             init_lora_weights=False)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)  # random init is as large as the weights: keep the images recognisable
    folder = f"10_{trigger}"
    metadata = kohya_metadata(
        rank=rank, alpha=float(rank), output_name=Path(path).stem, tag_frequency={folder: {trigger: 30}},
        dataset_dirs={folder: {"n_repeats": 10, "img_count": 30}}, num_train_images=300, steps=100,
        learning_rate=1e-3, unet_lr=1e-3, text_encoder_lr=2e-4, resolution=32,
        training_started_at=1700000000.0, trigger_phrase=trigger,
    )
    return save_adapter(Path(path), unet, text_encoder, metadata=metadata, fmt="kohya")


def broken_adapter(source: Path, target: Path, how: str) -> Path:
    """A copy of an adapter file, broken: "nan" (one tensor NaN, one inf) or "other-base" (every UNet module
    twice as wide, as an adapter of a bigger base of the same layout would be)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(source))
    keys = sorted(key for key in state if key.endswith(".lora_up.weight"))
    if how == "nan":
        state[keys[0]] = torch.full_like(state[keys[0]], float("nan"))
        state[keys[-1]] = torch.full_like(state[keys[-1]], float("inf"))
    else:
        for key in keys:
            if key.startswith("lora_unet_"):
                state[key] = torch.cat([state[key], state[key]])
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata=metadata)
    return target


def tiny_dataset(root: Path, count: int = 4) -> Path:
    """A few images + captions copied from datasets/toy-stripes, in its kohya layout."""
    source = next(p for p in sorted(STRIPES.iterdir()) if p.is_dir())
    target = root / source.name
    target.mkdir(parents=True)
    for image in sorted(source.glob("*.png"))[:count]:
        shutil.copy(image, target / image.name)
        caption = image.with_suffix(".txt")
        if caption.is_file():
            shutil.copy(caption, target / caption.name)
    return root


def sd_sized_base(folder: Path) -> Path:
    """The config files of a base with SD 1.x's geometry (512 px native, sides a multiple of 64), no weights."""
    import json

    for name, config in (("model_index.json", {"_class_name": "StableDiffusionPipeline"}),
                         ("unet/config.json", {"sample_size": 64, "down_block_types": ["CrossAttnDownBlock2D"] * 4,
                                               "cross_attention_dim": 768}),
                         ("vae/config.json", {"block_out_channels": [128, 256, 512, 512]})):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    return folder


def test_fixture_adapters_change_toy_images(tmp_path):
    import numpy

    from stylelora.generate.generate import GenerateRequest, generate

    first = make_toy_adapter(tmp_path / "a.safetensors", seed=1, trigger="stripestyle")
    again = make_toy_adapter(tmp_path / "again" / "a.safetensors", seed=1, trigger="stripestyle")
    from safetensors.torch import load_file

    tensors, tensors_again = load_file(str(first)), load_file(str(again))
    assert tensors.keys() == tensors_again.keys() and all(tensors[k].equal(tensors_again[k]) for k in tensors)
    pipe = toy_base()
    request = GenerateRequest(PROMPT, steps=4, seed=3)
    plain = numpy.asarray(generate(pipe, None, request)[0].image, dtype=float)
    styled = numpy.asarray(generate(pipe, None, GenerateRequest(PROMPT, steps=4, seed=3, loras=(first,)))[0].image,
                           dtype=float)
    difference = numpy.abs(plain - styled).mean()
    assert 2 < difference < 120, f"mean pixel change {difference:.1f}: the adapter should change, not wreck, images"
    data = tiny_dataset(tmp_path / "data", count=3)
    assert len(list(data.rglob("*.png"))) == 3
