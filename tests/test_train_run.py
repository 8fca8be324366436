"""End-to-end trainer runs on a tiny random base: files written, adapter loadable, bad data, NaN, refusals."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from stylelora.config import ConfigError, load_config
from stylelora.data.errors import DataError
from stylelora.train import loop
from stylelora.train.checkpoint import ResumeError, complete_checkpoints
from stylelora.train.loop import TrainingDiverged, run_training
from train_fixtures import (
    adapter_metadata,
    adapter_tensors,
    build_tiny_base,
    reset_accelerate,
    run_cli,
    tiny_overrides,
    write_bad_files,
    write_kohya_dataset,
)


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


def train(data: Path, output: Path, base: Path, **extra) -> Path:
    return run_training(load_config(None, tiny_overrides(data, output, base, **extra)))


@contextlib.contextmanager
def library_warnings():
    """WARNING+ records of diffusers / transformers / peft, where unmatched LoRA keys are reported."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_cli_run_writes_every_artifact_and_the_adapter_loads_in_diffusers(tmp_path, tiny_base, stripes_dataset):
    from diffusers import StableDiffusionPipeline

    from stylelora.lora.inject import module_ranks
    from stylelora.lora.io import load_adapter_into

    output = tmp_path / "run"
    overrides = tiny_overrides(stripes_dataset, output, tiny_base, **{"train.steps": 4, "train.sample_every": 2,
                                                               "train.save_every": 2, "train.output_name": "stripes"})
    result = run_cli(overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = output / "stripes.safetensors"
    assert result.stdout.strip().splitlines()[-1] == str(adapter)  # the path, last on stdout
    for name in ("config.toml", "loss.png", "metrics.csv", "samples/step-000002.png", "samples/step-000004.png",
                 "checkpoints/step-000004/training_state.pt", "skipped.txt"):
        assert (output / name).is_file(), name
    assert "world size 1" in result.stderr
    rows = (output / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 5

    tensors = adapter_tensors(adapter)
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith("lora_up.weight") and t.abs().max() > 0 for k, t in tensors.items())  # it trained

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    with library_warnings() as warnings_logged:
        pipe.load_lora_weights(str(adapter), adapter_name="stripes")
    assert [r.getMessage() for r in warnings_logged] == []  # zero unmatched keys
    modules = {k.rsplit(".", 1)[0].rsplit(".", 1)[0] for k in tensors}
    assert len(module_ranks(pipe.unet, "stripes")) + len(module_ranks(pipe.text_encoder, "stripes")) == len(modules)
    ours = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    load_adapter_into(adapter, ours.unet, ours.text_encoder)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        theirs_out = pipe.unet(latents, torch.tensor([10, 500]), context).sample
        ours_out = ours.unet(latents, torch.tensor([10, 500]), context).sample
    assert (theirs_out - ours_out).abs().max() <= 1e-4


def test_adapter_metadata_describes_the_run(tmp_path, tiny_base, stripes_dataset):
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.output_name": "meta", "train.save_every": 1,
                                                            "train.keep_checkpoints": 2, "train.author": "jane",
                                                            "train.tags": "style, stripes"})
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-000003", "step-000004"]  # last K
    assert adapter_metadata(tmp_path / "run/checkpoints/step-000003/meta-step000003.safetensors")["ss_steps"] == "3"
    metadata = adapter_metadata(adapter)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_steps"] == "4" and metadata["ss_output_name"] == "meta"
    assert metadata["ss_unet_lr"] == "0.001" and metadata["ss_text_encoder_lr"] == "0.0002"
    assert metadata["ss_resolution"] == "(32, 32)" and metadata["modelspec.resolution"] == "32x32"
    assert metadata["modelspec.trigger_phrase"] == "stripestyle"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert (metadata["modelspec.author"], metadata["modelspec.tags"]) == ("jane", "style, stripes")  # kohya's --metadata_*
    assert metadata["ss_prior_loss_weight"] == "1.0" and metadata["ss_masked_loss"] == "False"
    assert metadata["ss_preserve_base"] == "1.0" and metadata["ss_preserve_decoys"] == "0.5"
    assert metadata["ss_text_noise"] == "0.2" and metadata["ss_decoy_company"] == "0.25"  # the toy family's recipe
    assert metadata["ss_multires_noise_iterations"] == metadata["ss_ip_noise_gamma"] == "None"  # off, as kohya says
    assert (metadata["ss_loss_type"], metadata["ss_debiased_estimation"]) == ("l2", "False")
    company = json.loads(metadata["ss_stylelora_company_words"])  # what a split blend reads coined triggers as
    assert company and all(word.isalpha() and word != "stripestyle" for word in company)
    assert json.loads(metadata["ss_tag_frequency"])["2_stripestyle"]["stripestyle"] == 8
    assert json.loads(metadata["ss_dataset_dirs"]) == {"2_stripestyle": {"n_repeats": 2, "img_count": 8}}
    assert metadata["ss_num_train_images"] == "16"
    training_args = json.loads(metadata["ss_training_args"])
    assert training_args["network"]["rank"] == 4 and training_args["data"]["resolution"] == 32
    # A shared file names local paths as kohya names the base: no folder of the training machine in it.
    assert metadata["ss_sd_model_name"] == tiny_base.name and not any(str(folder) in json.dumps(metadata) for folder in (tmp_path, tiny_base.parent, stripes_dataset.parent))
    assert (training_args["train"]["base"], training_args["train"]["output"]) == (tiny_base.name, "run")
    assert training_args["data"]["dir"] == stripes_dataset.name
    assert "sshs_model_hash" in metadata
    saved = load_config(tmp_path / "run" / "config.toml", {})
    assert saved.data.resolution == 32 and saved.network.rank == 4  # resolved from the base, saved for reuse


def test_bad_images_are_skipped_and_listed(tmp_path, tiny_base, capsys):
    data = write_kohya_dataset(tmp_path / "mixed", count=6)
    bad = write_bad_files(data / "2_stripestyle")
    adapter = train(data, tmp_path / "run", tiny_base, **{"train.steps": 2})
    assert adapter.is_file()
    report = (tmp_path / "run" / "skipped.txt").read_text()
    for name, reason in bad.items():
        assert name in report and reason in report
    err = capsys.readouterr().err
    assert "4 of 10 images skipped" in err
    assert "no caption" not in err  # the skipped files are not also listed as trained without captions
    assert adapter_metadata(adapter)["ss_num_train_images"] == "12"  # 6 good images × 2 repeats


def test_no_usable_image_fails_before_any_model_loads(tmp_path):
    folder = tmp_path / "bad" / "2_stripestyle"
    write_bad_files(folder)
    # A base that does not exist proves the data error comes first (no model was looked at).
    config = load_config(None, tiny_overrides(tmp_path / "bad", tmp_path / "run", tmp_path / "no-such-base"))
    with pytest.raises(DataError, match="none of the 4 images can be used for training"):
        run_training(config)


def test_cli_reports_data_and_config_errors_in_one_line(tmp_path):
    write_bad_files(tmp_path / "bad" / "2_stripestyle")
    result = run_cli(tiny_overrides(tmp_path / "bad", tmp_path / "run", tmp_path / "nowhere"), tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # input to fix, as in every subcommand
    assert "stylelora train: error: none of the 4 images" in result.stderr and result.stdout == ""
    result = run_cli(tiny_overrides(tmp_path / "bad", tmp_path / "run", tmp_path, **{"optim.unet_lr": -1}), tmp_path)
    assert result.returncode == 2 and "optim.unet_lr must be > 0" in result.stderr


def _poison_loss_at_call(monkeypatch, call: int):
    """The training loss becomes NaN at the `call`-th loss step (1-based), as a diverging run's does; returns the
    real loss step, to put back."""
    real_step, calls = loop.loss_step, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(calls) == call else loss

    monkeypatch.setattr(loop, "loss_step", poisoned)
    return real_step


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_base, stripes_dataset,
                                                                          monkeypatch):
    _poison_loss_at_call(monkeypatch, 4)
    output = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as raised:
        train(stripes_dataset, output, tiny_base, **{"train.save_every": 2, "train.steps": 6})
    message = str(raised.value)
    assert "stopped at step 4" in message and "nan" in message
    assert str(output / "checkpoints" / "step-000002") in message and "--resume latest" in message
    assert [p.name for p in complete_checkpoints(output)] == ["step-000002"]
    assert not (output / "data.safetensors").exists() and not (output / "stripes.safetensors").exists()
    assert (output / "metrics.csv").read_text().count("\n") == 4  # header + steps 1, 2, 3


def test_a_diverged_run_resumes_as_advised_at_the_lower_learning_rate(tmp_path, tiny_base, stripes_dataset,
                                                                      monkeypatch):
    """The advice after a NaN is a command that works: it names a checkpoint saved before the weights that diverged
    (a resume replays their batch exactly, so it would stop again), the resume may lower the learning rate and the
    clipping, and the schedule then runs at the new rate."""
    real_step = _poison_loss_at_call(monkeypatch, 3)
    output, settings = tmp_path / "run", {"train.save_every": 1, "optim.unet_lr": 1e-2}
    with pytest.raises(TrainingDiverged) as raised:
        train(stripes_dataset, output, tiny_base, **settings)
    first = output / "checkpoints" / "step-000001"
    assert f"resume from it with --resume {first} and a lower learning rate (e.g. --unet-lr 0.001" in str(raised.value)
    assert "not the latest, step-000002" in str(raised.value)

    monkeypatch.setattr(loop, "loss_step", real_step)
    reset_accelerate()
    adapter = train(stripes_dataset, output, tiny_base, **{**settings, "optim.unet_lr": 1e-3,
                                                           "optim.max_grad_norm": 0.5, "train.resume": str(first)})
    assert adapter.is_file()
    with (output / "metrics.csv").open() as handle:
        rates = [float(row["lr_unet"]) for row in csv.DictReader(handle)]
    cosine = [0.5 * (1 + math.cos(math.pi * done / 4)) for done in range(4)]  # 4 steps, no warmup
    assert rates == pytest.approx([1e-2 * cosine[0]] + [1e-3 * factor for factor in cosine[1:]])


def test_absurd_learning_rate_diverges_with_a_clear_message(tmp_path, tiny_base, stripes_dataset):
    with pytest.raises(TrainingDiverged, match=r"stopped at step \d+: the (loss|gradient norm) became"):
        train(stripes_dataset, tmp_path / "run", tiny_base, **{"optim.unet_lr": 1e30, "optim.text_encoder_lr": 1e30,
                                                      "optim.max_grad_norm": 0.0, "train.steps": 6})


def test_existing_run_is_not_overwritten_by_accident(tmp_path, tiny_base, stripes_dataset):
    output = tmp_path / "run"
    train(stripes_dataset, output, tiny_base, **{"train.steps": 1})
    reset_accelerate()
    with pytest.raises(ConfigError, match="already holds a training run.*--overwrite"):
        train(stripes_dataset, output, tiny_base, **{"train.steps": 1})
    reset_accelerate()
    assert train(stripes_dataset, output, tiny_base, **{"train.steps": 1, "train.overwrite": True}).is_file()


def test_a_resume_may_change_the_precision_as_the_divergence_advice_says(tmp_path, tiny_base, stripes_dataset,
                                                                         capsys):
    output = tmp_path / "run"
    train(stripes_dataset, output, tiny_base, **{"train.save_every": 2, "train.precision": "bf16"})
    reset_accelerate()
    capsys.readouterr()
    adapter = train(stripes_dataset, output, tiny_base, **{"train.save_every": 2, "train.precision": "fp32",
                                                           "train.resume": "latest", "train.steps": 6})
    metadata = adapter_metadata(adapter)
    assert metadata["ss_mixed_precision"] == "no" and metadata["ss_steps"] == "6"  # "no": kohya's name for fp32
    # 4 → 6 steps stretches the cosine: the rate at step 5 rises again, and the run says so before it trains.
    assert "resumed with --steps 6 (the checkpoint's run had 4)" in capsys.readouterr().err


def test_a_folder_holding_another_run_is_refused_before_anything_is_written(tmp_path, tiny_base, stripes_dataset):
    """A finished run under another output name, a --dry-run and a --resume with no checkpoint: each is refused
    and the old run's config.toml, skip report and metrics stay as they were."""
    from stylelora.train.dry_run import dry_run

    output = tmp_path / "run"
    train(stripes_dataset, output, tiny_base, **{"train.steps": 1, "train.output_name": "first"})
    reset_accelerate()
    mixed = write_kohya_dataset(tmp_path / "mixed", count=4)
    write_bad_files(mixed / "2_stripestyle")  # a different skip report, were it written
    before = {name: (output / name).read_bytes() for name in ("config.toml", "skipped.txt", "metrics.csv")}

    second = load_config(None, tiny_overrides(mixed, output, tiny_base, **{"train.output_name": "second"}))
    with pytest.raises(ConfigError, match=r"already holds a training run \(first.safetensors\).*--overwrite"):
        run_training(second)
    with pytest.raises(ConfigError, match="already holds a training run"):
        dry_run(second)
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        run_training(load_config(None, tiny_overrides(mixed, output, tiny_base, **{"train.resume": "latest"})))
    assert {name: (output / name).read_bytes() for name in before} == before
    assert not (output / "second.safetensors").exists()


def test_a_dry_run_does_not_stop_the_run_it_planned(tmp_path, tiny_base, stripes_dataset):
    from stylelora.train.dry_run import dry_run

    dry_run(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base)))
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.steps": 1})
    assert adapter.is_file()
    # A folder of downloaded adapters (A1111's models/Lora) holds no run: it may be an output folder.
    loras = tmp_path / "models" / "Lora"
    loras.mkdir(parents=True)
    (loras / "someone-elses.safetensors").write_bytes(adapter.read_bytes())
    assert dry_run(load_config(None, tiny_overrides(stripes_dataset, loras, tiny_base))).is_file()


@pytest.mark.parametrize("inside", [".", "2_stripestyle/run"])
def test_output_in_the_data_folder_is_refused_before_anything_is_written(tmp_path, stripes_dataset, inside):
    output = stripes_dataset / inside
    before = sorted(stripes_dataset.rglob("*"))
    # A base that does not exist proves the refusal comes first.
    config = load_config(None, tiny_overrides(stripes_dataset, output, tmp_path / "no-such-base"))
    with pytest.raises(ConfigError, match="is the training data folder .* or inside it: .* trained on next time"):
        run_training(config)
    assert sorted(stripes_dataset.rglob("*")) == before


def test_output_that_is_a_file_is_one_line_error(tmp_path, stripes_dataset, capsys):
    from stylelora.train.command import train_from_cli

    (tmp_path / "afile").write_text("notes")
    code = train_from_cli(None, tiny_overrides(stripes_dataset, tmp_path / "afile", tmp_path / "no-such-base"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"stylelora train: error: --output {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder" in err


def test_frozen_text_encoder_uses_the_text_cache_and_writes_unet_only(tmp_path, tiny_base, stripes_dataset, monkeypatch):
    seen = []
    real_build = loop.build_dataset

    def spy(*args, **kwargs):
        dataset_, text_cache = real_build(*args, **kwargs)
        seen.append(text_cache)
        return dataset_, text_cache

    monkeypatch.setattr(loop, "build_dataset", spy)
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{"network.train_text_encoder": False})
    assert seen[0] is not None and seen[0].stats.encoded >= 1 and seen[0].stats.hits > 0
    assert not any(k.startswith("lora_te") for k in adapter_tensors(adapter))
    assert adapter_metadata(adapter)["ss_network_train_unet_only"] == "True"


def test_cache_modes_train_the_same_adapter(tmp_path, tiny_base, stripes_dataset):
    """Cached latents are exactly what the VAE gives at training time: RAM, disk and no cache agree."""
    results = {}
    for cache in ("ram", "disk", "none"):
        results[cache] = adapter_tensors(train(stripes_dataset, tmp_path / cache, tiny_base, **{"data.cache": cache}))
        reset_accelerate()
    assert list((tmp_path / "disk" / "cache" / "latents").glob("*/*.safetensors"))
    for key, tensor in results["ram"].items():
        assert torch.equal(tensor, results["disk"][key]), key
        torch.testing.assert_close(tensor, results["none"][key], atol=1e-4, rtol=1e-3)  # VAE batch sizes differ


def test_bf16_keeps_lora_weights_fp32_and_v_prediction_base_trains(tmp_path, stripes_dataset):
    base = build_tiny_base(tmp_path / "vbase", prediction_type="v_prediction")
    adapter = train(stripes_dataset, tmp_path / "run", base, **{"train.precision": "bf16", "train.sample_every": 2})
    assert {t.dtype for k, t in adapter_tensors(adapter).items()} == {torch.float32}
    assert adapter_metadata(adapter)["modelspec.prediction_type"] == "v"  # the SAI spec's word, as sd-scripts
    assert adapter_metadata(adapter)["ss_mixed_precision"] == "bf16"


def test_gradient_accumulation_and_checkpointing_and_locon_run(tmp_path, tiny_base, stripes_dataset):
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{
        "optim.grad_accum": 2, "train.gradient_checkpointing": True, "network.unet_targets": "locon",
        "network.conv_rank": 2, "train.format": "diffusers", "train.steps": 2})
    tensors = adapter_tensors(adapter)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in tensors)
    assert any("conv" in k for k in tensors)


def test_kohyas_noise_loss_and_schedule_options_train_and_are_recorded(tmp_path, tiny_base, stripes_dataset):
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{
        "train.multires_noise_iterations": 6, "train.multires_noise_discount": 0.4, "train.ip_noise_gamma": 0.1,
        "optim.lr_scheduler": "cosine_with_restarts", "optim.lr_scheduler_num_cycles": 2,
        "train.loss_type": "smooth_l1", "train.huber_c": 0.2, "train.debiased_estimation_loss": True})
    metadata = adapter_metadata(adapter)
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"], metadata["ss_huber_c"],
            metadata["ss_debiased_estimation"]) == ("smooth_l1", "snr", "0.2", "True")
    assert (metadata["ss_multires_noise_iterations"], metadata["ss_multires_noise_discount"],
            metadata["ss_ip_noise_gamma"], metadata["ss_lr_scheduler"]) == ("6", "0.4", "0.1", "cosine_with_restarts")
    assert json.loads(metadata["ss_training_args"])["optim"]["lr_scheduler_num_cycles"] == 2
    with (tmp_path / "run" / "metrics.csv").open(newline="") as handle:
        rates = [float(row["lr_unet"]) for row in csv.DictReader(handle)]
    assert rates[2] > rates[1]  # 4 steps in 2 cycles: the second cycle starts again from the top


def test_save_precision_halves_the_file_and_keeps_the_trained_weights(tmp_path, tiny_base, stripes_dataset):
    full = train(stripes_dataset, tmp_path / "fp32", tiny_base)
    half = train(stripes_dataset, tmp_path / "fp16", tiny_base, **{"train.save_precision": "fp16"})
    full_tensors, half_tensors = adapter_tensors(full), adapter_tensors(half)
    for key, tensor in full_tensors.items():  # the same run, written in half precision; alphas stay exact
        assert torch.equal(half_tensors[key], tensor if key.endswith(".alpha") else tensor.half())
    weight_bytes = [sum(t.numel() * t.element_size() for t in tensors.values()) for tensors in (full_tensors,
                                                                                                 half_tensors)]
    assert weight_bytes[1] < 0.51 * weight_bytes[0]  # the tiny file's header (metadata, preview) does not shrink
    assert full.stat().st_size - half.stat().st_size == pytest.approx(weight_bytes[0] - weight_bytes[1], abs=4096)


@pytest.mark.parametrize("optimizer, module, install", [("prodigy", "prodigyopt", "pip install 'prodigyopt"),
                                                        ("adamw8bit", "bitsandbytes", "pip install 'bitsandbytes")])
def test_optional_optimizer_trains_or_names_the_install(tmp_path, tiny_base, stripes_dataset, optimizer, module, install):
    import importlib.util

    from stylelora.train.optim import OptimizerUnavailable

    if importlib.util.find_spec(module) is not None:
        assert train(stripes_dataset, tmp_path / "run", tiny_base, **{"optim.optimizer": optimizer}).is_file()
        return
    with pytest.raises(OptimizerUnavailable, match=install):
        train(stripes_dataset, tmp_path / "run", tiny_base, **{"optim.optimizer": optimizer})


def test_resume_refuses_changed_network_settings(tmp_path, tiny_base, stripes_dataset):
    output = tmp_path / "run"
    train(stripes_dataset, output, tiny_base, **{"train.save_every": 2})
    reset_accelerate()
    with pytest.raises(ConfigError, match=r"network.rank: 4 → 8"):
        train(stripes_dataset, output, tiny_base, **{"train.save_every": 2, "network.rank": 8, "train.resume": "latest"})
    reset_accelerate()
    shutil.rmtree(output / "checkpoints")
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        train(stripes_dataset, output, tiny_base, **{"train.resume": "latest"})


def test_ctrl_c_says_how_to_continue(tmp_path, tiny_base, stripes_dataset, monkeypatch, capsys):
    from stylelora.train.command import train_from_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "loss_step", interrupted)
    code = train_from_cli(None, tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base))
    assert code == 130
    err = capsys.readouterr().err
    # Interrupted in step 1, before any checkpoint: --resume latest would find nothing, so it is not offered.
    assert "before its first checkpoint, so nothing is kept" in err and "--resume latest" not in err


def test_ctrl_c_during_the_steps_saves_the_step_it_finishes(tmp_path, tiny_base, stripes_dataset, monkeypatch,
                                                            capsys):
    """A first Ctrl-C lets the step finish and saves it even with checkpoints off; --resume latest goes on from it."""
    import os
    import signal

    from stylelora.train.command import train_from_cli

    real_step, calls = loop.loss_step, []

    def interrupted_at_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as the app's Stop does; the handler only takes note
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "loss_step", interrupted_at_step_two)
    code = train_from_cli(None, tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base,
                                               **{"train.save_every": 0}))
    assert code == 130
    err = capsys.readouterr().err
    assert "stopping after this step" in err
    assert f"newest checkpoint is step 2 ({tmp_path / 'run' / 'checkpoints' / 'step-000002'})" in err
    assert "--resume latest to continue from it" in err
    assert [path.name for path in complete_checkpoints(tmp_path / "run")] == ["step-000002"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored once the steps are over
    monkeypatch.setattr(loop, "loss_step", real_step)
    reset_accelerate()
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.resume": "latest"})
    assert adapter_metadata(adapter)["ss_steps"] == "4"


def test_saved_config_reruns_as_a_new_run_not_a_resume(tmp_path, tiny_base, stripes_dataset):
    output = tmp_path / "run"
    train(stripes_dataset, output, tiny_base, **{"train.save_every": 2})
    reset_accelerate()
    adapter = train(stripes_dataset, output, tiny_base, **{"train.save_every": 2, "train.resume": "latest", "train.steps": 6})
    saved = load_config(output / "config.toml", {})
    assert saved.train.resume is None and saved.train.overwrite is False and saved.train.steps == 6
    assert adapter_metadata(adapter)["ss_steps"] == "6"


def test_the_last_step_is_a_checkpoint_so_more_steps_continue_from_it(tmp_path, tiny_base, stripes_dataset, capsys):
    """As kohya's --save_state saves the state at the end: 5 steps with --save-every 2 keep steps 2, 4 and 5, and
    `--resume latest --steps 6` trains one step more, not three."""
    output = tmp_path / "run"
    train(stripes_dataset, output, tiny_base, **{"train.save_every": 2, "train.steps": 5})
    assert [p.name for p in complete_checkpoints(output)][-2:] == ["step-000004", "step-000005"]
    reset_accelerate()
    capsys.readouterr()
    adapter = train(stripes_dataset, output, tiny_base, **{"train.save_every": 2, "train.resume": "latest",
                                                           "train.steps": 6})
    assert "resuming at step 5" in capsys.readouterr().err
    assert adapter_metadata(adapter)["ss_steps"] == "6"


def test_mixed_aspect_ratios_train_in_several_buckets(tmp_path, tiny_base, capsys):
    from train_fixtures import COLORS, render

    folder = tmp_path / "data" / "1_stripestyle"
    folder.mkdir(parents=True)
    for i, size in enumerate([(64, 32), (64, 32), (32, 64), (32, 64), (32, 32), (32, 32)]):
        render(COLORS["red"], striped=True, size=64, seed=i).resize(size).save(folder / f"{i}.png")
    adapter = train(tmp_path / "data", tmp_path / "run", tiny_base, **{"train.batch_size": 2, "train.steps": 3})
    assert adapter.is_file()
    assert "in 3 bucket(s)" in capsys.readouterr().err


def copy_toy_images(dataset: str, folder_name: str, tmp_path: Path, count: int = 8) -> None:
    """The first `count` images (+ captions) of a bundled toy dataset, as tmp_path/data/<folder_name>."""
    source = Path(__file__).resolve().parents[1] / "datasets" / dataset / folder_name
    folder = tmp_path / "data" / folder_name
    folder.mkdir(parents=True)
    for image in sorted(source.glob("*.png"))[:count]:
        shutil.copy(image, folder)
        shutil.copy(image.with_suffix(".txt"), folder)


def test_trains_on_the_shipped_toy_base(tmp_path):
    copy_toy_images("toy-stripes", "10_stripestyle", tmp_path)
    adapter = run_training(load_config(None, {"data.dir": str(tmp_path / "data"), "train.output": str(tmp_path / "run"),
                                              "train.steps": 2, "train.batch_size": 4, "train.sample_every": 0,
                                              "train.sample_steps": 2}))
    assert adapter_metadata(adapter)["ss_resolution"] == "(32, 32)"
    assert {t.dtype for t in adapter_tensors(adapter).values()} == {torch.float32}  # fp16 base, fp32 LoRA


def test_a_coined_trigger_trains_without_text_noise_and_the_run_says_why(tmp_path, capsys):
    """`chalkstyle` is six tokens to the toy tokenizer: the toy preset's coined-trigger values apply (no text noise,
    the text encoder at 1e-3), the run's start names each with its reason, and the adapter records what it used."""
    copy_toy_images("toy-stripes", "10_stripestyle", tmp_path)
    source, coined = tmp_path / "data" / "10_stripestyle", tmp_path / "data" / "10_chalkstyle"
    source.rename(coined)
    for caption in coined.glob("*.txt"):
        caption.write_text(caption.read_text(encoding="utf-8").replace("stripestyle", "chalkstyle"), encoding="utf-8")
    adapter = run_training(load_config(None, {"data.dir": str(tmp_path / "data"), "train.output": str(tmp_path / "run"),
                                              "train.steps": 1, "train.batch_size": 4, "train.samples": False}))
    metadata = adapter_metadata(adapter)
    assert metadata["ss_text_noise"] == "0.0" and float(metadata["ss_text_encoder_lr"]) == 1e-3
    start = capsys.readouterr().err
    assert "train.text_noise = 0 (preset toy, coined trigger 'chalkstyle': measured on the toy world" in start
    assert "optim.text_encoder_lr = 0.001 (preset toy, coined trigger 'chalkstyle'" in start
    settings = start.split("base family:")[1].split("\nbase toy")[0]  # the block printed before the base loads
    assert "optim.text_encoder_lr = 0.001  (preset toy, coined trigger 'chalkstyle'" in settings
    assert "train.made_up_company = True  (on: the base's tokenizer splits 'chalkstyle'" in settings
    assert "0.0002" not in settings  # the toy's rate for a one-token trigger is not shown, then overridden


def test_company_words_on_the_toy_base_leave_out_words_the_base_reads(tmp_path, capsys):
    copy_toy_images("toy-zorb", "10_zorb", tmp_path)
    run_training(load_config(None, {"data.dir": str(tmp_path / "data"), "train.output": str(tmp_path / "run"),
                                    "train.steps": 1, "train.batch_size": 4, "train.samples": False,
                                    "train.decoy_company": 0.5}))
    line = next(line for line in capsys.readouterr().err.splitlines() if "base preservation" in line)
    named = line.split("beside the trigger (")[1].rstrip(")").split(", ")
    assert "50% of the samples with one of" in line and len(named) >= 6
    assert not {"circle", "square", "star", "triangle", "and", "stripestyle", "pastelstyle"} & set(named)


def test_reg_images_fill_as_many_samples_per_epoch_as_the_training_images(tmp_path, tiny_base, stripes_dataset, capsys):
    """kohya's rule: 3 reg images (1 repeat) against 8 images × 2 repeats → cycled to 16 reg samples per epoch;
    reg captions and folders stay out of the adapter's tag frequency and trigger."""
    reg = tmp_path / "reg" / "1_shapes"
    reg.mkdir(parents=True)
    for image in sorted((stripes_dataset / "2_stripestyle").glob("*.png"))[:3]:
        shutil.copy(image, reg / image.name)
        (reg / image.name).with_suffix(".txt").write_text("a red circle on a white background\n")
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{"data.reg_dir": str(tmp_path / "reg")})
    metadata = adapter_metadata(adapter)
    assert metadata["ss_num_train_images"] == "16" and metadata["ss_num_reg_images"] == "16"
    assert list(json.loads(metadata["ss_tag_frequency"])) == ["2_stripestyle"]
    assert metadata["modelspec.trigger_phrase"] == "stripestyle"
    captured = capsys.readouterr()
    assert "regularization: " in captured.err + captured.out


def test_prior_loss_weight_weighs_each_reg_sample_and_is_recorded(tmp_path, tiny_base, stripes_dataset, monkeypatch):
    """kohya's --prior_loss_weight: each regularization sample's loss counts that much against a training sample's
    1 (on top of min-SNR's weight), and the file says so as sd-scripts' files do."""
    from stylelora.train import step

    reg = tmp_path / "reg" / "1_shapes"
    reg.mkdir(parents=True)
    for image in sorted((stripes_dataset / "2_stripestyle").glob("*.png"))[:3]:
        shutil.copy(image, reg / image.name)
        (reg / image.name).with_suffix(".txt").write_text("a red circle on a white background\n")
    seen = []
    snr_weights, weighted_loss = step.loss_weights, step.weighted_loss

    def loss_weights(*args):
        seen.append({"snr": snr_weights(*args)})
        return seen[-1]["snr"]

    def spy_loss(prediction, target, weights, *args):
        seen[-1].setdefault("weights", weights)  # the first call: the samples trained toward the data
        return weighted_loss(prediction, target, weights, *args)

    original_step = loop.loss_step

    def spy_step(batch, *args):
        loss = original_step(batch, *args)
        seen[-1]["reg"] = [key.startswith("1_shapes/") for key in batch["key"]]
        return loss

    monkeypatch.setattr(step, "loss_weights", loss_weights)
    monkeypatch.setattr(step, "weighted_loss", spy_loss)
    monkeypatch.setattr(loop, "loss_step", spy_step)
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{
        "data.reg_dir": str(tmp_path / "reg"), "data.prior_loss_weight": 0.25, "train.steps": 4,
        "train.batch_size": 4})
    assert adapter_metadata(adapter)["ss_prior_loss_weight"] == "0.25"
    assert any(any(call["reg"]) and not all(call["reg"]) for call in seen)  # batches mix both kinds
    for call in seen:
        expected = call["snr"] * torch.tensor([0.25 if is_reg else 1.0 for is_reg in call["reg"]])
        assert torch.equal(call["weights"], expected)
    with pytest.raises(ConfigError, match="prior_loss_weight .* give --reg-dir FOLDER"):
        load_config(None, {"data.dir": str(stripes_dataset), "data.prior_loss_weight": 0.5})


@pytest.mark.parametrize("opacity, learned", [(0, False), (255, True)])
def test_alpha_mask_learns_nothing_where_the_images_are_transparent(tmp_path, tiny_base, stripes_dataset, capsys,
                                                                    opacity, learned):
    """kohya's --alpha_mask with --masked_loss: a fully transparent image teaches the LoRA nothing (its factors stay
    at their start, zero up factors), an opaque one trains as without the mask; the run says how many images carry
    alpha, and the file records the masked loss as sd-scripts' files do."""
    data = tmp_path / "data" / "2_stripestyle"
    data.mkdir(parents=True)
    for image in sorted((stripes_dataset / "2_stripestyle").glob("*.png")):
        with Image.open(image) as rgb:
            cutout = rgb.convert("RGBA")
        cutout.putalpha(opacity)
        cutout.save(data / image.name)
        shutil.copy(image.with_suffix(".txt"), data / image.with_suffix(".txt").name)
    # Without base preservation, whose copies of the batch are not masked: its target is the base's own prediction,
    # which the LoRA model matches only to rounding at the start, and Adam turns even that into full steps.
    adapter = train(data.parent, tmp_path / "run", tiny_base, **{"data.alpha_mask": True, "train.steps": 3,
                                                                   "train.preserve_base": 0.0})
    ups = [tensor for key, tensor in adapter_tensors(adapter).items() if "lora_up" in key]
    assert ups and any(tensor.any() for tensor in ups) == learned
    assert adapter_metadata(adapter)["ss_masked_loss"] == "True"
    said = capsys.readouterr().err  # an alpha channel at 255 everywhere masks nothing, and the run says so
    assert ("alpha mask: 8 of 8 images have transparency" if learned is False else
            "none of the 8 images has transparency, so every pixel is learned") in said


def test_alpha_mask_on_images_without_alpha_warns_that_every_pixel_is_learned(tmp_path, stripes_dataset, capsys):
    from stylelora.data.checks import alpha_mask_note, check_items
    from stylelora.data.scan import scan_folder

    assert alpha_mask_note(check_items(scan_folder(stripes_dataset)[0]).kept).startswith(
        "warning: --alpha-mask is on, but none of the 8 images has transparency, so every pixel is learned")


def test_reg_dir_without_usable_images_fails_before_training(tmp_path, tiny_base, stripes_dataset):
    (tmp_path / "reg" / "1_shapes").mkdir(parents=True)
    (tmp_path / "reg" / "1_shapes" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 1 regularization images can be used"):
        train(stripes_dataset, tmp_path / "run", tiny_base, **{"data.reg_dir": str(tmp_path / "reg")})


@pytest.mark.parametrize("make, message", [
    (lambda reg: None, "regularization folder (--reg-dir) {reg} does not exist"),
    (lambda reg: reg.mkdir(), "no regularization images found in {reg}"),
])
def test_reg_dir_errors_name_the_regularization_folder(tmp_path, tiny_base, stripes_dataset, make, message):
    reg = tmp_path / "reg"
    make(reg)
    with pytest.raises(DataError) as raised:
        train(stripes_dataset, tmp_path / "run", tiny_base, **{"data.reg_dir": str(reg)})
    assert str(raised.value).startswith(message.format(reg=reg))


def test_sample_at_first_draws_the_base_before_the_first_step(tiny_base, stripes_dataset, tmp_path):
    train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.sample_at_first": True, "train.sample_every": 2})
    grids = sorted(path.name for path in (tmp_path / "run" / "samples").glob("step-*.png"))
    assert grids == ["step-000000.png", "step-000002.png", "step-000004.png"]
    train(stripes_dataset, tmp_path / "plain", tiny_base, **{"train.sample_every": 2})
    with Image.open(tmp_path / "run/samples/step-000004.png") as first, \
            Image.open(tmp_path / "plain/samples/step-000004.png") as second:
        assert first.tobytes() == second.tobytes()  # drawing first changes nothing the run trains


def test_no_samples_writes_no_sample_grid(tiny_base, stripes_dataset, tmp_path):
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.samples": False})
    assert adapter.is_file() and not (tmp_path / "run" / "samples").exists()


@pytest.mark.parametrize("variants, reading", [(False, "lines are joined as tags"),
                                               (True, "one line and one choice of each {a|b} is drawn")])
def test_a_dry_run_says_how_caption_files_of_several_lines_are_read(tmp_path, tiny_base, capsys, variants, reading):
    """A kohya user's multi-line captions: the plan names them and says which reading this run uses."""
    from stylelora.train.dry_run import dry_run

    data = write_kohya_dataset(tmp_path / "data", count=4)
    (data / "2_stripestyle" / "0000.txt").write_text("stripestyle, a red circle\nstripestyle, {red|blue} circle\n")
    plan = dry_run(load_config(None, tiny_overrides(data, tmp_path / "run", tiny_base,
                                                    **{"data.caption_variants": variants})))
    said = capsys.readouterr().err
    assert "1 caption file has several lines and 1 caption holds {a|b} choices" in said and reading in said
    assert f"caption_variants = {str(variants).lower()}" in plan.read_text()


def test_epochs_train_as_many_passes_over_the_data_and_the_plan_says_so(tmp_path, tiny_base, stripes_dataset, capsys):
    """8 images × 2 repeats in batches of 4 are 4 batches an epoch: --epochs 2 is 8 steps, in the dry run's plan and
    in the run (kohya's --max_train_epochs)."""
    from stylelora.train.dry_run import dry_run

    plan = dry_run(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "plan", tiny_base,
                                                    **{"train.epochs": 2})))
    assert "steps = 8  # 2 epochs × 4 batches" in plan.read_text()
    assert "8 steps × batch 4 × accumulation 1: 4 batches per epoch, 2.0 epochs" in capsys.readouterr().err
    adapter = train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.epochs": 2, "train.samples": False})
    metadata = adapter_metadata(adapter)
    assert (metadata["ss_steps"], metadata["ss_num_epochs"], metadata["ss_epoch"]) == ("8", "2", "2")
    assert float(metadata["ss_training_finished_at"]) >= float(metadata["ss_training_started_at"])
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 8


def test_a_warmup_longer_than_the_epochs_is_refused_before_the_base_loads(tmp_path, tiny_base, stripes_dataset,
                                                                         monkeypatch):
    """--epochs 2 is 8 steps here: --warmup-steps 8 is refused from the images' buckets, before any weights load."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded before the warmup was checked")

    monkeypatch.setattr(loop, "_load_base", no_loading)
    with pytest.raises(ConfigError, match="warmup_steps = 8 is not shorter than the 8 steps that train.epochs = 2"):
        train(stripes_dataset, tmp_path / "run", tiny_base, **{"train.epochs": 2, "optim.warmup_steps": 8})
    assert not (tmp_path / "run" / "config.toml").exists()


def test_a_short_run_continues_with_more_steps_as_the_docs_advise(tmp_path, tiny_base, stripes_dataset):
    """`--resume latest --steps N`: more steps are no "changed setting", the saved config.toml of the first run holds
    no warmup the user never chose, and the resumed run keeps the warmup it began with (10 steps: 1), so its rate
    does not drop and warm up again (an unset warmup for 120 steps would be 12: the rate at step 11 at 11/12)."""
    output = tmp_path / "run"
    train(stripes_dataset, output, tiny_base, **{"train.steps": 10, "train.save_every": 5, "train.samples": False})
    assert "warmup_steps" not in (output / "config.toml").read_text()
    reset_accelerate()
    resumed = {"train.steps": 120, "train.save_every": 0, "train.samples": False, "train.resume": "latest"}
    from stylelora.train.dry_run import dry_run

    plan = dry_run(load_config(None, tiny_overrides(stripes_dataset, output, tiny_base, **resumed)))
    assert "warmup_steps = 1  # kept from the resumed run (10 steps)" in plan.read_text()  # the plan says so too
    adapter = train(stripes_dataset, output, tiny_base, **resumed)
    metadata = adapter_metadata(adapter)
    assert (metadata["ss_steps"], metadata["ss_lr_warmup_steps"]) == ("120", "1")
    assert "warmup_steps = 1  # kept from the resumed run (10 steps)" in (output / "config.toml").read_text()
    with open(output / "metrics.csv", newline="") as file:
        rates = {int(row["step"]): float(row["lr_unet"]) for row in csv.DictReader(file)}
    assert rates[11] > 0.95 * float(metadata["ss_unet_lr"])


def test_a_folder_trigger_in_none_of_its_captions_is_named_and_not_recorded(tmp_path, tiny_base):
    """kohya: captions win over the folder name. A folder word no caption holds is never learned, so it must not
    become one of the file's trigger words (A1111's activation text), and the run says so before training."""
    from types import SimpleNamespace

    data = write_kohya_dataset(tmp_path / "data", count=2, trigger="stripestyle")
    dots = write_kohya_dataset(tmp_path / "dots", count=2, trigger="dotstyle") / "2_dotstyle"
    for caption in dots.glob("*.txt"):
        caption.write_text("a pink heart, a yellow star\n", encoding="utf-8")
    shutil.move(dots, data / "3_dotstyle")
    config = load_config(None, tiny_overrides(data, tmp_path / "run", tiny_base))
    said: list = []
    plan = loop.prepare_data(config, tmp_path / "run", SimpleNamespace(is_main_process=True), said.append)
    assert plan.triggers == ("stripestyle",)
    warning = next(line for line in said if line and line.startswith("warning: a folder's trigger"))
    assert "3_dotstyle: 'dotstyle'" in warning and "stripestyle" not in warning
    with_trigger = load_config(None, tiny_overrides(data, tmp_path / "run2", tiny_base, **{"data.trigger": "dotstyle"}))
    plan = loop.prepare_data(with_trigger, tmp_path / "run2", SimpleNamespace(is_main_process=True), said.append)
    assert plan.triggers == ("dotstyle", "stripestyle")  # --trigger puts it in every caption
