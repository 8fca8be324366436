"""`stylelora train` QA of the kohya sd-scripts options, as a kohya user types them, through the real CLI on the tiny
base: --network-weights (other ranks, LoCon, diffusers and peft files, a file without a text encoder, bad paths, with
--resume), multi-resolution and input-perturbation noise, --loss-type / --huber-*, --debiased-estimation-loss, the
cosine_with_restarts / polynomial schedules, --save-precision and the max-norm columns of metrics.csv; their kohya
spellings on the command line and in run.toml, --dry-run, resume refusals, adapter metadata and value errors."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate
from train_fixtures import cli_output as cli
from train_fixtures import cli_status as run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--steps", "2", "--no-samples", "--batch-size", "4", "--rank", "4", "--alpha", "4"]
STILL = ["--steps", "1", "--unet-lr", "1e-12", "--text-encoder-lr", "1e-12"]  # a step that moves nothing measurable
# Every new noise / loss / schedule option at once; a resume must repeat them.
KOHYA_EXTRAS = ["--loss-type", "huber", "--huber-schedule", "exponential", "--huber-c", "0.2",
                "--debiased-estimation-loss", "--multires-noise-iterations", "4", "--multires-noise-discount", "0.2",
                "--ip-noise-gamma", "0.1", "--ip-noise-gamma-random-strength", "--noise-offset", "0.05",
                "--noise-offset-random-strength", "--lr-scheduler", "cosine_with_restarts",
                "--lr-scheduler-num-cycles", "2", "--scale-weight-norms", "0.001"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    reset_accelerate()


def train_args(data: Path, base: Path, output: Path, *extra) -> list:
    return ["train", data, "--base", base, *TINY, "--output", output, *extra]


def problems(err: str) -> list[str]:
    """The bullet lines of a refused configuration ("  - train.x must be ...")."""
    return [line for line in err.splitlines() if line.startswith("  - ")]


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's weight change (up @ down × alpha / rank) in a kohya file."""
    state, out = adapter_tensors(path), {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            up, alpha = state[f"{module}.lora_up.weight"].float(), state[f"{module}.alpha"].float()
            out[module] = (up.flatten(1) @ down.float().flatten(1)) * alpha / down.shape[0]
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_base, stripes_dataset) -> dict[str, Path]:
    """Finished runs to start from: plain rank 4 (UNet + text encoder); UNet-only in diffusers layout; LoCon (conv
    rank 2); `full`, 4 steps with every new option, fp16 files and a checkpoint per step."""
    root = tmp_path_factory.mktemp("sources")
    runs = {"plain": [], "unet_only": ["--no-text-encoder", "--format", "diffusers"],
            "locon": ["--unet-targets", "locon", "--conv-rank", "2"],
            "full": [*KOHYA_EXTRAS, "--save-precision", "fp16", "--steps", "4", "--save-every", "1"]}
    for name, extra in runs.items():
        assert run(*train_args(stripes_dataset, tiny_base, root / name, *extra)) == 0, name
    return {name: root / name / "stripes.safetensors" for name in runs}


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, sources, tiny_base) -> dict[str, Path]:
    """A peft adapter folder (UNet only, rank 4, alpha 2), an SDXL-looking kohya file, a pickle."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from stylelora.lora.inject import add_lora

    root = tmp_path_factory.mktemp("odd")
    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    torch.manual_seed(3)
    add_lora(unet, None, rank=4, alpha=2.0, train_text_encoder=False, init_lora_weights=False)
    (root / "peft").mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
              str(root / "peft" / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in unet.peft_config["default"].to_dict().items()}
    (root / "peft" / "adapter_config.json").write_text(json.dumps(config, default=str), encoding="utf-8")
    state = adapter_tensors(sources["plain"])
    sdxl = {k.replace("lora_te_", te, 1) if k.startswith("lora_te_") else k: v.clone()
            for te in ("lora_te1_", "lora_te2_") for k, v in state.items()}
    metadata = {**adapter_metadata(sources["plain"]), "ss_base_model_version": "sdxl_base_v1-0",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    save_file(sdxl, str(root / "sdxl_like.safetensors"), metadata=metadata)
    torch.save(state, root / "model.ckpt")
    return {"peft": root / "peft", "sdxl": root / "sdxl_like.safetensors", "ckpt": root / "model.ckpt"}


# ----------------------------------------------------------------------------- 1. kohya spellings on the command line


@pytest.mark.parametrize("kohya, ours", [
    (["--multires_noise_iterations", "6"], "--multires-noise-iterations"),
    (["--network_weights", "x.safetensors"], "--network-weights"),
    (["--loss_type", "huber"], "--loss-type"),
    (["--save_precision", "fp16"], "--save-precision"),
    (["--huber_c=0.2"], "--huber-c"),
    (["--debiased_estimation_loss"], "--debiased-estimation-loss"),
    (["--ip_noise_gamma_random_strength"], "--ip-noise-gamma-random-strength"),
    (["--lr_scheduler_num_cycles", "3"], "--lr-scheduler-num-cycles"),
    (["--scale_weight_norms", "1"], "--scale-weight-norms"),
])
def test_kohya_spellings_of_the_new_flags_name_ours(tmp_path, capsys, kohya, ours):
    status, out, err = cli(capsys, "train", tmp_path, *kohya)
    assert status == 2 and out == ""
    assert f"  {kohya[0].split('=')[0]}: {ours}" in err.splitlines()


def test_kohyas_dim_from_weights_names_what_to_do(tmp_path, capsys):
    status, _, err = cli(capsys, "train", tmp_path, "--network-weights", "x.safetensors", "--dim_from_weights")
    assert status == 2 and "  --dim_from_weights: --dim-from-weights" in err


# ----------------------------------------------------------------------------- 2. the same options in run.toml


def test_every_new_option_reads_from_run_toml_and_is_recorded_as_from_the_file(tmp_path, capsys, tiny_base,
                                                                               stripes_dataset, sources):
    (tmp_path / "run.toml").write_text(f"""
[network]
weights = "{sources['plain']}"
[optim]
lr_scheduler = "polynomial"
lr_scheduler_power = 2.0
scale_weight_norms = 1.0
[train]
loss_type = "smooth_l1"
huber_schedule = "constant"
huber_c = 0.3
debiased_estimation_loss = true
multires_noise_iterations = 6
multires_noise_discount = 0.5
ip_noise_gamma = 0.1
ip_noise_gamma_random_strength = true
save_precision = "bf16"
""", encoding="utf-8")
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), "--config",
                         tmp_path / "run.toml", "--dry-run")
    assert status == 0, err
    saved = (tmp_path / "run" / "config.toml").read_text(encoding="utf-8")
    for line in ('lr_scheduler_power = 2.0', 'loss_type = "smooth_l1"', 'huber_c = 0.3', 'save_precision = "bf16"',
                 'debiased_estimation_loss = true', 'multires_noise_iterations = 6', 'ip_noise_gamma = 0.1'):
        assert f"{line}  # file run.toml" in saved, line
    assert f"starts from {sources['plain'].name}: 96 LoRA modules of rank 4" in err


def test_run_toml_keys_in_kohyas_section_or_the_wrong_one_name_where_they_go(tmp_path, capsys, tiny_base,
                                                                             stripes_dataset):
    (tmp_path / "run.toml").write_text("""
[training_arguments]
multires_noise_iterations = 6
save_precision = "fp16"
[optim]
loss_type = "huber"
""", encoding="utf-8")
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), "--config",
                         tmp_path / "run.toml")
    assert status == 2 and "Traceback" not in err
    assert "multires_noise_iterations (it belongs under [train]); save_precision (it belongs under [train])" in err
    assert "unknown key 'loss_type' in [optim] (it belongs under [train])" in err


def test_kohyas_network_weights_key_in_run_toml_names_ours(tmp_path, capsys, tiny_base, stripes_dataset):
    (tmp_path / "run.toml").write_text('[network]\nnetwork_weights = "x.safetensors"\n', encoding="utf-8")
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), "--config",
                         tmp_path / "run.toml")
    assert status == 2 and "weights under [network]" in err


# ----------------------------------------------------------------------------- 3. --dry-run


def test_a_dry_run_lists_each_new_option_with_its_source(tmp_path, capsys, tiny_base, stripes_dataset, sources):
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), *KOHYA_EXTRAS,
                         "--save-precision", "fp16", "--network-weights", sources["plain"], "--dry-run")
    assert status == 0, err
    for shown in ("train.loss_type = 'huber'  (flag)", "train.huber_c = 0.2  (flag)",
                  "train.debiased_estimation_loss = True  (flag)", "train.multires_noise_iterations = 4  (flag)",
                  "train.ip_noise_gamma_random_strength = True  (flag)", "optim.lr_scheduler_num_cycles = 2  (flag)",
                  "train.save_precision = 'fp16'  (flag)", "optim.scale_weight_norms = 0.001  (flag)",
                  f"network.weights = '{sources['plain']}'  (flag)"):
        assert shown in err, shown
    assert "(matched to this run's layers once the base loads)" in err
    assert not (tmp_path / "run" / "stripes.safetensors").exists()


def _mismatch(sources, odd_files, case: str) -> list:
    """A start file and the flags of a run it does not fit."""
    return {"rank": [sources["plain"], "--rank", "8"],
            "text encoder": [sources["plain"], "--no-text-encoder"],
            "sdxl": [odd_files["sdxl"]]}[case]


MISMATCH_MESSAGES = {"rank": "has LoRA rank 4 where this run has 8 (--rank 8)",
                     "text encoder": "drop --no-text-encoder (the file trains the text encoder)",
                     "sdxl": "is an SDXL LoRA and cannot be used with this SD 1.x/2.x-architecture base model"}


@pytest.mark.parametrize("case", list(MISMATCH_MESSAGES))
def test_a_start_file_that_does_not_fit_is_refused_in_one_line_naming_the_fix(tmp_path, capsys, tiny_base,
                                                                              stripes_dataset, sources, odd_files,
                                                                              case):
    weights, *flags = _mismatch(sources, odd_files, case)
    status, out, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), *flags,
                           "--network-weights", weights)
    assert status == 2 and out == "" and "Traceback" not in err
    assert "stylelora train: error: network.weights (--network-weights): " in err and MISMATCH_MESSAGES[case] in err
    assert not (tmp_path / "run" / "stripes.safetensors").exists()


@pytest.mark.parametrize("case", list(MISMATCH_MESSAGES))
def test_a_dry_run_refuses_a_start_file_the_run_would_refuse(tmp_path, capsys, tiny_base, stripes_dataset, sources,
                                                             odd_files, case):
    weights, *flags = _mismatch(sources, odd_files, case)
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), *flags,
                         "--network-weights", weights, "--dry-run")
    assert status == 2 and MISMATCH_MESSAGES[case] in err


def test_a_unet_only_diffusers_file_starts_the_unet_and_the_text_encoder_starts_at_zero(tmp_path, capsys, tiny_base,
                                                                                         stripes_dataset, sources):
    """A file trained with --no-text-encoder (here in diffusers layout) into a run that trains the text encoder, at
    another alpha: the UNet modules start with the file's exact weight change, the text encoder's with none."""
    status, out, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), *STILL,
                           "--alpha", "2", "--network-weights", sources["unet_only"])
    assert status == 0, err
    assert ("starting from stripes.safetensors: 84 of this run's 96 LoRA modules take its weights; the text "
            "encoder's 12 start at zero, as in a new run.") in err
    before, after = deltas(sources["unet_only"].with_name("stripes.safetensors")), deltas(Path(out.split()[-1]))
    assert not any(key.startswith("lora_te") for key in before)  # diffusers keys read as kohya's
    assert all(torch.allclose(after[key], before[key], atol=1e-7) for key in before)
    assert max(after[key].abs().max() for key in after if key.startswith("lora_te")) < 1e-9


def test_a_locon_file_needs_locon_targets_and_then_starts_every_module(tmp_path, capsys, tiny_base, stripes_dataset,
                                                                       sources):
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "attn"),
                         "--network-weights", sources["locon"])
    assert status == 2 and ("stripes.safetensors has LoRA modules on layers --unet-targets kohya does not train: "
                            "add --unet-targets locon.") in err
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "conv"), "--unet-targets",
                         "locon", "--network-weights", sources["locon"])  # the convs' rank is the file's 2, not 4
    assert status == 2 and "train at the file's rank: --rank 4 --conv-rank 2." in err
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "locon"), "--unet-targets",
                         "locon", "--conv-rank", "2", "--network-weights", sources["locon"])
    assert status == 0 and "starting from stripes.safetensors: 127 of this run's 127 LoRA modules" in err


def test_a_peft_folder_starts_the_unet_rescaled_to_this_runs_alpha(tmp_path, capsys, tiny_base, stripes_dataset,
                                                                   odd_files):
    status, out, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), *STILL,
                           "--network-weights", odd_files["peft"])
    assert status == 0, err
    assert "starting from adapter_model.safetensors: 84 of this run's 96 LoRA modules take its weights" in err
    from safetensors.torch import save_file

    from stylelora.lora.adapter_file import read_adapter_file  # the peft alpha (2) read from adapter_config.json

    save_file(read_adapter_file(odd_files["peft"]).state, str(tmp_path / "as_kohya.safetensors"))
    before, after = deltas(tmp_path / "as_kohya.safetensors"), deltas(Path(out.split()[-1]))
    assert all(torch.allclose(after[key], before[key], atol=1e-7) for key in before)


@pytest.mark.parametrize("case, expected", [
    ("missing", "missing.safetensors does not exist; give the .safetensors LoRA file to start from."),
    ("run folder", "is a folder without adapter_model.safetensors; pass an adapter .safetensors file"),
    ("ckpt", "Refusing to load model.ckpt: it is a pickle file"),
    ("not a lora", "diffusion_pytorch_model.safetensors is not a LoRA in kohya (lora_unet_*/lora_te_*)"),
])
def test_a_start_path_that_is_no_lora_file_is_refused_before_the_base_loads(tmp_path, capsys, tiny_base,
                                                                            stripes_dataset, sources, odd_files,
                                                                            monkeypatch, case, expected):
    from stylelora.train import loop

    path = {"missing": tmp_path / "missing.safetensors", "run folder": sources["plain"].parent,
            "ckpt": odd_files["ckpt"], "not a lora": tiny_base / "unet" / "diffusion_pytorch_model.safetensors"}[case]
    monkeypatch.setattr(loop, "_load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    status, out, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"),
                           "--network-weights", path)
    assert status == 2 and out == "" and expected in err and "Traceback" not in err
    if case == "run folder":  # the run's adapter is named for the user to pass instead
        assert f"such as {sources['plain']}." in err


def test_a_checkpoint_folders_suggestion_names_only_a_file_that_loads(tmp_path, capsys, tiny_base, stripes_dataset,
                                                                      sources):
    checkpoint = sources["full"].parent / "checkpoints" / "step-000004"
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "folder"),
                         "--network-weights", checkpoint)
    assert status == 2 and str(checkpoint / "stripes-step000004.safetensors") in err
    status, _, refusal = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "file"), *KOHYA_EXTRAS,
                             "--network-weights", checkpoint / "lora_weights.safetensors")
    assert status == 0 or "lora_weights.safetensors" not in err, refusal


def test_an_empty_network_weights_is_not_read_as_the_current_folder(tmp_path, capsys, tiny_base, stripes_dataset):
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), "--network-weights", "")
    assert status == 0 and ". is a folder" not in err and "starting from" not in err, err  # unset: a new LoRA


# ----------------------------------------------------------------------------- 5. resume


def _resumable(sources, tmp_path: Path) -> Path:
    """A copy of the `full` run (4 steps, checkpoints at 2, 3 and 4), to resume."""
    return Path(shutil.copytree(sources["full"].parent, tmp_path / "full"))


def test_a_resume_with_the_same_options_continues_and_may_change_the_save_precision(tmp_path, capsys, tiny_base,
                                                                                    stripes_dataset, sources):
    output = _resumable(sources, tmp_path)
    status, out, err = cli(capsys, *train_args(stripes_dataset, tiny_base, output), *KOHYA_EXTRAS,
                           "--resume", "latest", "--steps", "5", "--save-precision", "fp32")
    assert status == 0, err
    assert f"resuming at step 4 from {output / 'checkpoints' / 'step-000004'}" in err
    tensors = adapter_tensors(Path(out.split()[-1]))
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}  # the fp16 run's resume writes fp32
    assert adapter_metadata(Path(out.split()[-1]))["ss_steps"] == "5"


@pytest.mark.parametrize("change, named", [
    (["--loss-type", "smooth_l1"], "train.loss_type: 'huber' → 'smooth_l1'"),
    (["--multires-noise-iterations", "6"], "train.multires_noise_iterations: 4 → 6"),
    (["--ip-noise-gamma", "0.2"], "train.ip_noise_gamma: 0.1 → 0.2"),
    (["--huber-c", "0.3"], "train.huber_c: 0.2 → 0.3"),
    (["--lr-scheduler-num-cycles", "3"], "optim.lr_scheduler_num_cycles: 2 → 3"),
])
def test_a_resume_with_another_noise_or_loss_setting_is_refused_naming_it(tmp_path, capsys, tiny_base,
                                                                          stripes_dataset, sources, monkeypatch,
                                                                          change, named):
    from stylelora.train import loop

    output = _resumable(sources, tmp_path)
    monkeypatch.setattr(loop, "_load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    status, out, err = cli(capsys, *train_args(stripes_dataset, tiny_base, output), *KOHYA_EXTRAS, *change,
                           "--resume", "latest", "--steps", "6")
    assert status == 2 and out == ""
    assert (f"stylelora train: error: cannot resume from {output / 'checkpoints' / 'step-000004'}: these settings "
            f"differ from the checkpoint's run: {named}. Use the original values (its settings are in "
            f"{output / 'config.toml'}), or start a new run without --resume.") in err


def test_network_weights_on_a_resume_is_not_said_to_be_taken(tmp_path, capsys, tiny_base, stripes_dataset, sources):
    output = _resumable(sources, tmp_path)
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, output), *KOHYA_EXTRAS, "--resume",
                         "latest", "--steps", "5", "--network-weights", sources["plain"])
    assert status == 0 and "take its weights" not in err, err
    assert "network.weights (--network-weights) is not read on a resume: the run continues from its checkpoint's " \
           "weights." in err


@pytest.fixture(scope="module")
def started_run(tmp_path_factory, tiny_base, stripes_dataset, sources) -> Path:
    """A 1-step run (checkpoint at step 1) started with --network-weights from a file since deleted."""
    root = tmp_path_factory.mktemp("started")
    start = Path(shutil.copy(sources["plain"], root / "start.safetensors"))
    assert run(*train_args(stripes_dataset, tiny_base, root / "run"), "--steps", "1", "--save-every", "1",
               "--network-weights", start) == 0
    start.unlink()
    return root / "run"


def test_a_run_started_from_a_file_resumes_after_the_file_is_gone(tmp_path, capsys, tiny_base, stripes_dataset,
                                                                  started_run):
    output = Path(shutil.copytree(started_run, tmp_path / "run"))
    status, _, err = cli(capsys, *train_args(stripes_dataset, tiny_base, output), "--resume", "latest")
    assert status == 0 and "resuming at step 1" in err


def test_a_run_started_from_a_file_resumes_from_its_config_toml_after_the_file_is_gone(tmp_path, capsys,
                                                                                       stripes_dataset, started_run):
    output = Path(shutil.copytree(started_run, tmp_path / "run"))
    status, _, err = cli(capsys, "train", stripes_dataset, "--config", output / "config.toml", "--output", output,
                         "--resume", "latest", "--steps", "2")
    assert status == 0 and "resuming at step 1" in err, err


# ----------------------------------------------------------------------------- 6. metadata, files and metrics.csv


def test_inspect_json_shows_the_new_ss_keys_as_kohya_writes_them(capsys, sources):
    status, out, _ = cli(capsys, "inspect", sources["full"], "--json")
    report = json.loads(out)
    training = report["training"]
    assert status == 0 and report["dtypes"] == {"float16": 192}  # --save-precision fp16
    assert {key: training[key] for key in ("ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_debiased_estimation",
                                           "ss_multires_noise_iterations", "ss_multires_noise_discount",
                                           "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength",
                                           "ss_noise_offset", "ss_noise_offset_random_strength", "ss_lr_scheduler",
                                           "ss_scale_weight_norms")} == {
        "ss_loss_type": "huber", "ss_huber_schedule": "exponential", "ss_huber_c": 0.2,
        "ss_debiased_estimation": "True", "ss_multires_noise_iterations": 4, "ss_multires_noise_discount": 0.2,
        "ss_ip_noise_gamma": 0.1, "ss_ip_noise_gamma_random_strength": "True", "ss_noise_offset": 0.05,
        "ss_noise_offset_random_strength": "True", "ss_lr_scheduler": "cosine_with_restarts",
        "ss_scale_weight_norms": 0.001}
    assert training["ss_training_args"]["optim"]["lr_scheduler_num_cycles"] == 2
    assert training["ss_training_args"]["train"]["save_precision"] == "fp16"
    status, out, _ = cli(capsys, "inspect", sources["plain"], "--json")
    plain = json.loads(out)["training"]
    assert (plain["ss_multires_noise_iterations"], plain["ss_ip_noise_gamma"], plain["ss_loss_type"],
            plain["ss_debiased_estimation"], plain["ss_scale_weight_norms"]) == ("None", "None", "l2", "False", "None")


def test_save_precision_halves_the_shared_files_but_not_the_checkpoints_state(sources):
    checkpoint = sources["full"].parent / "checkpoints" / "step-000004"
    for shared in (sources["full"], checkpoint / "stripes-step000004.safetensors"):
        tensors = adapter_tensors(shared)
        assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
        assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}  # alphas exact
    assert {t.dtype for t in adapter_tensors(checkpoint / "lora_weights.safetensors").values()} == {torch.float32}
    assert sources["full"].stat().st_size < 0.7 * sources["plain"].stat().st_size


def test_metrics_csv_has_kohyas_max_norm_columns_and_the_restart_schedule(sources):
    with (sources["full"].parent / "metrics.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["keys_scaled"]) for row in rows] == [96] * 4  # every module capped at 0.001
    assert all(abs(float(row["max_key_norm"]) - 0.001) < 1e-6 for row in rows)
    assert all(float(row["average_key_norm"]) <= float(row["max_key_norm"]) + 1e-9 for row in rows)
    assert [round(float(row["lr_unet"]), 6) for row in rows] == [0.001, 0.0005, 0.001, 0.0005]  # two cycles
    with (sources["plain"].parent / "metrics.csv").open(encoding="utf-8") as handle:
        plain = list(csv.DictReader(handle))
    assert {(row["keys_scaled"], row["average_key_norm"], row["max_key_norm"]) for row in plain} == {("", "", "")}


# ----------------------------------------------------------------------------- 7. bad values


@pytest.mark.parametrize("flags, problem", [
    (["--loss-type", "huber", "--huber-c", "0"], "train.huber_c must be in (0, 1]; 0.1 is kohya's default (got 0.0)"),
    (["--loss-type", "mse"], "train.loss_type must be one of l2, l1, huber, smooth_l1 (got 'mse')"),
    (["--lr-scheduler-num-cycles", "3"], "optim.lr_scheduler_num_cycles only applies to optim.lr_scheduler = "
                                         "'cosine_with_restarts' (got 'cosine'); add --lr-scheduler "
                                         "cosine_with_restarts or drop it"),
    (["--lr-scheduler-power", "2"], "optim.lr_scheduler_power only applies to optim.lr_scheduler = 'polynomial'"),
    (["--huber-schedule", "constant"], "train.huber_schedule / huber_c only apply to train.loss_type = 'huber' or "
                                       "'smooth_l1' (got 'l2'); add --loss-type huber or drop them"),
    (["--multires-noise-discount", "0.5"], "train.multires_noise_discount only applies with "
                                           "train.multires_noise_iterations above 0"),
    (["--ip-noise-gamma-random-strength"], "train.ip_noise_gamma_random_strength only applies with "
                                           "train.ip_noise_gamma above 0; add e.g. --ip-noise-gamma 0.1"),
    (["--ip-noise-gamma", "1"], "train.ip_noise_gamma must be in [0, 1); 0.1 is usual (got 1.0)"),
    (["--save-precision", "fp8"], "train.save_precision must be one of fp32, fp16, bf16 (got 'fp8')"),
    (["--lr-scheduler", "polynomial", "--lr-scheduler-power", "0"], "optim.lr_scheduler_power must be > 0"),
])
def test_a_bad_value_is_one_clear_line_and_exit_status_2(tmp_path, capsys, tiny_base, stripes_dataset, flags,
                                                         problem):
    status, out, err = cli(capsys, *train_args(stripes_dataset, tiny_base, tmp_path / "run"), *flags)
    assert status == 2 and out == "" and "Traceback" not in err
    assert len(problems(err)) == 1 and problems(err)[0].startswith(f"  - {problem}"), err
    assert not (tmp_path / "run").exists()
