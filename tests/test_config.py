"""Training config: defaults, validation messages that name the field and the fix, TOML in and out, CLI precedence."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from stylelora.config import (
    ConfigError,
    TrainConfig,
    config_to_dict,
    load_config,
    save_config,
    warmup_steps,
    with_epoch_steps,
    with_model_defaults,
)
from stylelora.presets import TOY_SAMPLE_PROMPTS as DEFAULT_SAMPLE_PROMPTS
from stylelora.presets import apply_preset
from stylelora.train.command import build_parser, overrides_from_args


def toy(config: TrainConfig) -> TrainConfig:
    """The config as a run on the toy base resolves it (the toy family's preset fills what was left unset)."""
    return apply_preset(config, "toy", cuda=False)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_a_valid_style_lora_setup():
    config = toy(load_config(None, {"data.dir": "datasets/toy-stripes"}))
    assert (config.network.rank, config.network.alpha, config.network.unet_targets) == (16, 16.0, "kohya")
    assert config.network.train_text_encoder and config.data.bucketing and config.data.cache == "ram"
    assert config.optim.unet_lr == 1e-3 and config.optim.text_encoder_lr == 2e-4
    assert config.train.base == "toy" and config.train.format == "kohya" and config.train.precision == "fp32"
    assert config.train.output_name == "toy-stripes"
    assert config.output_dir == Path("outputs/toy-stripes")
    assert config.adapter_path == Path("outputs/toy-stripes/toy-stripes.safetensors")
    assert config.train.sample_prompts == DEFAULT_SAMPLE_PROMPTS
    assert warmup_steps(config) == 50 and config.optim.warmup_steps is None  # a tenth of the steps, at most 50


def test_config_is_frozen():
    config = load_config(None, {"data.dir": "d"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.unet_lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("overrides, expected", [
    ({"optim.unet_lr": -1}, ["optim.unet_lr must be > 0", "got -1", "--unet-lr 1e-4"]),
    ({"optim.text_encoder_lr": 0.0}, ["optim.text_encoder_lr must be > 0", "--no-text-encoder"]),
    ({"network.rank": 0}, ["network.rank must be at least 1", "--rank 16"]),
    ({"network.rank": "big"}, ["network.rank must be a whole number", "'big'"]),
    ({"network.rank": 4.5}, ["network.rank must be a whole number"]),
    ({"network.unet_targets": "all"}, ["network.unet_targets must be one of attn, kohya, locon"]),
    ({"network.conv_rank": 4}, ["conv_rank", "locon"]),
    ({"optim.optimizer": "sgd"}, ["optim.optimizer must be one of adamw, adamw8bit, prodigy", "--optimizer adamw"]),
    ({"optim.lr_scheduler": "step"}, ["optim.lr_scheduler must be one of"]),
    ({"optim.grad_accum": 0}, ["optim.grad_accum must be at least 1"]),
    ({"optim.warmup_steps": 2000}, ["optim.warmup_steps", "smaller than train.steps = 1000"]),
    ({"train.steps": 0}, ["train.steps must be at least 1", "--steps 1000"]),
    ({"train.epochs": 0}, ["train.epochs must be at least 1", "--epochs 10"]),
    ({"train.sample_seed": 2**64}, ["train.sample_seed must be 0 or more and below 2**63"]),
    ({"train.seed": -1}, ["train.seed must be 0 or more and below 2**63"]),
    ({"train.epochs": 2, "optim.warmup_steps": -1}, ["optim.warmup_steps must be 0 or more"]),
    ({"train.batch_size": -2}, ["train.batch_size must be at least 1"]),
    ({"train.precision": "fp8"}, ["train.precision must be one of fp32, fp16, bf16"]),
    ({"train.format": "ckpt"}, ["train.format must be one of kohya, diffusers"]),
    ({"train.noise_offset": 1.5}, ["train.noise_offset must be in [0, 1)"]),
    ({"train.multires_noise_iterations": -1}, ["train.multires_noise_iterations must be 0 (off) or more"]),
    ({"train.multires_noise_iterations": 6, "train.multires_noise_discount": 0},
     ["train.multires_noise_discount must be in (0, 1]"]),
    ({"train.multires_noise_discount": 0.5}, ["only applies with train.multires_noise_iterations above 0"]),
    ({"train.noise_offset_random_strength": True}, ["train.noise_offset_random_strength only applies with "
                                                    "train.noise_offset above 0", "--noise-offset 0.1"]),
    ({"train.ip_noise_gamma_random_strength": True}, ["train.ip_noise_gamma_random_strength only applies with"]),
    ({"network.dim_from_weights": True}, ["network.dim_from_weights takes the rank from network.weights' file, "
                                          "which is not set"]),
    ({"train.loss_type": "mse"}, ["train.loss_type must be one of l2, l1, huber, smooth_l1"]),
    ({"train.huber_c": 0.2}, ["train.huber_schedule / huber_c only apply to train.loss_type = 'huber' or "
                              "'smooth_l1' (got 'l2')"]),
    ({"train.loss_type": "huber", "train.huber_c": 0}, ["train.huber_c must be in (0, 1]"]),
    ({"train.loss_type": "huber", "train.huber_schedule": "cosine"}, ["train.huber_schedule must be one of"]),
    ({"train.ip_noise_gamma": 1.0}, ["train.ip_noise_gamma must be in [0, 1)", "--ip-noise-gamma 0.1"]),
    ({"optim.lr_scheduler_num_cycles": 3}, ["optim.lr_scheduler_num_cycles only applies to optim.lr_scheduler = "
                                            "'cosine_with_restarts' (got 'cosine')"]),
    ({"optim.lr_scheduler": "cosine_with_restarts", "optim.lr_scheduler_num_cycles": 0},
     ["optim.lr_scheduler_num_cycles must be at least 1"]),
    ({"optim.lr_scheduler_power": 2.0}, ["optim.lr_scheduler_power only applies to optim.lr_scheduler = "
                                         "'polynomial'"]),
    ({"optim.lr_scheduler": "polynomial", "optim.lr_scheduler_power": 0}, ["optim.lr_scheduler_power must be > 0"]),
    ({"train.preserve_decoys": 1.2}, ["train.preserve_decoys is a share between 0", "--preserve-decoys 0.5"]),
    ({"train.text_noise": -0.1}, ["train.text_noise is a noise std between 0", "--text-noise 0.2"]),
    ({"train.output_name": "a/b"}, ["train.output_name must be a plain file name"]),
    ({"data.caption_dropout": 2.0}, ["data.caption_dropout is a probability"]),
    ({"data.cache": "gpu"}, ["data.cache must be one of ram, disk, none"]),
    ({"data.random_crop": True}, ["data.random_crop needs data.cache = 'none'"]),
    ({"data.resolution": -32}, ["data.resolution must be a positive multiple"]),
    ({"data.flip": "yes"}, ["data.flip must be true or false"]),
    ({"data.dir": ""}, ["data.dir is required"]),
])
def test_bad_value_names_the_field_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as raised:
        load_config(None, {"data.dir": "d", **overrides})
    for text in expected:
        assert text in str(raised.value)


@pytest.mark.parametrize("key", ["optim.unet_lr", "optim.text_encoder_lr", "network.alpha", "optim.max_grad_norm",
                                 "optim.weight_decay", "train.min_snr_gamma", "train.preserve_base"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_refused(key, value):
    """inf passes a `> 0` rule and would only fail mid-run (a NaN loss, an adapter that cannot be used)."""
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number.*\(got {value}\)"):
        load_config(None, {"data.dir": "d", key: value})


def test_both_text_encoder_rates_can_be_given_and_neither_beside_no_text_encoder():
    args = build_parser().parse_args(["train", "d", "--text-encoder-lr", "1e-4", "--text-encoder-2-lr", "5e-5"])
    optim = load_config(None, overrides_from_args(args)).optim
    assert (optim.text_encoder_lr, optim.text_encoder_2_lr) == (1e-4, 5e-5)  # SDXL's two encoders, as the README says
    for flag in ("--text-encoder-lr", "--text-encoder-2-lr"):
        args = build_parser().parse_args(["train", "d", "--no-text-encoder", flag, "5e-5"])
        with pytest.raises(ConfigError, match=r"optim.text_encoder(_2)?_lr is set but .*--no-text-encoder.*drop one"):
            load_config(None, overrides_from_args(args))


def test_inf_on_the_command_line_is_refused():
    args = build_parser().parse_args(["train", "d", "--unet-lr", "inf", "--alpha", "inf"])
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides_from_args(args))
    assert "optim.unet_lr must be a finite number" in str(raised.value)
    assert "network.alpha must be a finite number" in str(raised.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        load_config(None, {"data.dir": "d", "optim.unet_lr": -1, "train.steps": 0})
    assert "optim.unet_lr" in str(raised.value) and "train.steps" in str(raised.value)


def test_unknown_toml_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nlearning_rate = 1e-4\n[data]\ndir = "d"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    message = str(raised.value)
    assert "unknown key 'learning_rate' in [optim]" in message and "unet_lr" in message and "text_encoder_lr" in message


def test_unknown_toml_section_and_malformed_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[trainer]\nsteps = 3\n', encoding="utf-8")
    sections = r"\[data\], \[network\], \[optim\], \[train\]"
    with pytest.raises(ConfigError, match=r"unknown section or key 'trainer'.*" + sections):
        load_config(path, {"data.dir": "d"})
    path.write_text('[train\nsteps = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, {"data.dir": "d"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", {})


def test_cli_flags_override_toml_and_toml_overrides_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ndir = "from-toml"\n[network]\nrank = 8\nalpha = 4\n[train]\nsteps = 123\nseed = 7\n',
                    encoding="utf-8")
    args = build_parser().parse_args(["train", "cli-data", "--config", str(path), "--rank", "32", "--no-text-encoder"])
    config = load_config(args.config, overrides_from_args(args))
    assert config.data.dir == "cli-data"  # the positional DATA_DIR wins
    assert config.network.rank == 32 and config.network.alpha == 4.0  # flag > TOML; TOML int → float
    assert config.train.steps == 123 and config.train.seed == 7  # TOML > default
    config = toy(config)
    assert config.network.train_text_encoder is False and config.optim.text_encoder_lr is None
    assert config.train.batch_size == 16  # default


def test_flags_not_given_do_not_override(tmp_path):
    args = build_parser().parse_args(["train", "d"])
    assert overrides_from_args(args) == {"data.dir": "d"}


def test_saved_toml_loads_back_equal(tmp_path):
    config = load_config(None, {"data.dir": "d", "network.rank": 8, "train.resume": "latest",
                                "optim.optimizer": "prodigy", "data.resolution": 32})
    path = save_config(config, tmp_path / "config.toml")
    assert load_config(path, {}) == config
    assert not list(tmp_path.glob(".*tmp"))  # written via temp + rename


def test_prodigy_gets_multiplier_learning_rates():
    config = toy(load_config(None, {"data.dir": "d", "optim.optimizer": "prodigy"}))
    assert (config.optim.unet_lr, config.optim.text_encoder_lr) == (1.0, 1.0)


def test_model_defaults_fill_resolution_and_bucket_sides():
    config = load_config(None, {"data.dir": "d"})
    filled = with_model_defaults(config, native_resolution=32, downsample_factor=8)
    d = filled.data
    assert (d.resolution, d.bucket_step, d.min_side, d.max_side) == (32, 8, 16, 64)
    sd = with_model_defaults(config, native_resolution=512, downsample_factor=64)
    assert (sd.data.resolution, sd.data.bucket_step, sd.data.min_side, sd.data.max_side) == (512, 64, 256, 1024)
    assert config.data.resolution is None  # the original is untouched


def test_model_defaults_refuse_sizes_the_model_cannot_take():
    config = load_config(None, {"data.dir": "d", "data.resolution": 36})
    with pytest.raises(ConfigError, match=r"data.resolution = 36 must be a multiple of the bucket step 8; e.g. 32"):
        with_model_defaults(config, native_resolution=32, downsample_factor=8)


def test_unknown_override_is_a_programming_error_with_the_valid_names():
    with pytest.raises(ConfigError, match="unknown setting 'optim.lr'.*optim.unet_lr"):
        load_config(None, {"data.dir": "d", "optim.lr": 1e-4})


def test_config_dict_has_no_none_and_lists_for_tuples():
    values = config_to_dict(toy(TrainConfig()))
    assert all(v is not None for section in values.values() for v in section.values())
    assert isinstance(values["train"]["sample_prompts"], list)


def test_config_and_train_command_import_without_torch():
    code = ("import sys, stylelora.config, stylelora.train.command; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overrides, batches, steps, warmup", [
    ({"train.epochs": 10}, 188, 1880, 50),  # kohya's --max_train_epochs: it wins over the steps
    ({"train.epochs": 3, "train.steps": 5000}, 7, 21, 2),  # warmup: a tenth of the steps it gets
    ({"train.epochs": 3, "optim.grad_accum": 4}, 7, 6, 0),  # 21 batches, 4 to a step: 6 steps, the last one short
    ({"train.epochs": 3, "optim.warmup_steps": 5}, 7, 21, 5),  # a given warmup is kept
    ({}, 7, 1000, 50),  # without epochs nothing changes
])
def test_epochs_set_the_steps_once_the_batches_are_known(overrides, batches, steps, warmup):
    config = with_epoch_steps(load_config(None, {"data.dir": "d", **overrides}), batches)
    assert (config.train.steps, warmup_steps(config)) == (steps, warmup)
    if "train.epochs" in overrides:
        assert config.source_of("train.steps").startswith(f"{overrides['train.epochs']} epochs × {batches} batches")
    # Steps given beside --epochs are named as not used, where the settings list them (kohya prints the same).
    assert ("the 5000 steps given (flag) are not used" in config.source_of("train.steps")) == ("train.steps" in overrides)


def test_the_settings_block_says_given_steps_give_way_to_epochs():
    from stylelora.train.loop import describe_settings

    config = load_config(None, {"data.dir": "d", "train.epochs": 1, "train.steps": 3, "train.family": "toy"})
    assert "train.steps = 3, not used: --epochs 1 sets the steps  (flag)" in describe_settings(config)
    assert "not used" not in describe_settings(load_config(None, {"data.dir": "d", "train.steps": 3,
                                                                  "train.family": "toy"}))


def test_a_warmup_as_long_as_the_epochs_is_refused():
    config = load_config(None, {"data.dir": "d", "train.epochs": 2, "optim.warmup_steps": 50})
    with pytest.raises(ConfigError, match="warmup_steps = 50 is not shorter than the 14 steps that train.epochs = 2"):
        with_epoch_steps(config, 7)
