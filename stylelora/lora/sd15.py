"""SD1.5's published UNet and CLIP text-encoder architectures, built weightless on meta, and their kohya keys."""

from __future__ import annotations

import json
from importlib import resources

from stylelora.lora.formats import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_names
from stylelora.lora.inject import text_encoder_lora_targets, unet_lora_targets

# runwayml/stable-diffusion-v1-5 unet/config.json and text_encoder/config.json, as published.
CONFIG_PACKAGE = "stylelora.models"
CONFIG_FOLDER = "configs/sd15"


def sd15_config(component: str) -> dict:
    """The published config dict of "unet" or "text_encoder"."""
    if component not in ("unet", "text_encoder"):
        raise ValueError(f"SD1.5 configs exist for 'unet' and 'text_encoder', not {component!r}.")
    text = resources.files(CONFIG_PACKAGE).joinpath(f"{CONFIG_FOLDER}/{component}.json").read_text(encoding="utf-8")
    return json.loads(text)


def build_sd15_meta_models():
    """(UNet2DConditionModel, CLIPTextModel) with SD1.5's real architecture and no weights (meta tensors, no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    te_config = {k: v for k, v in sd15_config("text_encoder").items() if not k.startswith("_")}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(sd15_config("unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    return unet, text_encoder


def sd15_kohya_module_names(unet_targets: str = "kohya",
                            train_text_encoder: bool = True) -> tuple[list[str], list[str]]:
    """(UNet kohya module names, text-encoder kohya module names) that a preset trains on real SD1.5."""
    unet, text_encoder = build_sd15_meta_models()
    unet_names = kohya_names(unet, UNET_PREFIX)
    te_names = kohya_names(text_encoder, TEXT_ENCODER_PREFIX)
    unet_keys = [unet_names.name_of(path) for path in unet_lora_targets(unet, unet_targets).all]
    te_paths = text_encoder_lora_targets(text_encoder).all if train_text_encoder else ()
    te_keys = [te_names.name_of(path) for path in te_paths]
    return unet_keys, te_keys
