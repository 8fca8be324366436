"""benchmarks/prompt_wording.py: evaluate's prompts reworded without their background phrase."""
from __future__ import annotations

import pytest

from train_fixtures import load_benchmark

wording = load_benchmark("prompt_wording")


@pytest.mark.parametrize("prompt_set", wording.SETS)
def test_rewording_keeps_the_triggers_and_the_subject_and_drops_only_the_background(prompt_set):
    from stylelora.toy.evaluate import build_prompts

    for prompt in build_prompts(8, 0, (prompt_set,)):
        cut = wording.without_background(prompt.prompt)
        assert prompt.prompt.startswith(cut) and prompt.prompt[len(cut):].endswith(" background")
        assert cut.split(", ")[:-1] == prompt.prompt.split(", ")[:-1]  # the triggers, as evaluated
        assert "background" not in cut and cut.endswith(f"{prompt.color} {prompt.shape}")


def test_rows_name_both_rates_for_a_pair_and_the_shape_where_there_is_one():
    pair = {"set": "pastel+zorb", "wording": "as evaluated", "example": "pastelstyle, zorb, a red zorb",
            "all_styles_rate": 0.79, "pastel_rate": 1.0, "zorb_rate": 0.79, "shape_accuracy": None,
            "color_accuracy": 0.95}
    assert "both 0.79 (1.00 / 0.79), color 0.95" in wording.format_row(pair)
    alone = {"set": "pastel", "wording": "without the background", "example": "pastelstyle, a red star",
             "pastel_rate": 1.0, "shape_accuracy": 0.5, "color_accuracy": 1.0}
    assert "rate 1.00, shape 0.50, color 1.00" in wording.format_row(alone)
    base = {"set": "plain", "wording": "as evaluated", "example": "a red star", "stripes_rate": 0.0,
            "shape_accuracy": 0.94, "color_accuracy": 1.0}
    assert "as evaluated            shape 0.94, color 1.00" in wording.format_row(base)


def test_a_reword_rule_changes_the_first_occurrence_and_is_checked():
    assert wording.reworded("pastelstyle, zorb, a red zorb", "zorb=(zorb:1.2)") == "pastelstyle, (zorb:1.2), a red zorb"
    assert wording.parse_args(["--reword", "zorb=(zorb:1.2)"]).reword == ["zorb=(zorb:1.2)"]
    with pytest.raises(SystemExit):
        wording.parse_args(["--reword", "zorb"])
