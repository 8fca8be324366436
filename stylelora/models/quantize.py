"""Owns the quantized frozen base of QLoRA training (--quantize-base nf4|int8): the UNet's Linear layers (and the text
encoders' when they are not trained) swapped for bitsandbytes 4-bit NF4 / 8-bit layers after loading, flagged so that
peft puts its own bitsandbytes LoRA layers on them; LoRA weights and optimizer state stay fp32.

Why not diffusers' / transformers' BitsAndBytesConfig: both refuse to quantize without a GPU ("A GPU is needed for
quantization"), while bitsandbytes itself runs NF4 and int8 layers forward and backward on CPU (slower: without its
optional CPU kernels package it dequantizes in plain torch). Swapping the layers of the loaded model is one code
path for both. Only nn.Linear layers are quantized; convolutions and norms stay in the run's precision.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from stylelora.models.heap import return_freed_memory
from stylelora.optional import MissingPackage, import_optional

if TYPE_CHECKING:
    import torch
    from torch import nn

QUANTIZED = ("nf4", "int8")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default: larger input features take the 16-bit path


class QuantizationUnavailable(MissingPackage):
    """--quantize-base cannot run here (bitsandbytes missing or unusable); the message says what to do."""


def check_quantization(mode: str) -> None:
    """Fail now, before any model loads, when `mode` ("none" | "nf4" | "int8") cannot run in this environment."""
    if mode == "none":
        return
    if mode not in QUANTIZED:
        raise ValueError(f"unknown quantization {mode!r}: choose none, {' or '.join(QUANTIZED)}")
    _bitsandbytes(mode)


def _bitsandbytes(mode: str):
    return import_optional("bitsandbytes", option=f"--quantize-base {mode}", install="bitsandbytes==0.50.2",
                           instead="train without --quantize-base", error=QuantizationUnavailable)


def quantize_frozen_base(pipe, mode: str, compute_dtype: torch.dtype, *, text_encoders: bool) -> dict[str, int]:
    """Quantize the pipeline's UNet (and its text encoders, both of SDXL's, when `text_encoders`) in place;
    returns {model: Linear layers swapped}. Call it after loading and before adding LoRA: peft then wraps the
    bitsandbytes layers with its own."""
    from stylelora.lora.components import TEXT_ENCODERS

    counts = {"unet": quantize_linears(pipe.unet, mode, compute_dtype)}
    for name in TEXT_ENCODERS if text_encoders else ():
        if getattr(pipe, name, None) is not None:
            counts[name] = quantize_linears(getattr(pipe, name), mode, compute_dtype)
    return counts


def quantize_linears(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> int:
    """Swap every plain nn.Linear of `model` for a bitsandbytes NF4 (`Linear4bit`) or int8 (`Linear8bitLt`) layer on
    the same device, frozen; returns how many. Each full-precision weight is freed as soon as its layer is swapped."""
    from torch import nn

    bnb = _bitsandbytes(mode)
    # Paths, not modules: a list of the old layers would keep every full-precision weight alive until the end.
    paths = [path for path, module in model.named_modules() if type(module) is nn.Linear]
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, _quantized(bnb, getattr(parent, name), mode, compute_dtype))
        # glibc keeps the freed fp32/bf16 weights and bitsandbytes temporaries resident otherwise: measured on SD
        # 1.5's UNet in bf16, 3.1 GB instead of 2.1, peaking 0.6 GB above the loaded model; no measurable cost.
        return_freed_memory()
    # What diffusers' and transformers' own bitsandbytes loading set: peft reads it to choose its bitsandbytes layers.
    if mode == "nf4":
        model.is_loaded_in_4bit = True
    else:
        model.is_loaded_in_8bit = True
    return len(paths)


def _quantized(bnb, linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    from torch import nn

    device, has_bias = linear.weight.device, linear.bias is not None
    weight = linear.weight.data
    if mode == "nf4":
        # Built on meta (no random init of a full-size weight), then quantized when moved to the device.
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
        # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weight for inference the first time it runs in
        # eval mode without gradients (sample grids): that fails for layers narrower than its 64-wide blocks and
        # leaves the layer dequantizing to bf16 from then on, also in training. One format for the whole run.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=INT8_OUTLIER_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.register_forward_hook(_autocast_output)
    return layer.to(device)


def _autocast_output(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Under autocast, return what the replaced nn.Linear would have: the autocast dtype. bitsandbytes casts back
    to the input's dtype instead, and an fp32 input (the sampler's latents after a scheduler step) then meets bf16
    norm weights further on ("mixed dtype" in GroupNorm)."""
    import torch

    device_type = output.device.type
    if torch.is_autocast_enabled(device_type):
        return output.to(torch.get_autocast_dtype(device_type))
    return output

