"""benchmarks/blend_quality.py's goal checks on the prompts carrying only one of a blend's two triggers."""
from __future__ import annotations

import pytest

from train_fixtures import load_benchmark


def row(stripes: float, zorb: float, shape: float | None = None, color: float = 1.0) -> dict:
    return {"stripes_rate": stripes, "pastel_rate": 0.0, "zorb_rate": zorb, "shape_accuracy": shape,
            "color_accuracy": color}


FIGURES = {
    "base": {"stripes": row(0.0, 0.0, 1.0), "zorb": row(0.02, 0.0)},
    "alone": {"stripes": {"stripes": row(0.97, 0.0, 1.0)}, "zorb": {"zorb": row(0.0, 0.76)}},
}


@pytest.mark.parametrize("single, failed", [
    # each adapter as alone on its own prompts, the other off: nothing fails
    ({"stripes": row(0.97, 0.0, 0.98), "zorb": row(0.05, 0.75)}, []),
    # the character leaks onto the style's prompts (a user who asked only for stripes gets zorbs)
    ({"stripes": row(0.97, 0.30, 0.98), "zorb": row(0.0, 0.76)}, ["zorb off on stripes prompts (vs base)"]),
    # the style draws worse shapes in the blend, and the character is weaker than alone
    ({"stripes": row(0.97, 0.0, 0.90), "zorb": row(0.0, 0.60)},
     ["shape on stripes prompts within 0.05 of stripes alone", "rate on zorb prompts within 0.05 of zorb alone"]),
    # the style's leak is measured against what the base draws there (0.02), not against 0
    ({"stripes": row(0.97, 0.0, 1.0), "zorb": row(0.07, 0.76)}, []),
    ({"stripes": row(0.97, 0.0, 1.0), "zorb": row(0.08, 0.76)}, ["stripes off on zorb prompts (vs base)"]),
])
def test_single_trigger_checks_name_what_a_user_of_the_blend_would_notice(single, failed):
    checks = load_benchmark("blend_quality").single_trigger_checks(FIGURES, single, "stripes", "zorb")
    assert sorted(label for label, (_, met) in checks.items() if not met) == sorted(failed)
    assert "shape on zorb prompts within 0.05 of zorb alone" not in checks  # the character has no shape to score


def test_pixel_share_says_how_far_the_images_moved_toward_the_full_weight():
    import numpy as np

    pixel_share = load_benchmark("blend_quality").pixel_share
    base = np.zeros((3, 2, 1, 3), dtype=np.float32)
    full = np.ones_like(base)
    full[2] = 0  # an image the adapter leaves as the base draws it: left out
    partial = np.stack([np.full((2, 1, 3), 0.2), np.full((2, 1, 3), 0.9), np.full((2, 1, 3), 0.5)]).astype(np.float32)
    # image 0 moved a fifth of the way, image 1 nine tenths: median 0.55, one of the two nearer the full weight's
    assert pixel_share(base, partial, full) == {"pixels": 0.55, "closer": 0.5}
    assert pixel_share(base, base, full) == {"pixels": 0.0, "closer": 0.0}
    assert pixel_share(base, base, base) == {"pixels": None, "closer": None}


def test_text_encoder_reach_is_each_tokens_rms_change():
    import torch

    base = torch.zeros(3, 4)
    adapted = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    changes = load_benchmark("text_encoder_reach").token_changes(base, adapted, ["<s>", "stripestyle", ","])
    assert changes == [("<s>", 0.0), ("stripestyle", 1.0), (",", 1.0)]  # sqrt(4/4) for the last


def test_layer_cut_keeps_drops_and_scales_modules_by_name():
    import torch

    def module(name: str) -> dict:
        return {f"{name}.lora_down.weight": torch.ones(2, 4), f"{name}.lora_up.weight": torch.ones(4, 2),
                f"{name}.alpha": torch.tensor(2.0)}

    names = ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q")
    tensors = {k: v for name in names for k, v in module(name).items()}
    cut = load_benchmark("layer_cut").cut
    kept = {key.split(".")[0] for key in cut(tensors, keep_unet="attn2_to_[kv]")}
    assert kept == {names[0], names[1]}  # the text encoder stays unless a pattern names it
    assert {key.split(".")[0] for key in cut(tensors, drop="attn2_to_[kv]")} == {names[0], names[2]}
    scaled = cut(tensors, scale={"attn2_to_[kv]": 0.5})
    assert torch.equal(scaled[f"{names[1]}.lora_up.weight"], torch.full((4, 2), 0.5))
    assert torch.equal(scaled[f"{names[1]}.lora_down.weight"], torch.ones(2, 4))  # the delta halves once
    assert torch.equal(scaled[f"{names[2]}.lora_up.weight"], torch.ones(4, 2))


def test_the_dial_refuses_flags_that_leave_nothing_to_turn():
    benchmark = load_benchmark("blend_quality")
    for clash in (["--dial-reading", "--dial-te-weight", "1"], ["--dial-reading", "--dial-unet-weight", "1"],
                  ["--dial-te-weight", "1", "--dial-unet-weight", "1"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(clash)
