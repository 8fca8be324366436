"""benchmarks/train_speed.py: the diffusers example script's data, the rounds' medians, and the side-by-side report."""
from __future__ import annotations

import json
import re
import sys

import pytest

from train_fixtures import load_benchmark


def load_script():
    return load_benchmark("train_speed")


def test_the_example_script_reads_every_image_with_its_caption_as_an_imagefolder(tmp_path):
    data = tmp_path / "10_sks"
    data.mkdir()
    from PIL import Image

    for name, caption in (("a", "sks, a red circle"), ("b", "sks, a blue star")):
        Image.new("RGB", (16, 16)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(caption)
    out = load_script().imagefolder_copy(str(tmp_path), tmp_path / "folder")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["text"] for r in rows) == ["sks, a blue star", "sks, a red circle"]
    for row in rows:
        image = out / row["file_name"]
        assert image.is_file() and image.resolve().parent == data.resolve()


def test_each_number_is_the_median_of_the_rounds():
    rounds = [{"label": "floor", "cpu_median_s": s, "peak_rss_mb": m} for s, m in ((0.3, 900), (0.1, 950), (0.2, 940))]
    assert load_script().median_of_rounds(rounds) == {"label": "floor", "cpu_median_s": 0.2, "peak_rss_mb": 940}


def result(seconds: float, label: str) -> dict:
    return {"label": label, "cpu_median_s": seconds, "median_s": seconds, "cpu_mean_s": seconds, "wall_s": 10.0,
            "startup_s": 1.0, "peak_rss_mb": 900.0, "trainable_params": 23040, "images": 300, "resolution": 64}


def test_the_report_prints_the_trainers_speed_over_the_real_scripts(capsys):
    results = {key: result(seconds, key) for key, seconds in (
        ("floor", 0.20), ("floor_adamw", 0.21), ("cached", 0.21), ("uncached", 0.25), ("preserve", 0.30),
        ("example", 0.26), ("script", 0.34))}
    load_script().report(results)
    numbers = set(re.findall(r"\d+\.\d+", capsys.readouterr().out))  # the figures, whatever the words around them
    assert "1.050" in numbers  # trainer (cache) / floor = 0.21 / 0.20
    assert "1.62" in numbers  # real script / trainer (cache) = 0.34 / 0.21
    assert "1.70" in numbers  # real script / floor = 0.34 / 0.20


def test_the_real_script_is_only_compared_at_its_own_settings(monkeypatch):
    module = load_script()
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--diffusers-script", "x.py"])
    with pytest.raises(SystemExit, match="--preset example"):
        module.modes(module.parse_args())
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--preset", "example", "--diffusers-script", "x.py"])
    assert list(module.modes(module.parse_args()))[-2:] == ["example", "script"]
