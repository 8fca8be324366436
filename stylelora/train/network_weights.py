"""Owns starting a run from an existing LoRA file (kohya's --network_weights): the file is read and checked before
the base loads, and its weights are copied into the run's freshly added LoRA, module by module.

Why: users continue a finished adapter on more images or more steps, or fine-tune someone else's, and expect the
result to start where that file's images did. The run's own network settings stay in charge: a file whose modules
have another rank, or target layers this run does not train, is refused with the flags that would match it,
instead of being loaded in part. A different alpha is taken in by rescaling each up factor, so every module starts
with the file's exact weight change (up @ down × alpha / rank) and trains on at this run's scale.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stylelora.config import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from stylelora.config import NetworkConfig
    from stylelora.lora.adapter_file import AdapterFile

OPTION = "network.weights (--network-weights)"


def read_start_weights(path: str | None) -> AdapterFile | None:
    """The file --network-weights names, read and checked as far as it can be without the base (it exists, is a
    LoRA file of a layout we read, holds plain LoRA modules); None when the option is not set."""
    if path is None:
        return None
    from stylelora.lora import formats
    from stylelora.lora.adapter_file import read_adapter_file

    source = Path(path).expanduser()
    if not source.exists():
        raise ConfigError(f"{OPTION}: {path} does not exist; give the .safetensors LoRA file to start from.")
    try:
        file = read_adapter_file(source)
        formats.group_kohya_modules(file.state).refuse_foreign(file.path.name)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{OPTION}: {error}") from None
    return file


def describe_start(start: AdapterFile | None) -> str:
    """The dry run's line about the file a run starts from ("" without one)."""
    if start is None:
        return ""
    from stylelora.lora import formats

    modules = formats.group_kohya_modules(start.state).modules
    ranks = sorted({int(parts["lora_down.weight"].shape[0]) for parts in modules.values()
                    if "lora_down.weight" in parts})
    return (f"starts from {start.path.name}: {len(modules)} LoRA modules of rank {' and '.join(map(str, ranks))} "
            "(matched to this run's layers once the base loads)")


def copy_start_weights(start: AdapterFile, models: dict[str, nn.Module | None], network: NetworkConfig) -> str:
    """Copy the file's LoRA into the run's adapter ("default") on `models` (components.models_dict); refuse
    (ConfigError) a file of the other family, another rank, or modules on layers this run does not train. Returns
    the line the run prints about it."""
    from stylelora.lora import components, formats
    from stylelora.lora.inject import module_ranks

    name = start.path.name
    try:
        components.check_adapter_family(name, start.state, start.metadata, models)
        parts = formats.split_kohya_state(start.state, components.component_prefixes(models))
        converted = {component: formats.kohya_to_peft(parts[prefix], components.component_names(models, component))
                     for component, prefix in components.component_prefixes(models).items() if parts[prefix]}
    except ValueError as error:
        raise ConfigError(f"{OPTION}: {error}") from None
    trained = {component: module_ranks(models[component]) if _has_lora(models[component]) else {}
               for component in converted}
    _check_fit(name, converted, trained, network)
    copied = sum(_copy(models[component], *converted[component], trained[component])
                 for component in converted)
    total = sum(len(ranks) for ranks in (module_ranks(model) for model in models.values() if _has_lora(model)))
    return (f"starting from {name}: {copied} of this run's {total} LoRA modules take its weights"
            + ("" if copied == total else "; the others start at zero, as in a new run") + ".")


def _has_lora(model: nn.Module | None) -> bool:
    return model is not None and "default" in (getattr(model, "peft_config", None) or {})


def _check_fit(name: str, converted: dict, trained: dict, network: NetworkConfig) -> None:
    """Refuse modules without a LoRA in this run, and ranks other than this run's, naming the flags that match."""
    untrained = {component: [path for path in ranks if path not in trained[component]]
                 for component, (_, ranks) in converted.items()}
    examples = [f"{component}:{path}" for component, paths in untrained.items() for path in paths]
    if examples:
        hints = []
        if any(paths and component != "unet" for component, paths in untrained.items()):
            hints.append("drop --no-text-encoder (the file trains the text encoder)")
        if untrained.get("unet"):
            hints.append(f"train the UNet layers it trains (this run: --unet-targets {network.unet_targets}; locon "
                         "adds the 3x3 convs)")
        raise ConfigError(f"{OPTION}: {len(examples)} LoRA modules of {name} are on layers this run does not train "
                          f"(e.g. {', '.join(examples[:3])}): {'; '.join(hints)}.")
    pairs = {(converted[component][1][path][0], trained[component][path][0])
             for component in converted for path in converted[component][1]}
    if any(file_rank != run_rank for file_rank, run_rank in pairs):
        file_ranks = sorted({file_rank for file_rank, _ in pairs})
        conv = f", --conv-rank {network.conv_rank}" if network.conv_rank else ""
        raise ConfigError(f"{OPTION}: {name} has LoRA rank {' and '.join(map(str, file_ranks))} where this run "
                          f"has {' and '.join(map(str, sorted({run for _, run in pairs})))} (--rank {network.rank}"
                          f"{conv}): train at the file's rank (--rank, and --conv-rank for 3x3 convs with --unet-"
                          "targets locon).")


def _copy(model: nn.Module, peft_state: dict, file_ranks: dict, run_ranks: dict) -> int:
    """Copy each module's down and up factors into the run's LoRA; the up factor is rescaled so that the module's
    weight change is the file's at this run's alpha. Returns the number of modules copied."""
    import torch

    from stylelora.lora.inject import lora_layers

    layers = dict(lora_layers(model, "default"))
    with torch.no_grad():
        for path, (rank, alpha) in file_ranks.items():
            run_rank, run_alpha = run_ranks[path]
            layer = layers[path]
            layer.lora_A["default"].weight.copy_(peft_state[f"{path}.lora_A.weight"])
            rescale = (alpha / rank) / (run_alpha / run_rank)
            layer.lora_B["default"].weight.copy_(peft_state[f"{path}.lora_B.weight"] * rescale)
    return len(file_ranks)
