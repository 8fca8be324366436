"""Owns which models of a pipeline carry LoRA, the kohya prefix of each, the names their modules go by, and the
refusal of an adapter made for the other family (SD 1.x/2.x vs SDXL).

    SD 1.x/2.x, toy   unet → `lora_unet_` + diffusers module paths    text_encoder → `lora_te_`
    SDXL              unet → `lora_unet_` + SAI/SGM paths (sai_names)  text_encoder (CLIP ViT-L) → `lora_te1_`,
                                                                       text_encoder_2 (OpenCLIP bigG) → `lora_te2_`

That is how kohya sd-scripts writes each family and what A1111, ComfyUI and diffusers read. Reading, a UNet's modules
under the other spelling are accepted too, as A1111 and ComfyUI accept them: diffusers paths in an SDXL file
(`lora_unet_down_blocks_…`), SAI ones in an SD 1.x/2.x file (`lora_unet_input_blocks_1_1_…`).
A model counts as SDXL when the pipeline has a second text encoder or its UNet takes `text_time` added conditioning.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from stylelora.lora import formats
from stylelora.lora.sdxl import TEXT_ENCODER_1_PREFIX, TEXT_ENCODER_2_PREFIX

SD_PREFIXES = dict(formats.COMPONENT_PREFIXES)
SDXL_PREFIXES = {"unet": formats.UNET_PREFIX, "text_encoder": TEXT_ENCODER_1_PREFIX,
                 "text_encoder_2": TEXT_ENCODER_2_PREFIX}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
UNKNOWN_ARCHITECTURE = "unknown (UNet-only file without modelspec.architecture)"
SD_UNKNOWN_VERSION = "stable-diffusion-v1 or v2 (UNet-only file: the version is not in it)"
# Hidden size of the CLIP text encoder (q_proj input) per Stable Diffusion family.
TEXT_ENCODER_WIDTHS = {768: "stable-diffusion-v1", 1024: "stable-diffusion-v2"}
# How people name the families (A1111's "SD1"/"SDXL", kohya's docs), by modelspec architecture without "/lora".
FAMILY_LABELS = {"stable-diffusion-v1": "SD 1.x", "stable-diffusion-v2": "SD 2.x",
                 "stable-diffusion-v2-512": "SD 2.x", "stable-diffusion-v2-768-v": "SD 2.x", SDXL_ARCHITECTURE: "SDXL"}
TEXT_ENCODER_WIDTH_LABELS = {768: "SD 1.x", 1024: "SD 2.x"}
OTHER_SD_LABEL = "SD 1.x/2.x-architecture"


def text_encoders(pipe: Any) -> dict[str, nn.Module]:
    """{"text_encoder": ...} and, for SDXL, "text_encoder_2": the pipeline's text encoders, by component name."""
    return {name: getattr(pipe, name) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None}


class AdapterFamilyError(ValueError):
    """An adapter made for one base family (SD 1.x/2.x or SDXL) was given to a base of the other."""


def models_dict(unet: nn.Module, text_encoder: nn.Module | None = None,
                text_encoder_2: nn.Module | None = None) -> dict[str, nn.Module | None]:
    """{"unet", "text_encoder"[, "text_encoder_2"]}: the second text encoder only when there is one."""
    models = {"unet": unet, "text_encoder": text_encoder}
    if text_encoder_2 is not None:
        models["text_encoder_2"] = text_encoder_2
    return models


def pipeline_models(pipe: Any) -> dict[str, nn.Module | None]:
    """The models of a diffusers pipeline that LoRA adapts, by pipeline attribute name."""
    return models_dict(pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))


def is_sdxl(models: Mapping[str, nn.Module | None]) -> bool:
    if models.get("text_encoder_2") is not None:
        return True
    config = getattr(models["unet"], "config", None) or {}
    return config.get("addition_embed_type") == "text_time"


def component_prefixes(models: Mapping[str, nn.Module | None]) -> dict[str, str]:
    """{component: kohya prefix} of this model family."""
    return dict(SDXL_PREFIXES if is_sdxl(models) else SD_PREFIXES)


def component_names(models: Mapping[str, nn.Module | None], component: str) -> formats.KohyaNames:
    """The kohya names of one component's Linear/Conv2d layers (SAI/SGM ones for an SDXL UNet)."""
    model = models[component]
    if model is None:
        raise ValueError(f"This pipeline has no {component}.")
    prefix = component_prefixes(models)[component]
    if component != "unet":
        return formats.kohya_names(model, prefix)
    from stylelora.lora.sai_names import sai_kohya_names

    diffusers_named = formats.kohya_names(model, prefix)
    try:
        sai = sai_kohya_names(model, prefix)
    except ValueError:  # a UNet of no SGM layout: only an SDXL one must have it
        if is_sdxl(models):
            raise
        return diffusers_named
    # The two name sets never overlap (input_blocks/middle_block/output_blocks vs down_blocks/mid_block/up_blocks),
    # so a file in either reads (A1111 and ComfyUI read both for every family); what we write is kohya's: the SAI
    # name for SDXL, the diffusers one for SD 1.x/2.x.
    written = sai if is_sdxl(models) else diffusers_named
    by_name = {**diffusers_named.by_name, **sai.by_name}
    return dataclasses.replace(written, by_name=by_name, ambiguous={**diffusers_named.ambiguous, **sai.ambiguous})


# ----------------------------------------------------------------------------- families


def base_family_label(models: Mapping[str, nn.Module | None]) -> str:
    """"SDXL", "SD 1.x", "SD 2.x" or OTHER_SD_LABEL (a small model of SD layout, e.g. the toy base)."""
    if is_sdxl(models):
        return "SDXL"
    text_encoder = models.get("text_encoder")
    width = text_encoder.config.hidden_size if text_encoder is not None else models["unet"].config.cross_attention_dim
    return TEXT_ENCODER_WIDTH_LABELS.get(width, OTHER_SD_LABEL)


def adapter_architecture(state: dict, metadata: dict[str, str]) -> str:
    """The base family an adapter (kohya keys) was made for, e.g. "stable-diffusion-v1": from the keys (SDXL names
    differ) and the text encoder's width (its q_proj input); the file's modelspec.architecture as fallback."""
    modules = formats.group_kohya_modules(state).modules
    sd_text_encoder = any(name.startswith(formats.TEXT_ENCODER_PREFIX + "_") for name in modules)  # SDXL: te1/te2
    sai_layout = _sai_layout(modules)
    if any(name.startswith(("lora_te1_", "lora_te2_")) for name in modules) or (
            not sd_text_encoder and sai_layout == "SDXL"):
        return SDXL_ARCHITECTURE
    q_proj = next((parts for name, parts in modules.items() if name.endswith("self_attn_q_proj")), None)
    if q_proj is None and sai_layout == "SD":  # a UNet-only SD file in SAI names: its context width
        q_proj = next((parts for name, parts in modules.items() if name.endswith("attn2_to_k")), None)
        if q_proj is None:
            return SD_UNKNOWN_VERSION
    if q_proj is not None:
        down = q_proj.get("lora_down.weight")
        width = int(down.shape[1]) if down is not None else None
        return TEXT_ENCODER_WIDTHS.get(width, f"custom SD-architecture (text encoder width {width})")
    declared = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    return declared or UNKNOWN_ARCHITECTURE


_SAI_BLOCK = re.compile(r"^lora_unet_(input|middle|output)_blocks?_(\d+)_?(\d+)?_")


def _sai_layout(modules) -> str | None:
    """"SD" or "SDXL" for a file whose UNet modules carry SAI/SGM names (lora_unet_input_blocks_…), None when none
    does. SD 1.x/2.x lay out twelve input and output blocks with attention in input blocks 1, 2 and output blocks
    6 to 8; SDXL has nine each way and none of those, so a file showing any of them is SD (kohya writes SD files
    with diffusers names, other tools with SAI ones), any other SAI-named file SDXL."""
    found = False
    for name in modules:
        match = _SAI_BLOCK.match(name)
        if match is None:
            continue
        found = True
        kind, block, slot = match.group(1), int(match.group(2)), match.group(3)
        attention = slot == "1" and ("_transformer_blocks_" in name or name.endswith(("_proj_in", "_proj_out")))
        if kind != "middle" and (block >= 9 or attention and block in ((1, 2) if kind == "input" else (6, 7, 8))):
            return "SD"
    return "SDXL" if found else None


def adapter_family_label(architecture: str) -> str:
    """The family an adapter's architecture (adapter_architecture) names, as base_family_label does."""
    if architecture.startswith(SDXL_ARCHITECTURE):
        return "SDXL"
    return FAMILY_LABELS.get(architecture, OTHER_SD_LABEL)


def check_adapter_family(file_name: str, state: dict, metadata: dict[str, str],
                         models: Mapping[str, nn.Module | None]) -> None:
    """AdapterFamilyError, in one sentence naming both families, when the file is SDXL and the base not (or the
    reverse); a file whose family cannot be told (UNet-only, no metadata) is left to the key matching."""
    refuse_other_family(file_name, state, metadata, is_sdxl(models), lambda: base_family_label(models))


def refuse_other_family(file_name: str, state: dict, metadata: dict[str, str], base_sdxl: bool,
                        base_label: Callable[[], str]) -> None:
    """check_adapter_family for a base known only by whether it is SDXL (and `base_label()`, its family's name):
    a run checks its --network-weights file this way before the base's weights load."""
    architecture = adapter_architecture(state, metadata)
    if architecture == UNKNOWN_ARCHITECTURE:
        return
    adapter_sdxl = architecture.startswith(SDXL_ARCHITECTURE)
    if adapter_sdxl == base_sdxl:
        return
    adapter, base = adapter_family_label(architecture), base_label()
    raise AdapterFamilyError(
        f"{file_name} is an {adapter} LoRA and cannot be used with this {base} base model: use a LoRA trained "
        f"for {base}, or an {adapter} base."
    )
