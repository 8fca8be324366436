"""benchmarks/blend_failures.py: every image of the pair's stacked prompts that misses a style is counted by its
prompt's background and color and put on the contact sheet above the adapter it lost, alone; a missing adapter file
is named before anything is drawn."""
from __future__ import annotations

import re

import pytest
from PIL import Image
from test_app_fixtures import make_toy_adapter
from train_fixtures import load_benchmark


def test_failures_are_counted_and_drawn(tmp_path, capsys):
    adapters = tmp_path / "adapters"
    for seed, (style, trigger) in enumerate((("pastel", "pastelstyle"), ("zorb", "zorb"))):
        folder = adapters / f"toy-{style}"
        folder.mkdir(parents=True)
        make_toy_adapter(folder / f"toy-{style}.safetensors", seed, trigger=trigger)
    failures = load_benchmark("blend_failures")
    assert failures.main(["--adapters-dir", str(adapters), "--pair", "pastel+zorb", "--samples", "4",
                          "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    missed = int(re.search(r"pastel\+zorb in split: (\d+) of 4 images miss a style", printed).group(1))
    assert missed == 4  # random adapters draw neither the pastel style nor the character
    backgrounds = re.findall(r"^  (white|black|gray|beige) +(\d+) of (\d+)$", printed, re.M)
    assert sum(int(count) for _, count, _ in backgrounds) == missed
    assert sum(int(total) for _, _, total in backgrounds) == 4
    sheet = Image.open(tmp_path / "out" / "pastel+zorb-split.png")
    assert sheet.size == (missed * 32 * 8, 2 * 32 * 8)  # each failure over the adapter it lost, alone, 8x


def test_a_missing_adapter_is_named_first(tmp_path):
    with pytest.raises(SystemExit, match="no adapter at .*toy-stripes.safetensors, .*toy-zorb.safetensors: train it with stylelora train"):
        load_benchmark("blend_failures").main(["--adapters-dir", str(tmp_path), "--pair", "stripes+zorb"])
