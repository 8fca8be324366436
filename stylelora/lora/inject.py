"""Attaches peft LoRA adapters to a diffusers UNet and its CLIP text encoder(s): presets, ranks, fp32, frozen base."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from stylelora.lora.layers import adaptable_layers, is_wide_conv, layers_inside_blocks

UNET_PRESETS = ("attn", "kohya", "locon")
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# kohya sd-scripts networks/lora.py: LoRA goes on every Linear / 1x1 Conv2d inside these diffusers blocks...
KOHYA_TRANSFORMER_BLOCKS = ("Transformer2DModel",)
# ...and, when a conv rank is given (LoCon / "conv_dim"), on every Linear / Conv2d inside these as well.
KOHYA_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


@dataclass(frozen=True)
class LoraTargets:
    """Exact module paths to adapt: `linear` (Linear, 1x1 conv) at rank/alpha, `conv` (kxk conv) at the conv rank."""

    linear: tuple[str, ...]
    conv: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return self.linear + self.conv


@dataclass
class LoraParameters:
    """The trainable LoRA parameters that `add_lora` created, per model (empty list: that model is frozen)."""

    unet: list[nn.Parameter] = field(default_factory=list)
    text_encoder: list[nn.Parameter] = field(default_factory=list)
    text_encoder_2: list[nn.Parameter] = field(default_factory=list)  # SDXL's second (OpenCLIP bigG) encoder
    up: set[int] = field(default_factory=set)  # id() of every up (lora_B) factor among them: LoRA+ steps them apart
    # id() of a UNet factor -> its block's learning-rate multiplier, where it is not 1 (kohya's block-wise rates)
    lr_weights: dict[int, float] = field(default_factory=dict)


def _split_by_kernel(layers: dict[str, nn.Module]) -> LoraTargets:
    linear = tuple(path for path, layer in layers.items() if not is_wide_conv(layer))
    conv = tuple(path for path, layer in layers.items() if is_wide_conv(layer))
    return LoraTargets(linear=linear, conv=conv)


def unet_lora_targets(unet: nn.Module, preset: str = "kohya") -> LoraTargets:
    """Module paths the preset adapts: "attn", "kohya" (sd-scripts default) or "locon" (+ resnet/sampler convs)."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"Unknown UNet LoRA preset {preset!r}; choose one of {', '.join(UNET_PRESETS)}.")
    in_transformers = layers_inside_blocks(unet, KOHYA_TRANSFORMER_BLOCKS)
    if preset == "attn":
        attention = {p: m for p, m in in_transformers.items() if p.endswith(ATTENTION_PROJECTIONS) and ".attn" in p}
        targets = LoraTargets(linear=tuple(attention))
    elif preset == "kohya":
        # A 3x3 conv never lives in a Transformer2DModel, but kohya skips them without a conv rank, so do we.
        targets = LoraTargets(linear=_split_by_kernel(in_transformers).linear)
    else:
        targets = _split_by_kernel({**in_transformers, **layers_inside_blocks(unet, KOHYA_CONV_BLOCKS)})
    if not targets.all:
        raise ValueError(
            f"UNet preset {preset!r} found no layers in {type(unet).__name__}: expected diffusers "
            f"{'/'.join(KOHYA_TRANSFORMER_BLOCKS + KOHYA_CONV_BLOCKS)} blocks (is this an SD UNet2DConditionModel?)."
        )
    return targets


def text_encoder_lora_targets(text_encoder: nn.Module) -> LoraTargets:
    """Attention (q/k/v/out_proj) and MLP (fc1/fc2) Linears of every CLIP encoder layer that runs: kohya's
    text-encoder set (layers a clip skip leaves out, stylelora.generate.prompt_reading.skip_last_layers, get none:
    they would get no gradient)."""
    in_encoder_layers = re.compile(r"(^|\.)encoder\.layers\.\d+\.")
    skipped = _skipped_layer_paths(text_encoder)
    paths = tuple(
        path
        for path, _ in adaptable_layers(text_encoder)
        if in_encoder_layers.search(path) and path.rsplit(".", 1)[-1] in TEXT_ENCODER_PROJECTIONS
        and not any(path.startswith(prefix) for prefix in skipped)
    )
    if not paths:
        raise ValueError(
            f"No CLIP encoder-layer projections ({', '.join(TEXT_ENCODER_PROJECTIONS)}) found in "
            f"{type(text_encoder).__name__}: is this a transformers CLIPTextModel?"
        )
    return LoraTargets(linear=paths)


def encoder_layer_list(text_encoder: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of the module whose `layers` ModuleList holds the encoder's transformer layers (CLIP's
    `encoder`, at whatever depth the transformers version puts it), or None."""
    return next(((path, module) for path, module in text_encoder.named_modules()
                 if isinstance(getattr(module, "layers", None), nn.ModuleList)), None)


def _skipped_layer_paths(text_encoder: nn.Module) -> tuple[str, ...]:
    """"path." of each encoder layer its layer list holds but does not run (iterating it yields the ones that run)."""
    found = encoder_layer_list(text_encoder)
    if found is None:
        return ()
    path, owner = found
    running = {id(layer) for layer in owner.layers}
    prefix = f"{path}.layers." if path else "layers."
    return tuple(f"{prefix}{index}." for index, layer in enumerate(owner.layers._modules.values())
                 if id(layer) not in running)


def lora_config(targets: LoraTargets, *, rank: int, alpha: float, conv_rank: int | None = None,
                conv_alpha: float | None = None, init_lora_weights: bool | str = True):
    """A peft LoraConfig for exactly these module paths; wide convs get conv_rank/conv_alpha via rank/alpha patterns."""
    from peft import LoraConfig

    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    # peft reads pattern keys as regexes matched at the end of a module path: escape so each names one module.
    rank_pattern = {re.escape(path): conv_rank for path in targets.conv} if conv_rank != rank else {}
    alpha_pattern = {re.escape(path): conv_alpha for path in targets.conv} if conv_alpha != alpha else {}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets.all),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=init_lora_weights,
    )


def lora_config_for_modules(module_ranks: dict[str, tuple[int, float]], init_lora_weights: bool | str = True):
    """A peft LoraConfig reproducing per-module (rank, alpha) pairs, e.g. read from a kohya file."""
    from peft import LoraConfig

    if not module_ranks:
        raise ValueError("No LoRA modules given: the adapter state is empty.")
    # The most common pair becomes the default, so the patterns only list the exceptions.
    (rank, alpha), _ = Counter(module_ranks.values()).most_common(1)[0]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(module_ranks),
        rank_pattern={re.escape(p): r for p, (r, _) in module_ranks.items() if r != rank},
        alpha_pattern={re.escape(p): a for p, (_, a) in module_ranks.items() if a != alpha},
        init_lora_weights=init_lora_weights,
    )


def lora_layers(model: nn.Module, adapter_name: str):
    """(path, peft LoraLayer) pairs that carry `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield path, module


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The lora_A/lora_B parameters of one adapter, in module order."""
    params: list[nn.Parameter] = []
    for _, layer in lora_layers(model, adapter_name):
        params.extend(layer.lora_A[adapter_name].parameters())
        params.extend(layer.lora_B[adapter_name].parameters())
    return params


def module_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[int, float]]:
    """Per adapted module path: (rank, alpha) as peft holds them. Refuses scalings a kohya file cannot express."""
    ranks: dict[str, tuple[int, float]] = {}
    for path, layer in lora_layers(model, adapter_name):
        rank, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
        # kohya/A1111 apply up @ down * alpha / rank; rsLoRA (alpha / sqrt(rank)) or DoRA would load wrong there.
        if abs(layer.scaling[adapter_name] - alpha / rank) > 1e-9 or layer.use_dora.get(adapter_name, False):
            raise ValueError(
                f"Adapter {adapter_name!r} at {path} is not plain LoRA (rsLoRA or DoRA): its scaling "
                f"{layer.scaling[adapter_name]} != alpha/rank = {alpha}/{rank}; kohya files cannot hold it."
            )
        ranks[path] = (rank, float(alpha))
    return ranks


def attach_adapter(model: nn.Module, config, adapter_name: str = "default") -> list[nn.Parameter]:
    """Freeze `model`, add one peft adapter through the library's own integration, return its fp32 trainable params."""
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"{type(model).__name__} already has an adapter named {adapter_name!r}; pick another name.")
    model.requires_grad_(False)
    # diffusers' ModelMixin.add_adapter and transformers' PreTrainedModel.add_adapter both call
    # peft.inject_adapter_in_model and register the config, so their own load/save/set_adapters keep working.
    model.add_adapter(config, adapter_name=adapter_name)
    params = lora_parameters(model, adapter_name)
    for param in params:
        # Adapters train in fp32 even on an fp16/bf16 base: tiny low-rank updates vanish in half precision.
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def add_lora(unet: nn.Module, text_encoder: nn.Module | None, *, rank: int, alpha: float,
             unet_targets: str = "kohya", train_text_encoder: bool = True, conv_rank: int | None = None,
             conv_alpha: float | None = None, adapter_name: str = "default",
             init_lora_weights: bool | str = True, text_encoder_2: nn.Module | None = None,
             unet_shape: Callable[[str, bool], tuple[int, float] | None] | None = None,
             unet_lr_weight: Callable[[str], float] | None = None) -> LoraParameters:
    """Add a LoRA adapter to the UNet (and the text encoders unless train_text_encoder is False); bases stay frozen.

    text_encoder_2: SDXL's second text encoder, adapted like the first (same projections, rank and alpha).
    `init_lora_weights=True` is the usual zero-initialised up (B) matrix; False makes both matrices random
    (tests use it so the adapter changes outputs from the first step).
    unet_shape: (UNet layer path, is a 3x3 conv) -> that layer's (rank, alpha), or None for no LoRA there (kohya's
    block_dims); unet_lr_weight: path -> its learning-rate multiplier, recorded in LoraParameters.lr_weights.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    if (conv_rank is not None or conv_alpha is not None) and unet_targets != "locon":
        raise ValueError(f"conv_rank/conv_alpha only apply to unet_targets='locon' (got {unet_targets!r}).")
    # Both configs are built before touching either model, so a bad argument leaves both models as they were.
    targets = unet_lora_targets(unet, unet_targets)
    if unet_shape is None:
        unet_config = lora_config(targets, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                                  init_lora_weights=init_lora_weights)
    else:
        shapes = {path: unet_shape(path, path in targets.conv) for path in targets.all}
        unet_config = lora_config_for_modules({path: shape for path, shape in shapes.items() if shape is not None},
                                              init_lora_weights=init_lora_weights)
    encoders = {name: model for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
                if model is not None}
    te_configs = {name: lora_config(text_encoder_lora_targets(model), rank=rank, alpha=alpha,
                                    init_lora_weights=init_lora_weights)
                  for name, model in encoders.items()} if train_text_encoder else {}
    params = LoraParameters(unet=attach_adapter(unet, unet_config, adapter_name))
    for name, model in encoders.items():
        if name in te_configs:
            setattr(params, name, attach_adapter(model, te_configs[name], adapter_name))
        else:
            model.requires_grad_(False)
    for model in (unet, *(encoders[name] for name in te_configs)):
        params.up.update(id(param) for _, layer in lora_layers(model, adapter_name)
                         for param in layer.lora_B[adapter_name].parameters())
    if unet_lr_weight is not None:
        params.lr_weights = {id(param): weight for path, layer in lora_layers(unet, adapter_name)
                             if (weight := unet_lr_weight(path)) != 1.0
                             for param in (*layer.lora_A[adapter_name].parameters(),
                                           *layer.lora_B[adapter_name].parameters())}
    return params


def add_lora_from_state(model: nn.Module, peft_state: dict, ranks: dict[str, tuple[int, float]],
                        adapter_name: str = "default") -> list[nn.Parameter]:
    """Attach an adapter shaped like `ranks` (path -> (rank, alpha)) and load `peft_state` into it, all keys used."""
    from peft import set_peft_model_state_dict

    params = attach_adapter(model, lora_config_for_modules(ranks), adapter_name)
    try:
        result = set_peft_model_state_dict(model, peft_state, adapter_name=adapter_name)
    except RuntimeError as error:
        raise ValueError(
            f"LoRA weights do not fit {type(model).__name__} (made for another base model?): {error}"
        ) from error
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if unexpected or missing:
        raise ValueError(
            f"Loading LoRA into {type(model).__name__} left {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}) and {len(missing)} missing keys (e.g. {missing[:3]})."
        )
    return params


@contextmanager
def adapters_disabled(*models: nn.Module):
    """Run the models as their frozen base inside the block (models without an adapter are left alone)."""
    hosts = [m for m in models if m is not None and getattr(m, "peft_config", None)]
    for model in hosts:
        model.disable_adapters()  # diffusers / transformers PeftAdapterMixin: every peft layer bypasses its LoRA
    try:
        yield
    finally:
        for model in hosts:
            model.enable_adapters()
