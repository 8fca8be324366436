"""kohya's block-wise learning rates and ranks (down/mid/up_lr_weight, block_lr_zero_threshold, block_dims and
block_alphas): the block each layer of the published UNets is in, as sd-scripts numbers it; the named curves; the
lists checked against the base before it loads; and a run whose file and optimizer follow them."""
from __future__ import annotations

import json
import math
import re

import pytest

from stylelora.config import ConfigError, load_config
from stylelora.lora.sd15 import sd15_config
from stylelora.lora.sdxl import sdxl_config
from stylelora.train.block_settings import block_plan, curve
from train_fixtures import adapter_metadata, adapter_tensors, reset_accelerate, tiny_overrides


def settings(**values):
    return load_config(None, {"data.dir": "d", **values})


def kohya_sd1_index(kohya_name: str) -> int:
    """sd-scripts' get_block_index for SD 1.x/2.x names, written out from its rule (networks/lora.py)."""
    found = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", kohya_name)
    if found:
        i, j = int(found.group(2)), int(found.group(4))
        idx = 3 * i + (2 if found.group(3) in ("upsamplers", "downsamplers") else j)
        return 1 + idx if found.group(1) == "down" else 12 + 1 + idx
    return 12 if "mid_block_" in kohya_name else -1


@pytest.mark.parametrize("path, index", [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 1),  # IN01
    ("down_blocks.1.attentions.1.proj_in", 5),  # IN05
    ("down_blocks.2.downsamplers.0.conv", 9),  # IN09
    ("down_blocks.3.resnets.1.conv2", 11),  # IN11
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", 12),  # M00
    ("up_blocks.0.resnets.2.conv1", 15),  # OUT02
    ("up_blocks.1.attentions.0.proj_out", 16),  # OUT03
    ("up_blocks.2.upsamplers.0.conv", 21),  # OUT08
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v", 24),  # OUT11
])
def test_sd15_layers_take_the_block_sd_scripts_gives_them(path, index):
    plan = block_plan(settings(**{"network.block_dims": ",".join(["4"] * 25)}), sd15_config("unet"), sdxl=False)
    assert plan.index(path) == index == kohya_sd1_index("lora_unet_" + path.replace(".", "_"))


@pytest.mark.parametrize("path, kohya_name, index", [
    # sd-scripts numbers SDXL from its SAI names: 0 time embedding, 1 + n input_blocks.n, 10 + n middle_block.n,
    # 13 + n output_blocks.n, 22 the output layers.
    ("down_blocks.1.attentions.0.proj_in", "input_blocks_4_1_proj_in", 5),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_k", "input_blocks_8_1_transformer_blocks_9", 9),
    ("mid_block.resnets.0.conv1", "middle_block_0_in_layers_2", 10),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_q", "middle_block_1_transformer_blocks_0", 11),
    ("mid_block.resnets.1.conv2", "middle_block_2_out_layers_3", 12),
    ("up_blocks.0.attentions.2.proj_out", "output_blocks_2_1_proj_out", 15),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks_5_2_conv", 18),
    ("up_blocks.2.resnets.2.conv2", "output_blocks_8_0_out_layers_3", 21),
])
def test_sdxl_layers_take_the_block_sd_scripts_gives_them(path, kohya_name, index):
    plan = block_plan(settings(**{"network.block_dims": ",".join(["4"] * 23)}), sdxl_config("unet"), sdxl=True)
    assert plan.index(path) == index
    assert plan.index("lora_unet_" + kohya_name) == index  # the SAI names of sd-scripts' own files agree


@pytest.mark.parametrize("text, expected", [
    ("linear", [i / 11 for i in range(12)]),
    ("reverse_linear+0.5", [0.5 + (11 - i) / 11 for i in range(12)]),
    ("sine", [math.sin(math.pi * i / 11 / 2) for i in range(12)]),
    ("cosine", [math.sin(math.pi * (11 - i) / 11 / 2) for i in range(12)]),
    ("zeros+0.25", [0.25] * 12),
])
def test_the_named_curves_are_sd_scripts(text, expected):
    assert curve(text, 12) == pytest.approx(expected)


def test_a_curve_fills_the_input_blocks_and_the_threshold_drops_the_low_ones():
    plan = block_plan(settings(**{"optim.down_lr_weight": "linear", "optim.mid_lr_weight": "0.5",
                                  "optim.block_lr_zero_threshold": 0.3}), sd15_config("unet"), sdxl=False)
    expected = [0.0, 0.0, 0.0, 0.0] + [i / 11 for i in range(4, 12)] + [0.5] + [1.0] * 12
    assert plan.lr == pytest.approx(expected)
    assert plan.shape("down_blocks.0.attentions.1.proj_in", conv=False) is None  # IN02 at 0.18: no module
    assert plan.shape("down_blocks.1.attentions.0.proj_in", conv=False) == (16, 16.0)  # IN04 at 0.36


@pytest.mark.parametrize("values, message", [
    ({"network.block_dims": "4,4,4"}, r"--block-dims 4,4,4 gives 3 values, but this base's UNet has 25 blocks there: "
                                      r"IN00,IN01,.*,M00,OUT00,.*OUT11"),
    ({"optim.up_lr_weight": "1,1"}, r"--up-lr-weight 1,1 gives 2 values, but this base's UNet has 12 blocks there"),
    ({"optim.mid_lr_weight": "1,1,1"}, r"gives 3 values, but this base's UNet has 1 blocks there: M00"),
])
def test_a_list_of_the_wrong_length_names_the_blocks(values, message):
    with pytest.raises(ConfigError, match=message):
        block_plan(settings(**values), sd15_config("unet"), sdxl=False)


@pytest.mark.parametrize("values, message", [
    ({"network.block_dims": "4,x"}, r"--block-dims 4,x: 'x' is not a whole number"),
    ({"optim.down_lr_weight": "sinus"}, r"'sinus' is not a number.*curves: cosine, sine, linear"),
    ({"optim.up_lr_weight": "sine+a"}, r"after '\+' give the number every block adds, e.g. sine\+0.5"),
    ({"network.block_alphas": "1,-2"}, r"'-2' must be 0 or more"),
    ({"network.conv_block_dims": "1,2"}, r"network.conv_block_dims sets the 3x3 convs' LoRA, which only "
                                        r"--unet-targets locon trains"),
    ({"optim.block_lr_zero_threshold": 0.1}, r"block_lr_zero_threshold applies to --down-lr-weight"),
])
def test_bad_values_are_refused_before_anything_loads(values, message):
    with pytest.raises(ConfigError, match=message):
        settings(**values)


def test_a_run_trains_each_block_as_its_lists_say(tmp_path, tiny_base, stripes_dataset):
    """The tiny base's blocks: IN00-IN03, M00, OUT00-OUT03 (attention in IN01, IN03, M00 and every OUT)."""
    from stylelora.lora.inject import add_lora
    from stylelora.train.optim import param_groups

    overrides = {"optim.up_lr_weight": "0,0.5,1,1", "optim.mid_lr_weight": "0",
                 "network.block_dims": "4,4,4,4,4,8,8,8,2", "optim.warmup_steps": 0}
    try:
        from stylelora.train.loop import run_training
        adapter = run_training(load_config(None, tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base,
                                                                **overrides)))
    finally:
        reset_accelerate()
    tensors = adapter_tensors(adapter)
    downs = {key.removesuffix(".lora_down.weight"): t.shape[0] for key, t in tensors.items()
             if key.startswith("lora_unet_") and key.endswith(".lora_down.weight")}
    assert not [key for key in downs if key.startswith(("lora_unet_mid_block", "lora_unet_up_blocks_0_attentions_0"))]
    ranks = {prefix: {rank for key, rank in downs.items() if key.startswith(prefix)}
             for prefix in ("lora_unet_down_blocks", "lora_unet_up_blocks_0_attentions_1", "lora_unet_up_blocks_1_"
                            "attentions_0", "lora_unet_up_blocks_1_attentions_1")}
    assert ranks == {"lora_unet_down_blocks": {4}, "lora_unet_up_blocks_0_attentions_1": {8},
                     "lora_unet_up_blocks_1_attentions_0": {8}, "lora_unet_up_blocks_1_attentions_1": {2}}
    assert json.loads(adapter_metadata(adapter)["ss_network_args"]) == {
        "up_lr_weight": "0,0.5,1,1", "mid_lr_weight": "0", "block_dims": "4,4,4,4,4,8,8,8,2"}

    # The optimizer: OUT01's factors at half the UNet's rate, every other UNet factor at the rate.
    from diffusers import StableDiffusionPipeline
    config = load_config(None, tiny_overrides(stripes_dataset, tmp_path / "x", tiny_base, **overrides,
                                              **{"optim.unet_lr": 1e-3, "optim.text_encoder_lr": 1e-4}))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    plan = block_plan(config, pipe.unet.config, sdxl=False)
    params = add_lora(pipe.unet, pipe.text_encoder, rank=4, alpha=4, unet_shape=plan.shape,
                      unet_lr_weight=plan.lr_weight)
    rate = {id(p): group["lr"] for group in param_groups(config, params) for p in group["params"]}
    for path, module in pipe.unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            expected = 5e-4 if path.startswith("up_blocks.0.attentions.1.") else 1e-3
            assert rate[id(module.lora_A["default"].weight)] == expected, path
    assert {rate[id(p)] for p in params.text_encoder} == {1e-4}


def test_a_list_of_the_wrong_length_stops_a_dry_run_before_the_base_loads(tmp_path, tiny_base, stripes_dataset,
                                                                          capsys):
    from stylelora.train.dry_run import dry_run

    config = load_config(None, tiny_overrides(stripes_dataset, tmp_path / "dry", tiny_base,
                                              **{"optim.down_lr_weight": "1,1,1,1,1,1,1,1,1,1,1,1"}))
    with pytest.raises(ConfigError, match=r"gives 12 values, but this base's UNet has 4 blocks there: "
                                          r"IN00,IN01,IN02,IN03"):
        dry_run(config)
    good = load_config(None, tiny_overrides(stripes_dataset, tmp_path / "dry", tiny_base,
                                            **{"optim.down_lr_weight": "0,0,1,1"}))
    dry_run(good)
    assert "UNet blocks: learning rate × IN00 0, IN01 0, IN02 1, IN03 1" in capsys.readouterr().err
