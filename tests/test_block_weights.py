"""A1111's LoRA Block Weight (`lbw=`): the block lists of SD 1.x and SDXL as the extension numbers them, which block
each layer name is in, parsing and refusals, `--lora` and `<lora:...>` syntax and PNG round trips, each block's
multiplier reaching exactly that block's layers, and a saved blend with block weights equal to the live one."""
from __future__ import annotations

import pytest
import torch
from gen_fixtures import load_tiny_base, make_adapter, model_outputs, pixels, tiny_pipeline

from stylelora.generate.generate import GenerateRequest, generate, request_from_parameters
from stylelora.generate.prompt_tags import LoraTag, PromptTagError, parse_prompt
from stylelora.generate.stack import AdapterStack
from stylelora.lora.block_weights import PRESETS, BlockLayout, BlockWeightError, parse_ratios
from stylelora.lora.blend import blend
from stylelora.lora.inspect import format_inspect, inspect_adapter
from stylelora.lora.sd15 import sd15_config
from stylelora.lora.sdxl import sdxl_config
from stylelora.lora.spec import AdapterSpec, parse_lora_arg
from stylelora.models.family import base_unet_config

# The extension's lists (sd-webui-lora-block-weight, BLOCKID17/26 and BLOCKID12/20), written out as users read them.
SD1_ATTENTION = "BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11"
SD1_EVERY = ("BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,IN09,IN10,IN11,M00,"
             "OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08,OUT09,OUT10,OUT11")
SDXL_ATTENTION = "BASE,IN04,IN05,IN07,IN08,M00,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05"
SDXL_EVERY = ("BASE,IN00,IN01,IN02,IN03,IN04,IN05,IN06,IN07,IN08,M00,"
              "OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08")


def sd15_layout():
    return BlockLayout.from_config(sd15_config("unet"))


@pytest.mark.parametrize("config, attention, every", [
    (lambda: sd15_config("unet"), SD1_ATTENTION, SD1_EVERY),
    (lambda: sdxl_config("unet"), SDXL_ATTENTION, SDXL_EVERY),
])
def test_the_published_unets_number_their_blocks_as_the_extension_does(config, attention, every):
    layout = BlockLayout.from_config(config())
    assert ",".join(layout.blocks(attention_only=True)) == attention
    assert ",".join(layout.blocks()) == every


@pytest.mark.parametrize("name, block", [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),  # diffusers paths (the stack's keys)
    ("down_blocks.2.attentions.1.proj_in", "IN08"),
    ("down_blocks.1.downsamplers.0.conv", "IN06"),
    ("down_blocks.3.resnets.1.conv1", "IN11"),
    ("mid_block.attentions.0.proj_out", "M00"),
    ("up_blocks.1.attentions.0.proj_in", "OUT03"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "OUT11"),
    ("up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("lora_unet_down_blocks_1_attentions_0_proj_in", "IN04"),  # kohya's SD 1.x names
    ("lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k", "OUT07"),
    ("lora_unet_mid_block_attentions_0_proj_in", "M00"),
    ("lora_unet_input_blocks_7_1_proj_in", "IN07"),  # SAI/SGM names (kohya's SDXL files)
    ("output_blocks.10.1.transformer_blocks.0.attn1.to_v", "OUT10"),
    ("lora_unet_middle_block_1_proj_out", "M00"),
    ("conv_in", "IN00"),
    ("time_embedding.linear_1", None),
])
def test_each_layer_name_is_in_its_block(name, block):
    assert sd15_layout().block_of(name) == block


def test_presets_and_numbers_parse_and_bad_values_say_what_to_write():
    assert parse_ratios("OUTALL") == (1.0,) + (0.0,) * 7 + (1.0,) * 9
    assert parse_ratios("outd") == parse_ratios(PRESETS["OUTD"])
    assert parse_ratios("0.5, 1,0") == (0.5, 1.0, 0.0)
    with pytest.raises(BlockWeightError, match="neither a number nor a preset.*OUTALL"):
        parse_ratios("1,x,0")
    with pytest.raises(BlockWeightError, match="must be a finite number"):
        parse_ratios("1,nan")


def test_a_list_of_the_wrong_length_names_both_lists_the_base_takes():
    layout = BlockLayout.from_config(sdxl_config("unet"))
    with pytest.raises(BlockWeightError, match=r"preset OUTD, which is for SD 1.x/2.x.*takes 12 \(BASE,IN04"):
        layout.multipliers("OUTD")
    by_block = layout.multipliers("1,0,0,0,0,1,1,1,1,1,1,1")
    assert by_block["M00"] == 1.0 and by_block["IN04"] == 0.0
    assert by_block["IN00"] == 0.0 and by_block["OUT08"] == 0.0  # left out of the short form: 0, as the extension does


def test_lora_argument_and_prompt_tag_carry_block_weights():
    spec = parse_lora_arg("styles/a.safetensors:0.8:lbw=OUTALL")
    assert (spec.unet_weight, spec.te_weight, spec.blocks) == (0.8, None, "OUTALL")
    assert parse_lora_arg("C:\\x.safetensors:lbw=1,0,1").blocks == "1,0,1"
    assert AdapterSpec("a.safetensors", 1.0, 0.5, "0.5,1").weight_for("text_encoder") == 0.25  # BASE scales the TE
    with pytest.raises(BlockWeightError):
        parse_lora_arg("a.safetensors:1:lbw=OUT")
    prompt, tags = parse_prompt("a red circle <lora:ink:0.8:lbw=OUTD> <lora:char:te=1:unet=0.6:lbw=1,0,0.5>")
    assert prompt == "a red circle"
    assert tags == [LoraTag("ink", 0.8, 0.8, "OUTD"), LoraTag("char", 0.6, 1.0, "1,0,0.5")]
    assert [tag.to_text() for tag in tags] == ["<lora:ink:0.8:lbw=OUTD>", "<lora:char:te=1:unet=0.6:lbw=1,0,0.5>"]
    with pytest.raises(PromptTagError, match="<lora:ink:1:lbw=1,a>"):
        parse_prompt("<lora:ink:1:lbw=1,a>")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    # The tiny pipeline numbers its blocks as the toy base does (checked below), so a file marked as a toy adapter
    # lets `stylelora blend` number them without a base.
    return make_adapter(tmp_path_factory.mktemp("lbw") / "toy-style.safetensors", 7, trigger="stripes",
                        metadata={"ss_stylelora_base_family": "toy"})


def _fused_deltas(pipe, spec):
    stack = AdapterStack.for_pipe(pipe)
    stack.apply([spec])
    deltas = {key: (stack._layer_weight(key).detach() - stack._backups[key]).clone() for key in stack._fused}
    stack.clear()
    return deltas


def test_each_block_multiplier_reaches_exactly_that_blocks_layers(tiny_sd_base, adapter):
    pipe = load_tiny_base(tiny_sd_base)
    layout = BlockLayout.from_config(pipe.unet.config)
    whole = _fused_deltas(pipe, AdapterSpec(adapter, 1.0))
    ratios = [0.5, 1.0, 0.0, 2.0, -1.0, 0.25, 0.75, 1.5]  # BASE, IN01, IN03, M00, OUT00..OUT03 on this layout
    assert layout.blocks(attention_only=True) == ["BASE", "IN01", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"]
    by_block = dict(zip(layout.blocks(attention_only=True), ratios))
    weighted = _fused_deltas(pipe, AdapterSpec(adapter, 1.0, blocks=",".join(map(str, ratios))))
    blocks_seen = set()
    for key, delta in whole.items():
        component, path = key
        ratio = by_block["BASE"] if component != "unet" else by_block[layout.block_of(path)]
        blocks_seen.add("BASE" if component != "unet" else layout.block_of(path))
        assert torch.allclose(weighted.get(key, torch.zeros_like(delta)), delta * ratio, atol=1e-6), key
    assert blocks_seen == set(by_block)  # every block of the list holds some of the adapter's layers
    ones = _fused_deltas(pipe, AdapterSpec(adapter, 1.0, blocks="1,1,1,1,1,1,1,1"))
    assert all(torch.equal(ones[key], whole[key]) for key in whole)  # all ones: the adapter as it is, bit for bit


def test_a_saved_blend_with_block_weights_draws_the_live_image(tiny_sd_base, adapter, tmp_path):
    assert BlockLayout.from_config(tiny_pipeline().unet.config) == BlockLayout.from_config(base_unet_config("toy"))
    specs = [AdapterSpec(adapter, 0.8, None, "1,0,1,1,0.5,1,1,0")]
    report = blend(specs, tmp_path / "lbw.safetensors", exact=True)
    assert "toy-style (unet 0.8, te 0.8, lbw=1,0,1,1,0.5,1,1,0)" in format_inspect(inspect_adapter(report.path))
    request = dict(prompt="stripes, a red circle", steps=3, seed=5, sampler="ddim", adapters_dir=adapter.parent)
    live = load_tiny_base(tiny_sd_base)
    live_image = generate(live, AdapterStack.for_pipe(live), GenerateRequest(**request, loras=tuple(specs)))[0]
    saved = load_tiny_base(tiny_sd_base)
    saved_image = generate(saved, AdapterStack.for_pipe(saved),
                           GenerateRequest(**request, loras=(AdapterSpec(report.path, 1.0),)))[0]
    plain = generate(saved, AdapterStack.for_pipe(saved),
                     GenerateRequest(**request, loras=(AdapterSpec(adapter, 0.8),)))[0]
    assert abs(pixels(live_image).astype(int) - pixels(saved_image).astype(int)).max() <= 1
    assert abs(pixels(live_image).astype(int) - pixels(plain).astype(int)).max() > 1  # the blocks did change the image
    assert "<lora:toy-style:0.8:lbw=1,0,1,1,0.5,1,1,0>" in live_image.parameters_text  # A1111's tag, in the PNG
    redrawn = generate(live, AdapterStack.for_pipe(live),
                       request_from_parameters(live_image.parameters_text, adapter.parent))[0]
    assert (pixels(redrawn) == pixels(live_image)).all()  # the PNG's parameters draw it again


def test_a_sum_blend_whose_blocks_differ_in_rank_loads_the_same_in_diffusers(tiny_sd_base, adapter, tmp_path):
    # lbw=0 on some of one input's blocks leaves those modules with the other input's rank only (4, against 8
    # elsewhere); diffusers' kohya loader then reads per-module alphas wrongly unless the file has one alpha.
    other = make_adapter(tmp_path / "toy-other.safetensors", 8, trigger="pastel",
                         metadata={"ss_stylelora_base_family": "toy"})
    specs = [AdapterSpec(adapter, 1.0, None, "1,0,0,0,1,1,1,1"), AdapterSpec(other, 0.8)]
    report = blend(specs, tmp_path / "mixed-ranks.safetensors", exact=True, blend_mode="sum")
    assert {4, 8} <= set(report.module_ranks.values())
    ours = load_tiny_base(tiny_sd_base)
    AdapterStack.for_pipe(ours).apply([AdapterSpec(report.path, 1.0)])
    live = load_tiny_base(tiny_sd_base)
    AdapterStack.for_pipe(live).apply(specs, "sum")
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(report.path), adapter_name="mix")  # no stylelora code
    expected = model_outputs(live)["unet"]
    assert (model_outputs(ours)["unet"] - expected).abs().max() <= 1e-4
    assert (model_outputs(theirs)["unet"] - expected).abs().max() <= 1e-4


def test_blend_refuses_block_weights_where_the_family_is_unknown(tmp_path):
    unknown = make_adapter(tmp_path / "custom.safetensors", 3)
    with pytest.raises(BlockWeightError, match="apply the block weights at generation"):
        blend([AdapterSpec(unknown, 1.0, None, "OUTALL")], tmp_path / "out.safetensors", exact=True)


def test_blend_base_numbers_the_blocks_of_a_file_of_unknown_family(tmp_path, capsys):
    from safetensors.torch import load_file

    from stylelora.cli import main

    unknown = make_adapter(tmp_path / "custom.safetensors", 3)
    out = tmp_path / "out.safetensors"
    # The tiny adapters' UNet has the toy base's blocks: --base toy numbers them (input blocks off, BASE 0.5).
    assert main(["blend", f"{unknown}:1:lbw=0.5,0,0,1,1,1,1,1", "--out", str(out), "--base", "toy"]) == 0
    source, blended = load_file(unknown), load_file(out)

    def delta(state, module):
        scale = float(state[f"{module}.alpha"]) / state[f"{module}.lora_down.weight"].shape[0]
        up, down = state[f"{module}.lora_up.weight"], state[f"{module}.lora_down.weight"]
        return scale * up.flatten(1) @ down.flatten(1)

    modules = {key.rsplit(".", 2)[0] for key in source if key.endswith("lora_down.weight")}
    kept = {key.rsplit(".", 2)[0] for key in blended if key.endswith("lora_down.weight")}
    assert {m for m in modules if m.startswith("lora_unet_down_blocks")} and not {
        m for m in kept if m.startswith("lora_unet_down_blocks")}  # IN01 and IN03 at 0: left out
    for module in kept:
        ratio = 0.5 if module.startswith("lora_te") else 1.0
        assert torch.allclose(delta(blended, module), ratio * delta(source, module), atol=1e-6), module
    single = tmp_path / "base.safetensors"
    single.write_bytes(b"")
    capsys.readouterr()
    assert main(["blend", f"{unknown}:1:lbw=OUTALL", "--out", str(tmp_path / "x.safetensors"), "--base",
                 str(single)]) != 0
    assert "single file without a config folder" in capsys.readouterr().err


def test_block_weights_reach_the_split_blend_too(tiny_sd_base, adapter, tmp_path):
    other = make_adapter(tmp_path / "other.safetensors", 8, trigger="pastel")
    pipe = load_tiny_base(tiny_sd_base)
    stack = AdapterStack.for_pipe(pipe)
    request = dict(prompt="stripes, pastel, a red circle", steps=3, seed=5, sampler="ddim", blend_mode="split")

    def image(blocks):
        specs = (AdapterSpec(adapter, 1.0, None, blocks), AdapterSpec(other, 1.0))
        return pixels(generate(pipe, stack, GenerateRequest(**request, loras=specs))[0]).astype(int)

    assert (image("1,1,1,1,1,1,1,1") == image(None)).all()  # all ones: split as without block weights
    assert abs(image("1,0,0,0,1,1,1,1") - image(None)).max() > 1  # the input blocks off: another image


def test_on_sdxl_every_layer_of_an_adapter_falls_in_a_block_of_the_short_list(tmp_path):
    from sdxl_fixtures import make_sdxl_adapter, tiny_sdxl_pipeline

    path = make_sdxl_adapter(tmp_path / "xl.safetensors")
    pipe = tiny_sdxl_pipeline()
    layout = BlockLayout.from_config(pipe.unet.config)
    short = layout.blocks(attention_only=True)
    assert short == ["BASE", "IN04", "IN05", "M00", "OUT00", "OUT01", "OUT02"]  # SDXL's pattern on two levels
    whole = _fused_deltas(pipe, AdapterSpec(path, 1.0))
    unet_keys = [key for key in whole if key[0] == "unet"]
    assert unet_keys and {layout.block_of(path) for _, path in unet_keys} == set(short) - {"BASE"}
    only_mid = _fused_deltas(pipe, AdapterSpec(path, 1.0, blocks="0,0,0,1,0,0,0"))
    assert {key for key, delta in only_mid.items() if delta.abs().max() > 0} == {
        key for key in unet_keys if layout.block_of(key[1]) == "M00"}  # BASE 0: both text encoders off too
