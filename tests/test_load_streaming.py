"""The base loader's streamed weights (stylelora.models.load): read tensor by tensor straight into the run's dtype,
identical to what diffusers / transformers load, sharded files too; anything it cannot read exactly is left to them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from stylelora.models import load
from stylelora.models.load import BaseModelError, load_base

COMPONENTS = ("unet", "vae", "text_encoder")


def library_pipeline(folder: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)


def assert_same_weights(ours, theirs) -> None:
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_models_equal_the_libraries_own_loading(tiny_base, precision):
    dtype = getattr(torch, load.PRECISIONS[precision])
    assert set(load._streamed_components(Path(tiny_base), dtype)) == set(COMPONENTS)
    ours, theirs = load_base(str(tiny_base), precision=precision, device="cpu"), library_pipeline(tiny_base, dtype)
    for name in COMPONENTS:
        model = getattr(ours, name)
        assert type(model) is type(getattr(theirs, name)) and not model.training
        assert_same_weights(model, getattr(theirs, name))
    ids = ours.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    torch.testing.assert_close(ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0], rtol=0, atol=0)


def test_sharded_weights_are_streamed(tiny_base, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "unet"
    UNet2DConditionModel.from_pretrained(Path(tiny_base) / "unet").save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load._stream_model(folder, "diffusers", "UNet2DConditionModel", torch.bfloat16)
    assert model is not None
    assert_same_weights(model, UNet2DConditionModel.from_pretrained(folder, dtype=torch.bfloat16))


def test_keys_it_does_not_know_are_left_to_the_library(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "vae"
    shutil.copytree(Path(tiny_base) / "vae", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["encoder.legacy.query.weight"] = torch.zeros(2)  # as old checkpoints name what diffusers converts
    save_file(state, weights)
    assert load._stream_model(folder, "diffusers", "AutoencoderKL", torch.float32) is None
    # No .safetensors file at all (only a pickle .bin): the library loads it too.
    weights.unlink()
    assert load._stream_model(folder, "diffusers", "AutoencoderKL", torch.float32) is None


def test_a_damaged_file_is_refused_with_what_to_do(tiny_base, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(Path(tiny_base) / "vae", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BaseModelError, match="truncated"):
        load._stream_model(folder, "diffusers", "AutoencoderKL", torch.float32)
    start, header = load._safetensors_header(weights)
    assert start > 8 and all(set(info) == {"dtype", "shape", "data_offsets"} for info in header.values())
    size = int.from_bytes(weights.read_bytes()[:8], "little")
    weights.write_bytes(weights.read_bytes()[:8] + b"{" * size)
    with pytest.raises(BaseModelError, match="not a readable .safetensors"):
        load._stream_model(folder, "diffusers", "AutoencoderKL", torch.float32)
