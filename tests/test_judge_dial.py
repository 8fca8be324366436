"""benchmarks/judge_dial.py: the judge on the toy world's renders faded from the plain render to the styled one sees
no style at share 0 and every style at share 1, and a fade halfway is halfway in every pixel."""
from __future__ import annotations

import re

import numpy as np
from train_fixtures import load_benchmark


def test_the_fade_runs_from_no_style_to_the_full_style(capsys):
    dial = load_benchmark("judge_dial")
    assert dial.main(["--samples", "6", "--shares", "0", "0.5", "1"]) == 0
    printed = capsys.readouterr().out
    for style in ("stripes", "pastel", "zorb"):
        cells = re.search(rf"^{style} +0: ([\d.]+) \([\d.]+\) \| 0.5: [\d.]+ \([\d.]+\) \| 1: ([\d.]+) ", printed + " ",
                          re.M)
        assert cells and (float(cells.group(1)), float(cells.group(2))) == (0.0, 1.0), printed


def test_a_fade_mixes_the_two_renders_in_pixels():
    dial = load_benchmark("judge_dial")
    from stylelora.toy.evaluate import build_prompts

    prompt = build_prompts(1, 0, ("zorb",))[0]
    plain, styled = dial.render_pair(prompt, "zorb")
    assert np.abs(plain - styled).max() > 100  # a circle against the character
    halfway = np.asarray(dial.faded([(plain, styled)], 0.5)[0], dtype=np.float32)
    assert np.abs(halfway - (plain + styled) / 2).max() <= 0.5 + 1e-6
