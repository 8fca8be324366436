"""LoRA+ (optim.loraplus_lr_ratio; kohya's network_args loraplus_lr_ratio): each model's up factors train at that
multiple of its rate, the log keeps the models' own rates, and the file records the ratio as kohya does."""
from __future__ import annotations

import csv
import json

import pytest

from stylelora.config import load_config
from stylelora.train.loop import run_training
from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate, tiny_overrides


def one_step(tmp_path, dataset, base, name: str, **overrides):
    try:
        return run_training(load_config(None, tiny_overrides(dataset, tmp_path / name, base, **{
            "train.steps": 1, "optim.warmup_steps": 0, "optim.weight_decay": 0.0, **overrides})))
    finally:
        reset_accelerate()


def largest_up(adapter) -> dict[str, float]:
    """The largest up-factor entry of the UNet's and of the text encoder's LoRA."""
    tensors = adapter_tensors(adapter)
    return {prefix: max(float(t.abs().max()) for key, t in tensors.items()
                        if key.startswith(prefix) and key.endswith("lora_up.weight"))
            for prefix in ("lora_unet_", "lora_te_")}


def test_the_up_factors_take_a_step_the_ratio_times_as_long(tmp_path, tiny_base, stripes_dataset):
    plain = one_step(tmp_path, stripes_dataset, tiny_base, "plain")
    plus = one_step(tmp_path, stripes_dataset, tiny_base, "plus", **{"optim.loraplus_lr_ratio": 16.0})
    # Adam's first step moves every entry with a gradient by the rate itself; the ups start at zero.
    for prefix, size in largest_up(plain).items():
        assert largest_up(plus)[prefix] == pytest.approx(16 * size, rel=1e-3)
    downs = [key for key in adapter_tensors(plain) if key.endswith("lora_down.weight")]
    assert all((adapter_tensors(plus)[key] == adapter_tensors(plain)[key]).all() for key in downs)
    assert json.loads(adapter_metadata(plus)["ss_network_args"]) == {"loraplus_lr_ratio": "16.0"}
    assert "ss_network_args" not in adapter_metadata(plain)
    with (tmp_path / "plus" / "metrics.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (float(row["lr_unet"]), float(row["lr_text_encoder"])) == (1e-3, 2e-4)  # the models' own rates


def test_a_ratio_below_one_is_refused():
    from stylelora.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim.loraplus_lr_ratio must be 0 \(off\) or at least 1"):
        load_config(None, {"data.dir": "d", "optim.loraplus_lr_ratio": 0.5})


def test_the_log_keeps_the_unet_rate_without_a_text_encoder(tmp_path, tiny_base, stripes_dataset):
    """The up factors' group comes second when no text encoder trains: the log still names no text-encoder rate."""
    one_step(tmp_path, stripes_dataset, tiny_base, "unet-only", **{"optim.loraplus_lr_ratio": 16.0,
                                                                   "network.train_text_encoder": False})
    with (tmp_path / "unet-only" / "metrics.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (float(row["lr_unet"]), row["lr_text_encoder"]) == (1e-3, "")
