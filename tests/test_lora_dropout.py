"""kohya's LoRA dropouts (--network-dropout, --rank-dropout, --module-dropout): what each drops while a module
trains, nothing in eval mode, and a run that records them as sd-scripts does and resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stylelora.config import ConfigError, load_config
from stylelora.lora.inject import LoraTargets, lora_config
from stylelora.train.lora_dropout import add_lora_dropout, dropped
from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate, tiny_overrides


def test_rank_dropout_drops_whole_ranks_per_sample_and_scales_the_rest():
    torch.manual_seed(0)
    down = torch.ones(64, 7, 8)  # batch, tokens, rank
    out = dropped(down, neuron=0.0, rank=0.25, module=0.0, conv=False)
    per_rank = out[:, 0, :]
    assert torch.equal(out, per_rank[:, None, :].expand_as(out))  # every token of a sample loses the same ranks
    assert set(per_rank.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert (per_rank == 0).float().mean().item() == pytest.approx(0.25, abs=0.05)
    conv = dropped(torch.ones(64, 8, 3, 3), neuron=0.0, rank=0.25, module=0.0, conv=True)  # the rank is dim 1
    assert torch.equal(conv, conv[:, :, :1, :1].expand_as(conv))


def test_network_dropout_drops_elements_and_module_dropout_whole_outputs():
    torch.manual_seed(0)
    out = dropped(torch.ones(64, 7, 8), neuron=0.1, rank=0.0, module=0.0, conv=False)
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert (out == 0).float().mean().item() == pytest.approx(0.1, abs=0.02)
    skipped = [bool((dropped(torch.ones(2, 8), neuron=0.0, rank=0.0, module=0.3, conv=False) == 0).all())
               for _ in range(2000)]
    assert sum(skipped) / len(skipped) == pytest.approx(0.3, abs=0.04)


def test_the_hooks_act_while_training_only():
    torch.manual_seed(0)
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora_config(LoraTargets(linear=("0",)), rank=8, alpha=8,
                                                init_lora_weights=False), nn.Sequential(nn.Linear(16, 16)))
    x = torch.randn(4, 16)
    plain = model.eval()(x)
    network = load_config(None, {"data.dir": "d", "network.rank_dropout": 0.5}).network
    add_lora_dropout([model], network)
    assert torch.equal(model.eval()(x), plain)  # sample grids and every loader see the plain LoRA
    assert not torch.allclose(model.train()(x), plain)


@pytest.mark.parametrize("key", ["network.dropout", "network.rank_dropout", "network.module_dropout"])
def test_a_rate_of_one_is_refused(key):
    with pytest.raises(ConfigError, match=rf"{key} must be at least 0 \(off\) and below 1"):
        load_config(None, {"data.dir": "d", key: 1.0})


def test_a_run_records_the_dropouts_as_sd_scripts_does(tmp_path, tiny_base, stripes_dataset):
    from stylelora.train.loop import run_training

    def run(name, **extra):
        try:
            return run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / name, tiny_base,
                                                                 **{"train.steps": 2, **extra})))
        finally:
            reset_accelerate()

    plain = run("plain")
    dropout = run("dropout", **{"network.dropout": 0.1, "network.rank_dropout": 0.2, "network.module_dropout": 0.1})
    metadata = adapter_metadata(dropout)
    assert metadata["ss_network_dropout"] == "0.1"
    assert json.loads(metadata["ss_network_args"]) == {"rank_dropout": "0.2", "module_dropout": "0.1"}
    assert "ss_network_dropout" not in adapter_metadata(plain)
    same = [torch.equal(adapter_tensors(plain)[key], tensor) for key, tensor in adapter_tensors(dropout).items()]
    assert not all(same)
