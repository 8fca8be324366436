"""benchmarks/memory.py without training: its options, its modes' trainer flags, and its table and verdicts."""
from __future__ import annotations

import pytest

from train_fixtures import load_benchmark


@pytest.fixture(scope="module")
def memory():
    return load_benchmark("memory")


def test_modes_bases_and_json_options(memory):
    args = memory.parse_args(["--modes", "full, nf4,full", "--bases", "sd15", "--json", "out.json"])
    assert (args.modes, args.bases, args.json, args.worker) == (["full", "nf4"], ["sd15"], "out.json", None)
    defaults = memory.parse_args([])
    assert defaults.modes == list(memory.MODES) and defaults.bases == ["sd15", "sdxl"]
    for wrong in (["--modes", "full,fp8"], ["--bases", "sd3"]):
        with pytest.raises(SystemExit):
            memory.parse_args(wrong)


def test_every_lora_mode_is_a_valid_train_command(memory, tmp_path):
    from stylelora.train.command import build_parser

    parser = build_parser()
    for key, mode in memory.MODES.items():
        if mode.trainer_flags is None:
            continue
        args = parser.parse_args(["train", str(tmp_path), *memory.train_arguments("BASE", "OUT", 256),
                                  *mode.trainer_flags])
        assert args.command == "train", key


def test_table_ratios_and_verdicts_per_base(memory):
    Result = memory.Result
    results = [Result("full", "full fine-tune", 10000.0, 4.0), Result("lora", "LoRA fp32", 3400.0, 3.0),
               Result("nf4", "LoRA nf4", 1900.0, 5.0),
               Result("full", "full fine-tune", None, None, note="needs ~45 GiB", base="sdxl"),
               Result("bf16", "LoRA bf16", 8000.0, 20.0, base="sdxl")]
    table = memory.format_table(results)
    sd15, sdxl = table.split("\n\n")
    lines = sd15.splitlines()
    assert lines[0] == "SD 1.5" and lines[1].split() == ["mode", "peak", "MiB", "×", "full", "s/step"]
    assert lines[3].split()[-3:] == ["3400", "0.340", "3.00"]
    assert "default LoRA / full = 0.340 (target ≤ 0.35: met)" in sd15
    assert "best LoRA mode (nf4) / full = 0.190 (target ≤ 0.2: met)" in sd15
    lines = sdxl.splitlines()
    assert lines[0] == "SDXL" and "skipped" in lines[2] and lines[2].endswith("needs ~45 GiB")
    assert lines[3].split()[-3:] == ["8000", "-", "20.00"] and "target" not in sdxl
