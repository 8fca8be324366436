"""SDXL's architecture on meta, the diffusers <-> SAI/SGM UNet name map, and the kohya keys sd-scripts writes."""

from __future__ import annotations

import pytest
from torch import nn

from stylelora.lora import formats
from stylelora.lora.inject import add_lora, module_ranks, text_encoder_lora_targets, unet_lora_targets
from stylelora.lora.layers import adaptable_layers
from stylelora.lora.sai_names import sai_kohya_names, sai_unet_names, sgm_blocks
from stylelora.lora.sd15 import build_sd15_meta_models
from stylelora.lora.sdxl import (TEXT_ENCODER_1_PREFIX, TEXT_ENCODER_2_PREFIX, build_sdxl_meta_models, sdxl_config,
                                 sdxl_kohya_module_names)
from test_lora_sd15 import collected_library_warnings, rank1_kohya_state

# kohya key -> diffusers module, as sd-scripts' library/sdxl_model_util.py (make_unet_conversion_map) and ComfyUI's
# comfy/utils.py (unet_to_diffusers) pair them for SDXL; every key is one that real SDXL LoRA files carry.
SDXL_UNET_KEYS = {
    "lora_unet_input_blocks_0_0": "conv_in",
    "lora_unet_time_embed_0": "time_embedding.linear_1",
    "lora_unet_time_embed_2": "time_embedding.linear_2",
    "lora_unet_label_emb_0_0": "add_embedding.linear_1",
    "lora_unet_label_emb_0_2": "add_embedding.linear_2",
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_5_1_transformer_blocks_1_ff_net_0_proj":
        "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj",
    "lora_unet_input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0":
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
    "lora_unet_middle_block_0_in_layers_2": "mid_block.resnets.0.conv1",
    "lora_unet_middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
    "lora_unet_middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "lora_unet_output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k":
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v":
        "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_v",
    "lora_unet_output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
    "lora_unet_out_2": "conv_out",
}
# Places the SGM layout of SDXL has nothing: level 0 has no attention, the last level no up/downsampler.
NOT_SDXL_KEYS = ("lora_unet_input_blocks_1_1_proj_in", "lora_unet_input_blocks_9_0_op",
                 "lora_unet_output_blocks_8_2_conv", "lora_unet_output_blocks_8_1_conv",
                 "lora_unet_output_blocks_6_1_proj_in", "lora_unet_middle_block_3_in_layers_2")
SD15_SGM_PATHS = {
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
    "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
    "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",  # up level 0 has no attention: slot 1
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.6.0.skip_connection": "up_blocks.2.resnets.0.conv_shortcut",
    "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
    "label_emb.0.0": None,  # SD1.5 has no label embedding
}
TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": [1, 2],
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "sample_size": 8,
}


@pytest.fixture(scope="module")
def sdxl():
    return build_sdxl_meta_models()


def tiny_unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config({**TINY_UNET, **overrides})


def test_configs_are_the_published_sdxl_ones(sdxl):
    unet_config = sdxl_config("unet")
    assert unet_config["transformer_layers_per_block"] == [1, 2, 10]
    assert unet_config["projection_class_embeddings_input_dim"] == 2816
    assert (unet_config["addition_time_embed_dim"], unet_config["cross_attention_dim"]) == (256, 2048)
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
    assert [sdxl_config("text_encoder")[k] for k in shape] == [768, 12, 12, 3072, "quick_gelu"]
    assert [sdxl_config("text_encoder_2")[k] for k in shape] == [1280, 32, 20, 5120, "gelu"]
    unet, text_encoder, text_encoder_2 = sdxl
    assert [type(m).__name__ for m in sdxl] == ["UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection"]
    # Parameter counts of SDXL base: 2.567B UNet, 123.06M CLIP ViT-L, 694.66M OpenCLIP bigG with projection.
    counts = [sum(p.numel() for p in m.parameters()) for m in sdxl]
    assert counts == [2_567_463_684, 123_060_480, 694_659_840]
    assert {(p.device.type, p.dtype) for m in sdxl for p in m.parameters()} == {("meta", unet.dtype)}
    with pytest.raises(ValueError, match="text_encoder_2"):
        sdxl_config("vae")


def test_every_sdxl_linear_and_conv_has_exactly_one_sai_name(sdxl):
    unet = sdxl[0]
    sai = sai_unet_names(unet)
    layers = dict(adaptable_layers(unet))
    assert set(layers) <= set(sai)
    assert len(set(sai.values())) == len(sai)
    assert sum(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for _, m in unet.named_modules()) == len(sai) - len(layers)
    names = sai_kohya_names(unet)
    assert set(names.by_path) == set(layers) and len(names.by_name) == len(layers) and not names.ambiguous
    assert all(not name.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
               for name in names.by_name)


def test_known_sdxl_kohya_keys_name_the_modules_sd_scripts_pairs_them_with(sdxl):
    names = sai_kohya_names(sdxl[0])
    assert {key: names.by_name.get(key) for key in SDXL_UNET_KEYS} == SDXL_UNET_KEYS
    assert [key for key in NOT_SDXL_KEYS if key in names.by_name] == []
    te1 = formats.kohya_names(sdxl[1], TEXT_ENCODER_1_PREFIX).by_name
    te2 = formats.kohya_names(sdxl[2], TEXT_ENCODER_2_PREFIX).by_name
    assert te1["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"
    assert te1["lora_te1_text_model_encoder_layers_11_mlp_fc1"] == "encoder.layers.11.mlp.fc1"
    # transformers 5 keeps CLIPTextModelWithProjection's text_model level (CLIPTextModel lost it).
    assert te2["lora_te2_text_model_encoder_layers_31_mlp_fc2"] == "text_model.encoder.layers.31.mlp.fc2"
    assert te2["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"] == \
        "text_model.encoder.layers.0.self_attn.out_proj"


def test_sd15_sgm_names_follow_the_same_rules():
    unet, _ = build_sd15_meta_models()
    by_sai = {sai: path for path, sai in sai_unet_names(unet).items()}
    assert {sai: by_sai.get(sai) for sai in SD15_SGM_PATHS} == SD15_SGM_PATHS
    names = sai_kohya_names(unet)
    kohya_targets = unet_lora_targets(unet, "kohya").all
    assert len({names.name_of(path) for path in kohya_targets}) == len(kohya_targets) == 192


def test_layout_comes_from_the_config_not_a_fixed_table():
    # Uneven layers_per_block and attention on other levels than SD's: SGM counts blocks with a running index.
    unet = tiny_unet()
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op",
        "down_blocks.1.resnets.1.conv2": "input_blocks.4.0.out_layers.3",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.3.0.skip_connection",
        "up_blocks.1.attentions.1.proj_out": "output_blocks.4.1.proj_out",
        "conv_norm_out": "out.0",
    }
    sai = sai_unet_names(unet)
    assert {path: sai[path] for path in expected} == expected
    assert max(int(s.split(".")[1]) for s in sai.values() if s.startswith("output_blocks")) == 4
    # A peft adapter on the UNet changes nothing: wrapped layers keep their names.
    add_lora(unet, None, rank=2, alpha=1, unet_targets="locon")
    assert sai_unet_names(unet) == sai


def test_layers_without_an_sgm_place_are_refused_clearly():
    with pytest.raises(ValueError, match=r"1 layers .* no SAI/SGM name \(e.g. time_embedding.cond_proj\)"):
        sai_unet_names(tiny_unet(time_cond_proj_dim=8))
    with pytest.raises(ValueError, match="no SAI/SGM layout for the down block type 'SimpleCrossAttnDownBlock2D'"):
        sgm_blocks({**TINY_UNET, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="layers_per_block"):
        sgm_blocks({**TINY_UNET, "layers_per_block": [1, 2, 3]})


# sd-scripts logs for SDXL networks.lora (bmaltais/kohya_ss#1103): "create LoRA for Text Encoder: 264 modules."
# (72 CLIP-L + 192 bigG, logged apart in sd-scripts#2236) and "create LoRA for U-Net: 722 modules."; with a conv
# rank, LyCORIS' LoCon logs 788 U-Net modules (sd-scripts#1964). "attn": 70 transformer blocks x 8 projections.
@pytest.mark.parametrize("preset, unet_count", [("attn", 560), ("kohya", 722), ("locon", 788)])
def test_sdxl_preset_module_counts_match_sd_scripts(preset, unet_count):
    unet_keys, te1_keys, te2_keys = sdxl_kohya_module_names(preset)
    assert len(set(unet_keys)) == len(unet_keys) == unet_count
    assert len(set(te1_keys)) == len(te1_keys) == 72 and len(set(te2_keys)) == len(te2_keys) == 192
    assert all(key.startswith("lora_te1_text_model_encoder_layers_") for key in te1_keys)
    assert all(key.startswith("lora_te2_text_model_encoder_layers_") for key in te2_keys)
    assert sdxl_kohya_module_names(preset, train_text_encoder=False)[1:] == ([], [])


def test_sdxl_locon_keys_load_in_diffusers_with_no_unmatched_key():
    """diffusers converts SGM-named SDXL LoRAs with its own rules: our names must all land, with no warning."""
    from diffusers import StableDiffusionXLPipeline

    sdxl = build_sdxl_meta_models()  # its own models: loading adapters changes them
    unet, text_encoder, text_encoder_2 = sdxl
    diffusers_named = rank1_kohya_state(unet, formats.UNET_PREFIX, unet_lora_targets(unet, "locon"))
    by_diffusers_name, sai = formats.kohya_names(unet, formats.UNET_PREFIX).by_name, sai_kohya_names(unet)
    state = {}
    for key, tensor in diffusers_named.items():
        name, _, suffix = key.partition(".")
        state[f"{sai.name_of(by_diffusers_name[name])}.{suffix}"] = tensor
    for model, prefix in ((text_encoder, TEXT_ENCODER_1_PREFIX), (text_encoder_2, TEXT_ENCODER_2_PREFIX)):
        state |= rank1_kohya_state(model, prefix, text_encoder_lora_targets(model))
    with collected_library_warnings() as records:
        # load_lora_weights passes the UNet config: diffusers needs it to map SGM block numbers.
        converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet.config)
        unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="file")
        for model, prefix in ((text_encoder, "text_encoder"), (text_encoder_2, "text_encoder_2")):
            StableDiffusionXLPipeline.load_lora_into_text_encoder(converted, alphas, model, prefix=prefix,
                                                                  adapter_name="file")
    assert [r.getMessage() for r in records] == []
    counts = [len(module_ranks(m, "file")) for m in sdxl]
    assert counts == [788, 72, 192]
    assert set(module_ranks(unet, "file")) == set(unet_lora_targets(unet, "locon").all)
