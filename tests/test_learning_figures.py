"""benchmarks/learning_figures.py's report: the figures quoted for the trainer issue, and where shapes went wrong."""
from __future__ import annotations

import re

from train_fixtures import load_benchmark


def load_script():
    return load_benchmark("learning_figures")


def sweep(style: str, plain_shape: float, trigger_shape: float | None, rates: list[float]) -> list[dict]:
    rows = [{"weight": w, "shape_accuracy": 1.0, "color_accuracy": 1.0, f"{style}_rate": r,
             "shape_by_prompt_set": {"plain": 1.0, style: 1.0}} for w, r in zip((0, 0.25, 0.5, 0.75, 1.0), rates)]
    rows[-1]["shape_by_prompt_set"] = {"plain": plain_shape, style: trigger_shape}
    return rows


def test_report_shows_plain_and_trigger_shape_accuracy_and_monotonicity(capsys):
    figures = {"styles": {
        "pastel": {"train_seconds": 325.0, "sweep": sweep("pastel", 0.8125, 0.875, [0, 0, 0, 0.16, 0.91])},
        "zorb": {"train_seconds": None, "sweep": sweep("zorb", 0.969, None, [0, 0, 0.5, 0.4, 0.97])},
    }}
    load_script().report(figures)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "0.812/0.875" in lines["pastel"] and " 325 " in lines["pastel"] and "True" in lines["pastel"]
    assert "0.969/-" in lines["zorb"]  # zorb prompts draw the character: no shape to score
    assert "False" in lines["zorb"]  # 0.5 then 0.4 is not monotonic


def test_report_reads_figures_written_before_the_breakdown_was_recorded(capsys):
    rows = sweep("stripes", 1.0, 1.0, [0, 0, 0.2, 0.9, 1.0])
    for row in rows:
        del row["shape_by_prompt_set"]
    load_script().report({"styles": {"stripes": {"train_seconds": 1.0, "sweep": rows}}})
    assert "-/-" in capsys.readouterr().out


def test_report_shows_the_blend_and_each_adapter_alone_on_the_stacked_prompts(capsys):
    blend = {"stripes:1+pastel:1": {"all_styles_rate": 0.406},
             "sweeps": {"stripes": [{"stripes_rate": r} for r in (0, 0.5, 1.0)],
                        "pastel": [{"pastel_rate": r} for r in (0, 0.6, 0.4)]}}
    styles = {"stripes": {"train_seconds": 1.0, "sweep": sweep("stripes", 1.0, 1.0, [0, 0, 0, 0, 1.0])}}
    load_script().report({"styles": styles, "blend": {**blend, "alone_on_stacked_prompts": {"stripes": 1.0,
                                                                                         "pastel": 0.969}}})
    out = capsys.readouterr().out
    blend_line = next(line for line in out.splitlines() if "0.406" in line)  # the blend's all_styles_rate
    assert re.findall(r"\b(?:True|False)\b", blend_line) == ["True", "False"]  # stripes monotonic, pastel not
    assert re.findall(r"\d\.\d{3}", out.split(blend_line, 1)[1]) == ["1.000", "0.969"]  # each alone, in order
    load_script().report({"styles": styles, "blend": blend})  # figures.json written before it was measured
    assert out.split(blend_line, 1)[0] in (again := capsys.readouterr().out)  # same table and blend line ...
    assert "0.969" not in again.split("0.406", 1)[1]  # ... and no alone rates after them
