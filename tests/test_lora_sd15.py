"""LoRA targets and kohya keys on the real SD1.5 architecture, built weightless on the meta device."""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import torch

from stylelora.lora import formats
from stylelora.lora.inject import add_lora, module_ranks, text_encoder_lora_targets, unet_lora_targets
from stylelora.lora.io import kohya_state_from_models
from stylelora.lora.sd15 import build_sd15_meta_models, sd15_config, sd15_kohya_module_names


@pytest.fixture()
def sd15():
    return build_sd15_meta_models()


def test_configs_are_the_published_sd15_ones(sd15):
    unet_config, te_config = sd15_config("unet"), sd15_config("text_encoder")
    assert unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet_config["cross_attention_dim"] == 768 and unet_config["attention_head_dim"] == 8
    te_shape = [te_config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")]
    assert te_shape == [768, 12, 12, 3072]
    assert (te_config["vocab_size"], te_config["max_position_embeddings"]) == (49408, 77)
    unet, text_encoder = sd15
    # Parameter counts everyone quotes for SD1.5: 859.52M UNet, 123.06M CLIP ViT-L/14 text encoder.
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert all(p.device.type == "meta" for p in unet.parameters())


@pytest.mark.parametrize("preset, unet_count", [("attn", 128), ("kohya", 192), ("locon", 278)])
def test_preset_module_counts_match_kohya(preset, unet_count):
    unet_keys, te_keys = sd15_kohya_module_names(preset)
    assert len(unet_keys) == len(set(unet_keys)) == unet_count
    assert len(te_keys) == len(set(te_keys)) == 72


def test_kohya_names_are_the_sd_scripts_ones():
    unet_keys, te_keys = sd15_kohya_module_names("locon")
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_proj_in",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_up_blocks_1_resnets_2_conv_shortcut",
                 "lora_unet_down_blocks_2_downsamplers_0_conv",
                 "lora_unet_up_blocks_0_upsamplers_0_conv"):
        assert name in unet_keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_keys
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_keys


def test_add_lora_on_meta_sd15_gives_kohya_key_set(sd15):
    unet, text_encoder = sd15
    params = add_lora(unet, text_encoder, rank=4, alpha=1)
    assert len(module_ranks(unet)) == 192 and len(module_ranks(text_encoder)) == 72
    assert len(params.unet) == 2 * 192 and len(params.text_encoder) == 2 * 72
    state = kohya_state_from_models(unet, text_encoder)
    unet_keys, te_keys = sd15_kohya_module_names("kohya")
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    expected = {f"{name}.{suffix}" for name in unet_keys + te_keys for suffix in suffixes}
    assert set(state) == expected


@contextlib.contextmanager
def collected_library_warnings():
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            # Copying real tensors into meta parameters is a no-op torch warns about; names are what we test here.
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def rank1_kohya_state(model, prefix, targets):
    """A rank-1 kohya state (real tiny tensors) for every target of `model`, alpha 0.5."""
    names = formats.kohya_names(model, prefix)
    state = {}
    for path in targets.all:
        layer, name = names.layers[path], names.name_of(path)
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(1, layer.in_channels, *layer.kernel_size)
            up = torch.randn(layer.out_channels, 1, 1, 1)
        else:
            down, up = torch.randn(1, layer.in_features), torch.randn(layer.out_features, 1)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
        state[f"{name}.alpha"] = torch.tensor(0.5)
    return state


def test_sd15_locon_keys_load_in_diffusers_with_no_unmatched_key(sd15):
    from diffusers import StableDiffusionPipeline

    unet, text_encoder = sd15
    state = rank1_kohya_state(unet, formats.UNET_PREFIX, unet_lora_targets(unet, "locon"))
    state |= rank1_kohya_state(text_encoder, formats.TEXT_ENCODER_PREFIX, text_encoder_lora_targets(text_encoder))
    with collected_library_warnings() as records:
        converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
        unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="file")
        StableDiffusionPipeline.load_lora_into_text_encoder(converted, alphas, text_encoder, adapter_name="file")
    assert [r.getMessage() for r in records] == []
    assert len(module_ranks(unet, "file")) == 278 and len(module_ranks(text_encoder, "file")) == 72
    assert set(module_ranks(unet, "file").values()) == {(1, 0.5)}
