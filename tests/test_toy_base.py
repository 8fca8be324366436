"""The shipped toy base: a real diffusers folder that loads like any SD checkpoint, small, and scored reproducibly."""
import json
from pathlib import Path

import pytest

from stylelora.toy.base_build import TOY_BASE_DIR


def test_toy_base_is_a_diffusers_folder_under_20_mb():
    index = json.loads((TOY_BASE_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (TOY_BASE_DIR / part).is_dir(), part
    size = sum(p.stat().st_size for p in TOY_BASE_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024


def test_toy_base_loads_with_from_pretrained_and_generates():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_BASE_DIR, torch_dtype=torch.float32)
    assert pipe.tokenizer.model_max_length == 77
    image = pipe("a red circle on a white background", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_load_base_toy_uses_the_same_path_as_any_folder():
    import torch

    from stylelora.models.load import load_base

    by_name, by_folder = load_base("toy"), load_base(str(TOY_BASE_DIR))
    for a, b in zip(by_name.unet.state_dict().values(), by_folder.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert by_name.unet.dtype == torch.float32  # fp16 on disk, fp32 on CPU by default


def test_evaluate_same_seed_same_numbers():
    from stylelora.cli import main
    import io, contextlib

    outputs = []
    for _ in range(2):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["evaluate", "--samples", "4", "--steps", "6", "--json"]) == 0
        outputs.append(json.loads(buf.getvalue()))
    assert outputs[0] == outputs[1]
    assert outputs[0]["settings"]["images"] == 16
    assert 0.0 <= outputs[0]["shape_accuracy"] <= 1.0
