"""Data-parallel training with no code change: `torchrun --nproc_per_node 2` on CPU (gloo) writes one adapter."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_fixtures import (
    REPO,
    adapter_metadata,
    cli_args,
    subprocess_env,
    tiny_overrides,
)

TORCHRUN = Path(sys.executable).with_name("torchrun")
DDP_TIMEOUT_S = 50  # the whole 2-process run, launch included: ~10 s on 2 cores


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_process_torchrun_trains_and_writes_one_adapter(tmp_path, tiny_base, stripes_dataset):
    base, data = tiny_base, stripes_dataset
    output = tmp_path / "run"
    overrides = tiny_overrides(data, output, base, **{"train.batch_size": 2, "train.steps": 4, "train.save_every": 2,
                                                      "train.sample_every": 4, "train.output_name": "ddp"})
    command = [str(TORCHRUN if TORCHRUN.exists() else shutil.which("torchrun")), "--standalone",
               "--nproc_per_node", "2", "-m", "stylelora.train.command", "train", *cli_args(overrides, tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=DDP_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]

    assert sorted(p.name for p in output.glob("*.safetensors")) == ["ddp.safetensors"]
    assert result.stdout.strip().splitlines() == [str(output / "ddp.safetensors")]  # printed once, by rank 0
    assert "world size 2" in result.stderr and result.stderr.count("Found 8 images") == 1
    metadata = adapter_metadata(output / "ddp.safetensors")
    assert metadata["ss_total_batch_size"] == "4" and metadata["ss_batch_size_per_device"] == "2"
    checkpoint = output / "checkpoints" / "step-000004"
    assert (checkpoint / "rng-rank0.pt").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    assert (output / "samples" / "step-000004.png").is_file()
