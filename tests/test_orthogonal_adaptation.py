"""benchmarks/orthogonal_adaptation.py: down projections start as orthonormal rows of a shared basis, each adapter's
own, and stay fixed only when asked; the run it wraps is stylelora train's."""
from __future__ import annotations

import pytest
import torch

from train_fixtures import load_benchmark

ortho = load_benchmark("orthogonal_adaptation")


def _text_encoder_downs(tiny_base, key: str, fixed: bool, parts=("unet", "text")):
    from transformers import CLIPTextModel

    from stylelora.lora import inject

    encoder = CLIPTextModel.from_pretrained(tiny_base / "text_encoder")
    attach = ortho.orthogonal_attach(inject.attach_adapter, key, fixed, parts)
    params = attach(encoder, inject.lora_config(inject.text_encoder_lora_targets(encoder), rank=4, alpha=4))
    downs = {path: layer.lora_A["default"].weight for path, layer in inject.lora_layers(encoder, "default")}
    return params, downs


@pytest.mark.parametrize("fixed", [True, False])
def test_each_adapter_reads_its_own_orthonormal_rows_of_a_shared_basis(tiny_base, fixed):
    params, downs = _text_encoder_downs(tiny_base, "pastel", fixed)
    _, others = _text_encoder_downs(tiny_base, "zorb", fixed)
    _, again = _text_encoder_downs(tiny_base, "pastel", fixed)
    for path, down in downs.items():
        gram = down.double() @ down.double().T * 3  # rows of norm 1/sqrt(3), peft's default row norm
        assert torch.allclose(gram, torch.eye(down.shape[0], dtype=torch.float64), atol=1e-5)
        assert torch.equal(down, again[path])  # the same key draws the same rows
        assert not torch.equal(down, others[path])  # another key, other rows of the same basis
        cross = down.double() @ others[path].double().T * 3
        assert cross.abs().max() <= 1 + 1e-5 and torch.all((cross.abs() < 1e-5) | ((cross.abs() - 1).abs() < 1e-5))
    trained = {id(param) for param in params}
    assert all((id(down) in trained) != fixed for down in downs.values())  # fixed rows are not trained
    assert len(params) == (len(downs) if fixed else 2 * len(downs))


def test_rows_go_only_where_the_parts_say(tiny_base):
    params, downs = _text_encoder_downs(tiny_base, "pastel", True, parts=("unet",))
    assert len(params) == 2 * len(downs)  # the text encoder's LoRA is peft's, every matrix trained
    assert not any(torch.allclose(down.double() @ down.double().T * 3, torch.eye(down.shape[0], dtype=torch.float64),
                                  atol=1e-5) for down in downs.values())


def test_a_run_without_a_key_or_an_output_is_refused():
    with pytest.raises(SystemExit):
        ortho.main(["--rows", "fixed", "--", "datasets/toy-pastel", "--steps", "1"])


def test_fixed_rows_stay_fixed_through_training(tmp_path, tiny_base, stripes_dataset, monkeypatch):
    """Base preservation switches adapters, and peft turns requires_grad back on when it does: the fixed rows must
    still come out of the run as they went in."""
    from safetensors.torch import load_file

    from stylelora.lora import inject

    monkeypatch.setattr(inject, "attach_adapter", inject.attach_adapter)  # restored after the test
    output = tmp_path / "toy-stripes"
    assert ortho.main(["--rows", "fixed", "--", str(stripes_dataset), "--base", str(tiny_base), "--output", str(output),
                       "--steps", "4", "--batch-size", "4", "--rank", "4", "--alpha", "4", "--no-samples",
                       "--save-every", "0"]) == 0
    (adapter,) = output.glob("*.safetensors")
    saved = load_file(adapter)
    downs = [tensor.double() for key, tensor in saved.items() if key.startswith("lora_te") and "lora_down" in key]
    orthonormal = [torch.allclose(down @ down.T * 3, torch.eye(4, dtype=torch.float64), atol=1e-5) for down in downs]
    assert downs and all(orthonormal)
