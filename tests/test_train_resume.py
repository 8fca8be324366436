"""Resume is exact: a run killed with SIGKILL and resumed ends with the same adapter, tensor for tensor."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stylelora.train.checkpoint import complete_checkpoints, resolve_resume
from train_fixtures import REPO, adapter_tensors, cli_args, subprocess_env, tiny_overrides

KILL_AT_LOSS_CALL = """
import os, signal, sys
from stylelora.train import loop
real_step, calls = loop.loss_step, []
def killed_mid_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as if the machine pulled the plug
    return real_step(*args, **kwargs)
loop.loss_step = killed_mid_step
from stylelora.train.command import main
sys.exit(main(sys.argv[1:]))
"""


def run_train(overrides: dict, toml_dir: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    args = ["train"] + cli_args(overrides, toml_dir)
    if kill_at is None:
        command = [sys.executable, "-m", "stylelora.train.command", *args]
    else:
        command = [sys.executable, "-c", KILL_AT_LOSS_CALL.format(kill_at=kill_at), *args]
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def losses(run_dir: Path) -> list[tuple[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [(row["step"], row["loss"]) for row in csv.DictReader(handle)]


# (With kohya's LoRA dropouts, which draw from torch's generator inside the model, the resume is exact too:
# tests/test_qa_block_dropout_options.py, with and without gradient checkpointing.)
def test_resume_after_sigkill_is_tensor_exact(tmp_path, tiny_base, stripes_dataset):
    data = stripes_dataset
    settings = {"train.steps": 7, "train.save_every": 3, "train.sample_every": 3, "optim.grad_accum": 2,
                "train.batch_size": 3, "data.flip": True, "data.shuffle_tags": True, "data.caption_dropout": 0.2,
                "train.noise_offset": 0.05, "train.output_name": "style"}

    straight = run_train(tiny_overrides(data, tmp_path / "straight", tiny_base, **settings), tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]

    interrupted_dir = tmp_path / "interrupted"
    overrides = tiny_overrides(data, interrupted_dir, tiny_base, **settings)
    # Loss call 9 is the first micro-batch of step 5: after the step-3 checkpoint, mid-way to the next one.
    killed = run_train(overrides, tmp_path / "b", kill_at=9)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in complete_checkpoints(interrupted_dir)] == ["step-000003"]
    assert not (interrupted_dir / "style.safetensors").exists()

    resumed = run_train({**overrides, "train.resume": "latest"}, tmp_path / "c")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 3" in resumed.stderr

    expected = adapter_tensors(tmp_path / "straight" / "style.safetensors")
    actual = adapter_tensors(interrupted_dir / "style.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert losses(interrupted_dir) == losses(tmp_path / "straight")  # same loss at every step, none logged twice


def test_latest_ignores_a_checkpoint_whose_write_was_interrupted(tmp_path):
    run_dir = tmp_path / "run"
    good = run_dir / "checkpoints" / "step-000003"
    good.mkdir(parents=True)
    (good / "training_state.pt").write_bytes(b"x")
    half = run_dir / "checkpoints" / ".tmp-step-000006"
    half.mkdir()
    (half / "training_state.pt").write_bytes(b"x")
    unfinished = run_dir / "checkpoints" / "step-000009"  # no state file: not a checkpoint
    unfinished.mkdir()
    assert resolve_resume("latest", run_dir) == good
    assert resolve_resume(str(run_dir), run_dir) == good  # a run folder means its newest checkpoint
    assert resolve_resume(str(good), tmp_path) == good


def test_a_checkpoint_saved_before_an_option_existed_resumes_at_its_default(tmp_path):
    """A checkpoint's settings name only the options of the version that wrote it: one it lacks (caption_variants,
    epochs) counts as that option's default, and a setting it names still has to match."""
    from stylelora.config import ConfigError, config_to_dict, load_config
    from stylelora.train.checkpoint import check_resumable

    current = config_to_dict(load_config(None, {"data.dir": "d"}))
    older = {section: dict(values) for section, values in current.items()}
    del older["data"]["caption_variants"]
    check_resumable(older, current, tmp_path / "checkpoints" / "step-000004")
    changed = config_to_dict(load_config(None, {"data.dir": "d", "data.caption_variants": True}))
    with pytest.raises(ConfigError, match=r"data.caption_variants: False → True"):
        check_resumable(older, changed, tmp_path / "checkpoints" / "step-000004")
