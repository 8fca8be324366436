"""--optimizer-args (kohya's --optimizer_args): KEY=VALUE read as sd-scripts reads them, handed to the optimizer,
refused before the base loads when the optimizer does not take them, and recorded in ss_optimizer."""
from __future__ import annotations

import pytest
import torch

from stylelora.config import ConfigError, load_config
from stylelora.lora.inject import LoraParameters
from stylelora.train.optim import build_optimizer, optimizer_argument
from train_fixtures import adapter_metadata, reset_accelerate, tiny_overrides


@pytest.mark.parametrize("text, expected", [
    ("betas=0.9,0.99", ("betas", (0.9, 0.99))),
    ("d_coef=2", ("d_coef", 2)),
    ("use_bias_correction=True", ("use_bias_correction", True)),
    (" eps = 1e-7 ", ("eps", 1e-7)),
    ("name='x'", ("name", "x")),
])
def test_values_are_read_as_sd_scripts_reads_them(text, expected):
    assert optimizer_argument(text) == expected


@pytest.mark.parametrize("args, message", [
    (["betas"], r"'betas' is not KEY=VALUE; e.g. betas=0.9,0.99"),
    (["d0=abc"], r"'abc' is not a number, True/False, a tuple"),
])
def test_unreadable_values_are_refused_with_the_config(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data.dir": "d", "optim.optimizer_args": args})


def test_the_optimizer_gets_them():
    config = load_config(None, {"data.dir": "d", "optim.unet_lr": 1e-3, "optim.optimizer_args": ["betas=0.5,0.6",
                                                                                                "eps=1e-6"]})
    optimizer = build_optimizer(config, LoraParameters(unet=[torch.nn.Parameter(torch.zeros(2))]))
    assert (optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]) == ((0.5, 0.6), 1e-6)


@pytest.mark.parametrize("args, message", [
    (["d_coef=2"], r"AdamW takes no 'd_coef'; it takes betas, eps"),
    (["weight_decay=0.1"], r"weight_decay is set by --weight-decay; use that instead"),
    (["lr=1"], r"lr is set by --unet-lr / --text-encoder-lr"),
])
def test_arguments_the_optimizer_does_not_take_stop_a_dry_run(tmp_path, tiny_base, stripes_dataset, args, message):
    from stylelora.train.dry_run import dry_run

    with pytest.raises(ConfigError, match=message):
        dry_run(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "dry", tiny_base,
                                                 **{"optim.optimizer_args": args})))


def test_the_file_records_them_as_sd_scripts_does(tmp_path, tiny_base, stripes_dataset):
    from stylelora.train.loop import run_training

    try:
        adapter = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "r", tiny_base, **{
            "train.steps": 1, "optim.optimizer_args": ["betas=0.9,0.99"]})))
    finally:
        reset_accelerate()
    assert adapter_metadata(adapter)["ss_optimizer"] == "adamw(betas=0.9,0.99)"


def test_the_command_line_takes_several(tmp_path):
    from stylelora.cli import build_parser
    from stylelora.train.command import overrides_from_args

    args = build_parser().parse_args(["train", "data", "--optimizer-args", "betas=0.9,0.99", "eps=1e-7"])
    assert overrides_from_args(args)["optim.optimizer_args"] == ["betas=0.9,0.99", "eps=1e-7"]
