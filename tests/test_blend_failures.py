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
    assert "the toy world's own renders of these prompts: 0 of 4 miss a style" in printed
    assert "the same renders encoded and decoded by the base's VAE: 0 of 4 miss a style" in printed  # the ceiling
    assert "colors read wrong, the toy world's renders: 0 of 4" in printed
    for row in ("pastel+zorb in split", "pastel alone", "zorb alone"):
        assert re.search(rf"^colors read wrong, {re.escape(row)}: \d+ of 4", printed, re.M)
    sheet = Image.open(tmp_path / "out" / "pastel+zorb-split.png")
    assert sheet.size == (missed * 32 * 8, 2 * 32 * 8)  # each failure over the adapter it lost, alone, 8x
    wrong = int(re.search(r"^colors read wrong, pastel\+zorb in split: (\d+) of 4", printed, re.M).group(1))
    colors = tmp_path / "out" / "pastel+zorb-split-colors.png"
    assert (Image.open(colors).size == (wrong * 32 * 8, 2 * 32 * 8)) if wrong else not colors.exists()


def test_a_missing_adapter_is_named_first(tmp_path):
    with pytest.raises(SystemExit, match="no adapter at .*toy-stripes.safetensors, .*toy-zorb.safetensors: train it with stylelora train"):
        load_benchmark("blend_failures").main(["--adapters-dir", str(tmp_path), "--pair", "stripes+zorb"])


def test_color_misses_count_what_was_asked_against_what_was_read(capsys):
    from types import SimpleNamespace

    failures = load_benchmark("blend_failures")
    prompts = [SimpleNamespace(color=color) for color in ("yellow", "yellow", "yellow", "blue")]
    verdicts = [{"color": read} for read in ("orange", "orange", "yellow", "purple")]
    assert failures.color_misses(prompts, verdicts) == {("yellow", "orange"): 2, ("blue", "purple"): 1}
    failures.print_color_misses(prompts, {"a+b in split": verdicts, "a alone": [{"color": p.color} for p in prompts]})
    assert capsys.readouterr().out.splitlines() == [
        "colors read wrong, a+b in split: 3 of 4 (yellow -> orange 2 of 3, blue -> purple 1 of 1)",
        "colors read wrong, a alone: 0 of 4",
    ]
