"""Owns building the optimizer (AdamW, 8-bit AdamW, Prodigy) with per-model learning rates, and the LR schedule."""
from __future__ import annotations

import torch

from stylelora.config import TrainConfig
from stylelora.lora.inject import LoraParameters


class OptimizerUnavailable(RuntimeError):
    """The chosen optimizer's package is not installed or cannot load; the message names the install."""


def param_groups(config: TrainConfig, params: LoraParameters) -> list[dict]:
    """One group per trained model, each with its own learning rate (text-encoder LoRAs want a lower one)."""
    o = config.optim
    groups = [{"params": params.unet, "lr": o.unet_lr, "name": "unet"}]
    if params.text_encoder:
        groups.append({"params": params.text_encoder, "lr": o.text_encoder_lr, "name": "text_encoder"})
    if params.text_encoder_2:  # SDXL's second encoder; without its own rate it follows the first's
        lr = o.text_encoder_2_lr if o.text_encoder_2_lr is not None else o.text_encoder_lr
        groups.append({"params": params.text_encoder_2, "lr": lr, "name": "text_encoder_2"})
    return groups


def build_optimizer(config: TrainConfig, params: LoraParameters) -> torch.optim.Optimizer:
    optimizer = optimizer_class(config.optim.optimizer)
    return optimizer(param_groups(config, params), weight_decay=config.optim.weight_decay)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer's class; OptimizerUnavailable (naming the install) when its optional package is missing."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        return _bitsandbytes_adamw8bit()
    if name == "prodigy":
        return _prodigy()
    raise ValueError(f"unknown optimizer {name!r}")  # config validation makes this unreachable


def _bitsandbytes_adamw8bit():
    try:
        import bitsandbytes
    except Exception as error:  # noqa: BLE001 - bitsandbytes fails with many error types when its binary can't load
        raise OptimizerUnavailable(
            f"--optimizer adamw8bit needs bitsandbytes, which could not be imported ({type(error).__name__}: "
            f"{error}). Install it with `pip install 'bitsandbytes>=0.45'` (or `pip install 'stylelora[extras]'`; "
            "it needs a supported GPU or CPU build), or use --optimizer adamw."
        ) from error
    return bitsandbytes.optim.AdamW8bit


def _prodigy():
    try:
        from prodigyopt import Prodigy
    except ImportError as error:
        raise OptimizerUnavailable(
            "--optimizer prodigy needs the prodigyopt package: `pip install 'prodigyopt>=1.1'` (or "
            "`pip install 'stylelora[extras]'`), or use --optimizer adamw."
        ) from error
    return Prodigy


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' schedule of that name (warmup included), counted in optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.optim.lr_scheduler, optimizer, num_warmup_steps=config.optim.warmup_steps,
                         num_training_steps=config.train.steps)
