"""modelspec.hash_sha256 in every adapter stylelora writes (a trained adapter, its checkpoints, a blend): the SAI model
spec's "0x" + sha256 of all tensor content after the header, which model sites and inference UIs check a download
against. It was not written at all; each test recomputes it from the saved file's bytes by that definition."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from gen_fixtures import adapter_pipeline, make_adapter
from safetensors.torch import load_file, save_file

from stylelora.lora.adapter_file import read_header
from stylelora.lora.io import save_adapter


def spec_hash(path) -> str:
    """The model spec's definition, from the file alone: skip the 8-byte header length and the JSON header, hash the
    rest, "0x" + lowercase hex."""
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    return "0x" + hashlib.sha256(raw[8 + header_size:]).hexdigest()


def stated_hash(path) -> str:
    return read_header(path)[1]["modelspec.hash_sha256"]


@pytest.fixture(scope="module")
def trained_run(tiny_base, stripes_dataset, tmp_path_factory):
    """A four-step run on the tiny base that also saves a checkpoint at step 2."""
    from stylelora.config import load_config
    from stylelora.train.loop import run_training
    from train_fixtures import reset_accelerate, tiny_overrides

    out = tmp_path_factory.mktemp("hash") / "run"
    run_training(load_config(None, tiny_overrides(stripes_dataset, out, tiny_base, **{
        "train.output_name": "run", "train.save_every": 2, "train.samples": False})))
    reset_accelerate()
    return out


def test_a_trained_adapter_and_its_checkpoint_state_their_tensor_hash(trained_run):
    adapter = trained_run / "run.safetensors"
    checkpoint = trained_run / "checkpoints" / "step-000002" / "run-step000002.safetensors"
    for path in (adapter, checkpoint):
        assert stated_hash(path) == spec_hash(path), path
        # The same tensor bytes as kohya's sshs_model_hash (A1111's), so both keys agree.
        assert stated_hash(path) == "0x" + read_header(path)[1]["sshs_model_hash"]
    assert stated_hash(adapter) != stated_hash(checkpoint)  # two steps of training apart


@pytest.mark.parametrize("fmt, dtype", [("kohya", None), ("diffusers", None), ("kohya", torch.float16)])
def test_saved_adapters_state_the_hash_of_what_was_written(tmp_path, fmt, dtype):
    pipe = adapter_pipeline(1)
    path = save_adapter(tmp_path / "ink.safetensors", pipe.unet, pipe.text_encoder, fmt=fmt, dtype=dtype,
                        metadata={"modelspec.sai_model_spec": "1.0.0", "modelspec.title": "ink"})
    assert stated_hash(path) == spec_hash(path)


def test_a_changed_tensor_changes_the_hash_and_changed_metadata_does_not(tmp_path):
    first = make_adapter(tmp_path / "a.safetensors", 1)
    retitled = make_adapter(tmp_path / "b.safetensors", 1, metadata={"modelspec.title": "another title"})
    assert stated_hash(first) == stated_hash(retitled) == spec_hash(first)  # the tensors alone are hashed
    pipe = adapter_pipeline(1)
    with torch.no_grad():
        next(p for n, p in pipe.unet.named_parameters() if "lora_B" in n).add_(0.5)
    changed = save_adapter(tmp_path / "c.safetensors", pipe.unet, pipe.text_encoder,
                           metadata=read_header(first)[1])  # even handed the first file's stated hash
    assert stated_hash(changed) == spec_hash(changed) != stated_hash(first)


def test_a_blend_states_the_hash_of_its_own_tensors(tmp_path):
    from stylelora.lora.blend import blend

    inputs = [make_adapter(tmp_path / f"{name}.safetensors", seed, trigger=name) for seed, name in enumerate("ab")]
    for name, rank in (("sum", None), ("svd", 2)):
        out = blend([f"{inputs[0]}:1", f"{inputs[1]}:0.5"], tmp_path / f"{name}.safetensors", rank=rank).path
        assert stated_hash(out) == spec_hash(out) != stated_hash(inputs[0])


def test_a_file_without_model_spec_metadata_gets_no_lone_model_spec_key(tmp_path):
    pipe = adapter_pipeline(1)
    path = save_adapter(tmp_path / "bare.safetensors", pipe.unet, pipe.text_encoder, metadata={})
    assert "modelspec.hash_sha256" not in read_header(path)[1]


def test_inspect_checks_the_model_spec_hash_too(tmp_path):
    from stylelora.lora.inspect import format_inspect, inspect_adapter

    path = make_adapter(tmp_path / "ink.safetensors", 1)
    info = inspect_adapter(path)
    assert info["hash"]["modelspec_hash_sha256"] == spec_hash(path) and info["hash"]["matches_metadata"] is True
    assert "matches metadata" in format_inspect(info)
    json.dumps(info)
    # The same tensors under a stated hash another tool computed differently: inspect names the key that differs.
    tampered = tmp_path / "tampered.safetensors"
    save_file(load_file(str(path)), str(tampered),
              metadata={**read_header(path)[1], "modelspec.hash_sha256": "0x" + "0" * 64})
    info = inspect_adapter(tampered)
    assert info["hash"]["matches_metadata"] is False and info["hash"]["differs"] == ["modelspec.hash_sha256"]
    assert "DIFFERS from metadata's modelspec.hash_sha256" in format_inspect(info)
