"""kohya's --scale_weight_norms (stylelora.lora.max_norm): each LoRA module's ΔW norm against a hand-computed case,
the cap on Linear and 3x3 conv layers, and a trained file whose every module stays under the cap."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from stylelora.config import ConfigError, load_config
from stylelora.lora.max_norm import cap_module_norms, module_norm
from stylelora.train.loop import run_training
from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate, tiny_overrides


def lora_model(alpha: float = 2.0) -> nn.Module:
    """A Linear(3 → 2) at rank 1 (scaling alpha) and a 3x3 Conv2d(2 → 4) at rank 2 (scaling alpha / 2)."""
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(3, 2))
    model.add_module("conv", nn.Conv2d(2, 4, 3, padding=1))
    return inject_adapter_in_model(LoraConfig(r=1, lora_alpha=alpha, target_modules=["proj", "conv"],
                                              rank_pattern={"conv": 2}), model)


def set_linear(model: nn.Module, down, up) -> None:
    with torch.no_grad():
        model.proj.lora_A["default"].weight.copy_(torch.tensor(down))
        model.proj.lora_B["default"].weight.copy_(torch.tensor(up))


def test_the_norm_of_a_module_is_that_of_its_weight_change_by_hand_and_as_peft_builds_it():
    model = lora_model(alpha=2.0)
    # ΔW = 2 × [[0.6], [0.8]] @ [[1, 2, 2]]: ‖up‖ = 1, ‖down‖ = 3, so ‖ΔW‖ = 2 × 1 × 3 = 6.
    set_linear(model, [[1.0, 2.0, 2.0]], [[0.6], [0.8]])
    assert module_norm(model.proj) == pytest.approx(6.0)
    torch.manual_seed(0)
    with torch.no_grad():
        model.conv.lora_B["default"].weight.normal_()  # peft starts lora_B at zero
    expected = float(model.conv.get_delta_weight("default").norm())
    assert expected > 0 and module_norm(model.conv) == pytest.approx(expected, rel=1e-5)


def test_modules_above_the_cap_are_scaled_back_to_it_and_the_others_left_alone():
    model = lora_model(alpha=2.0)
    set_linear(model, [[1.0, 2.0, 2.0]], [[0.6], [0.8]])
    torch.manual_seed(0)
    with torch.no_grad():
        model.conv.lora_B["default"].weight.normal_(std=1e-3)  # a small change: under the cap
    conv_before = model.conv.get_delta_weight("default").clone()
    report = cap_module_norms([model], 3.0)
    # Half the norm: up and down each by √½, as sd-scripts scales both factors.
    assert float(model.proj.get_delta_weight("default").norm()) == pytest.approx(3.0)
    assert model.proj.lora_A["default"].weight.tolist()[0] == pytest.approx([math.sqrt(0.5) * v for v in (1, 2, 2)])
    assert model.proj.lora_B["default"].weight.flatten().tolist() == pytest.approx([math.sqrt(0.5) * v
                                                                                     for v in (0.6, 0.8)])
    assert torch.equal(model.conv.get_delta_weight("default"), conv_before)
    assert report.scaled == 1 and report.max_norm == pytest.approx(3.0)
    assert report.mean_norm == pytest.approx((3.0 + float(conv_before.norm())) / 2)
    with pytest.raises(ValueError, match="must be > 0"):
        cap_module_norms([model], 0.0)


def test_the_option_is_checked_before_training():
    with pytest.raises(ConfigError, match=r"optim.scale_weight_norms must be 0 \(off\) or more"):
        load_config(None, {"data.dir": "d", "optim.scale_weight_norms": -1.0})


def file_module_norms(path) -> list[float]:
    """‖up @ down‖ × alpha / rank of every module of a kohya file."""
    tensors, norms = adapter_tensors(path), []
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up = tensors[f"{name}.lora_up.weight"]
            scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
            norms.append(float((up.flatten(1).float() @ down.flatten(1).float()).norm()) * scale)
    return norms


def test_a_run_with_the_cap_writes_no_module_above_it_and_records_it(tmp_path, tiny_base, stripes_dataset):
    locon = {"network.unet_targets": "locon", "network.conv_rank": 2}  # the 3x3 convs capped too
    try:
        plain = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "plain", tiny_base,
                                                              **locon)))
        reset_accelerate()
        cap = 0.5 * max(file_module_norms(plain))  # binds on the largest modules of the same run
        capped = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "capped", tiny_base,
                                                               **locon, **{"optim.scale_weight_norms": cap})))
    finally:
        reset_accelerate()
    norms = file_module_norms(capped)
    assert any("conv1" in key for key in adapter_tensors(capped)) and max(norms) <= cap * (1 + 1e-4)
    assert adapter_metadata(capped)["ss_scale_weight_norms"] == str(cap)
    assert adapter_metadata(plain)["ss_scale_weight_norms"] == "None"  # as sd-scripts writes it when off
    # metrics.csv shows what the cap did at each step, as kohya's progress bar does; nothing when it is off
    capped_rows, plain_rows = metrics_rows(tmp_path / "capped"), metrics_rows(tmp_path / "plain")
    assert sum(int(row["keys_scaled"]) for row in capped_rows) > 0
    assert all(float(row["max_key_norm"]) <= cap * (1 + 1e-4) for row in capped_rows)
    assert all(row["keys_scaled"] == row["max_key_norm"] == "" for row in plain_rows)


def metrics_rows(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))
