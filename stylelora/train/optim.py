"""Owns building the optimizer (AdamW, 8-bit AdamW, Prodigy) with per-model learning rates, and the LR schedule."""
from __future__ import annotations

import ast
import inspect

import torch

from stylelora.config import TrainConfig
from stylelora.lora.inject import LoraParameters
from stylelora.optional import MissingPackage, import_optional


class OptimizerUnavailable(MissingPackage):
    """The chosen optimizer's package is not installed or cannot load; the message names the install."""


def param_groups(config: TrainConfig, params: LoraParameters) -> list[dict]:
    """One group per trained model, each with its own learning rate (text-encoder LoRAs want a lower one), and one
    per UNet block multiplier other than 1 (params.lr_weights). With LoRA+ (optim.loraplus_lr_ratio) each group's up
    factors get a group of their own at that multiple, after all the others: the first groups stay the models' own
    rates, which the log and the progress bar report by name."""
    o = config.optim
    groups = [{"params": [p for p in params.unet if id(p) not in params.lr_weights], "lr": o.unet_lr, "name": "unet"}]
    if params.text_encoder:
        groups.append({"params": params.text_encoder, "lr": o.text_encoder_lr, "name": "text_encoder"})
    if params.text_encoder_2:  # SDXL's second encoder; without its own rate it follows the first's
        lr = o.text_encoder_2_lr if o.text_encoder_2_lr is not None else o.text_encoder_lr
        groups.append({"params": params.text_encoder_2, "lr": lr, "name": "text_encoder_2"})
    groups += _unet_block_groups(params, o.unet_lr)
    if not o.loraplus_lr_ratio:
        return groups
    ups = [{"params": [p for p in group["params"] if id(p) in params.up], "lr": group["lr"] * o.loraplus_lr_ratio,
            "name": f"{group['name']}_up"} for group in groups]
    downs = [{**group, "params": [p for p in group["params"] if id(p) not in params.up]} for group in groups]
    return downs + ups


def _unet_block_groups(params: LoraParameters, unet_lr: float) -> list[dict]:
    """A group per block learning-rate multiplier other than 1 (kohya's down/mid/up_lr_weight), after the models'
    own groups, so that the log's first groups stay the models' rates; the "unet" group may then be empty."""
    weights = sorted({params.lr_weights[id(p)] for p in params.unet if id(p) in params.lr_weights})
    return [{"params": [p for p in params.unet if params.lr_weights.get(id(p)) == weight], "lr": unet_lr * weight,
             "name": f"unet_x{weight:g}"} for weight in weights]


def build_optimizer(config: TrainConfig, params: LoraParameters) -> torch.optim.Optimizer:
    optimizer = optimizer_class(config.optim.optimizer)
    return optimizer(param_groups(config, params), weight_decay=config.optim.weight_decay,
                     **optimizer_arguments(config.optim.optimizer_args, optimizer))


# Set by the run's own options: in --optimizer-args they would be a second, conflicting home.
OWN_ARGUMENTS = {"lr": "--unet-lr / --text-encoder-lr", "weight_decay": "--weight-decay", "params": None}


def optimizer_argument(text: str) -> tuple[str, object]:
    """KEY=VALUE read as sd-scripts reads --optimizer_args: the value is a Python literal, and "0.9,0.99" a tuple."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip().isidentifier():
        raise ValueError(f"{text!r} is not KEY=VALUE; e.g. betas=0.9,0.99 or d_coef=2")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"{text!r}: {value.strip()!r} is not a number, True/False, a tuple such as 0.9,0.99 or a "
                         "quoted string") from None


def optimizer_arguments(texts: tuple[str, ...], optimizer: type) -> dict[str, object]:
    """The --optimizer-args for `optimizer`'s constructor; ConfigError for one it does not take or one the run's own
    options set."""
    from stylelora.config import ConfigError

    accepted = inspect.signature(optimizer).parameters
    arguments = dict(optimizer_argument(text) for text in texts)
    for key in arguments:
        if key in OWN_ARGUMENTS:
            raise ConfigError(f"optim.optimizer_args: {key} is set by {OWN_ARGUMENTS[key] or 'the run'}; use that "
                              "instead of --optimizer-args.")
        if key not in accepted:
            raise ConfigError(f"optim.optimizer_args: {optimizer.__name__} takes no {key!r}; it takes "
                              f"{', '.join(name for name in accepted if name not in OWN_ARGUMENTS)}.")
    return arguments


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
    return import_optional("bitsandbytes", option="--optimizer adamw8bit", install="'bitsandbytes>=0.45'",
                           instead="use --optimizer adamw", error=OptimizerUnavailable).optim.AdamW8bit


def _prodigy():
    return import_optional("prodigyopt", option="--optimizer prodigy", install="'prodigyopt>=1.1'",
                           instead="use --optimizer adamw", error=OptimizerUnavailable).Prodigy


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' schedule of that name (warmup included), counted in optimizer steps."""
    from diffusers.optimization import get_scheduler

    from stylelora.config import warmup_steps

    o = config.optim
    return get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(config),
                         num_training_steps=config.train.steps, num_cycles=o.lr_scheduler_num_cycles,
                         power=o.lr_scheduler_power)


def load_with_new_learning_rates(optimizer: torch.optim.Optimizer, lr_scheduler, state: dict) -> None:
    """Load a checkpoint's optimizer and schedule state, keeping the learning rates this run was started with.

    Why: both state dicts carry the checkpoint run's rates (each group's `lr` / `initial_lr`, the schedule's
    `base_lrs`), so loading them as they are would silently train on at the old rate, and a resume that lowers
    --unet-lr after a divergence would diverge again. The schedule's position (its step count) is kept: the rate at
    the restored step is this run's base rate times the schedule's factor there, exactly what an unchanged rate gives.
    """
    from torch.optim.lr_scheduler import LambdaLR

    base_lrs = list(lr_scheduler.base_lrs)  # from this run's config (param_groups)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if not isinstance(lr_scheduler, LambdaLR):  # every diffusers schedule is one; a new kind needs its own rule here
        raise TypeError(f"cannot re-apply learning rates to a {type(lr_scheduler).__name__} schedule")
    current = [base * factor(lr_scheduler.last_epoch) for base, factor in zip(base_lrs, lr_scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, base_lrs, current):
        group["initial_lr"], group["lr"] = base, lr
    lr_scheduler.base_lrs, lr_scheduler._last_lr = base_lrs, current
