"""SDXL's published UNet and two CLIP text-encoder architectures, built weightless on meta, and their kohya keys.

kohya sd-scripts writes SDXL LoRAs with UNet modules under SAI/SGM names (see sai_names.py) and the two text
encoders under `lora_te1_` (CLIP ViT-L, CLIPTextModel) and `lora_te2_` (OpenCLIP bigG, CLIPTextModelWithProjection),
both with the transformers `text_model.` root, e.g. `lora_te2_text_model_encoder_layers_31_mlp_fc2`.
"""

from __future__ import annotations

import json
from importlib import resources

from stylelora.lora.formats import kohya_names
from stylelora.lora.inject import text_encoder_lora_targets, unet_lora_targets
from stylelora.lora.sai_names import sai_kohya_names

# stabilityai/stable-diffusion-xl-base-1.0 unet/, text_encoder/ and text_encoder_2/ config.json, as published.
CONFIG_PACKAGE = "stylelora.models"
CONFIG_FOLDER = "configs/sdxl"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODER_1_PREFIX = "lora_te1"
TEXT_ENCODER_2_PREFIX = "lora_te2"


def sdxl_config(component: str) -> dict:
    """The published config dict of "unet", "text_encoder" or "text_encoder_2"."""
    if component not in COMPONENTS:
        raise ValueError(f"SDXL configs exist for {', '.join(map(repr, COMPONENTS))}, not {component!r}.")
    text = resources.files(CONFIG_PACKAGE).joinpath(f"{CONFIG_FOLDER}/{component}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _clip_config(component: str):
    from transformers import CLIPTextConfig

    # The published files say fp16 (the dtype the weights were saved in); the architecture has none, and
    # transformers 5 would build CLIPTextModelWithProjection's text_model in it but its projection in fp32.
    storage_keys = {"torch_dtype", "dtype"}
    config = sdxl_config(component)
    return CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k not in storage_keys})


def build_sdxl_meta_models():
    """(UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection) of SDXL base, weightless on meta."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(sdxl_config("unet"))
        text_encoder = CLIPTextModel(_clip_config("text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config("text_encoder_2"))
    return unet, text_encoder, text_encoder_2


def sdxl_kohya_module_names(unet_targets: str = "kohya",
                            train_text_encoder: bool = True) -> tuple[list[str], list[str], list[str]]:
    """(UNet, text encoder 1, text encoder 2) kohya module names that a preset trains on real SDXL.

    UNet names are SAI/SGM ones (`lora_unet_input_blocks_…`), text encoders `lora_te1_text_model_…` / `lora_te2_…`.
    """
    unet, text_encoder, text_encoder_2 = build_sdxl_meta_models()
    unet_names = sai_kohya_names(unet)
    unet_keys = [unet_names.name_of(path) for path in unet_lora_targets(unet, unet_targets).all]
    te_keys: list[list[str]] = []
    for model, prefix in ((text_encoder, TEXT_ENCODER_1_PREFIX), (text_encoder_2, TEXT_ENCODER_2_PREFIX)):
        names = kohya_names(model, prefix)
        paths = text_encoder_lora_targets(model).all if train_text_encoder else ()
        te_keys.append([names.name_of(path) for path in paths])
    return unet_keys, te_keys[0], te_keys[1]
