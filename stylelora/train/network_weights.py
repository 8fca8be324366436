"""Owns starting a run from an existing LoRA file (kohya's --network_weights): the file is read and checked before
the base loads, and its weights are copied into the run's freshly added LoRA, module by module.

Why: users continue a finished adapter on more images or more steps, or fine-tune someone else's, and expect the
result to start where that file's images did. The run's own network settings stay in charge: a file whose modules
have another rank, or target layers this run does not train, is refused with the flags that would match it,
instead of being loaded in part. A different alpha is taken in by rescaling each up factor, so every module starts
with the file's exact weight change (up @ down × alpha / rank) and trains on at this run's scale.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from stylelora.config import DIM_FROM_WEIGHTS_KEYS, UNET_TARGETS, ConfigError

if TYPE_CHECKING:
    from torch import nn

    from stylelora.config import NetworkConfig, TrainConfig
    from stylelora.lora.adapter_file import AdapterFile

OPTION = "network.weights (--network-weights)"


def start_weights(config: TrainConfig, resume_state: dict | None, say,
                  base_configs: Path | None = None) -> tuple[TrainConfig, AdapterFile | None]:
    """The file --network-weights names, read and fitted to the run's settings before the base loads (None when
    the option is not set). A resume does not read it: the checkpoint's weights continue the run, and the run
    records the file it started from, as the checkpoint does."""
    if resume_state is not None:
        saved = resume_state["config"].get("network", {})
        if config.network.weights and config.network.weights != saved.get("weights"):
            say(f"{OPTION} is not read on a resume: the run continues from its checkpoint's weights.")
        kept = {key: saved[key] for key in DIM_FROM_WEIGHTS_KEYS if key in saved} if config.network.dim_from_weights \
            else {}  # the shapes the file gave the run's LoRA
        return dataclasses.replace(config, network=dataclasses.replace(config.network, weights=saved.get("weights"),
                                                                       **kept)), None
    start = read_start_weights(config.network.weights)
    if start is not None:
        unet_config = _unet_config(base_configs)
        if config.network.dim_from_weights:
            config = with_file_network(config, start, unet_config)
            n = config.network
            say(f"{OPTION}: rank {n.rank}, alpha {n.alpha:g}, --unet-targets {n.unet_targets}"
                + (f", conv rank {n.conv_rank}, conv alpha {n.conv_alpha:g}" if n.conv_rank else "")
                + (f", --block-dims {n.block_dims}" if n.block_dims else "")
                + (f", --conv-block-dims {n.conv_block_dims}" if n.conv_block_dims else "")
                + f" from {start.path.name} (--dim-from-weights)")
        check_start_fits(start, config, unet_config)
        if start.lycoris:  # as A1111 applies them: the same weight change, which plain LoRA then trains on
            kinds = ", ".join(f"{count} {kind}" for kind, count in start.lycoris.items())
            say(f"{start.path.name}: its LyCORIS modules ({kinds}) start as the plain LoRA of the same weight "
                "change; the run trains and writes plain LoRA.")
    return config, start


def read_start_weights(path: str | None) -> AdapterFile | None:
    """The file --network-weights names, read and checked as far as it can be alone (it exists, is a LoRA file of
    a layout we read, holds plain LoRA modules); None when the option is not set (or empty)."""
    if not path:
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


def _unet_config(base_configs: Path | None):
    from stylelora.models.family import folder_configs

    return folder_configs(base_configs)["unet"] if base_configs is not None else None


def check_start_fits(start: AdapterFile, config: TrainConfig, unet_config=None) -> None:
    """Refuse, from the file and the settings alone (so a --dry-run refuses it too), a file of the other family,
    with text-encoder modules for a run that trains none, on layers the run's --unet-targets leave out, or of
    another rank; each refusal names the flags that fit."""
    from stylelora.lora import components

    name, n = start.path.name, config.network
    try:
        components.refuse_other_family(name, start.state, start.metadata, config.train.family == "sdxl",
                                       lambda: "SDXL" if config.train.family == "sdxl" else components.OTHER_SD_LABEL)
    except ValueError as error:
        raise ConfigError(f"{OPTION}: {error}") from None
    modules = file_modules(start)
    if not n.train_text_encoder and any(kind == "text_encoder" for kind, _, _ in modules.values()):
        raise ConfigError(f"{OPTION}: {name} trains the text encoder too: drop --no-text-encoder (the file trains "
                          "the text encoder), or start from a UNet-only file.")
    targets = file_targets(modules)
    if UNET_TARGETS.index(targets) > UNET_TARGETS.index(n.unet_targets):  # each trains what the one before does
        raise ConfigError(f"{OPTION}: {name} has LoRA modules on layers --unet-targets {n.unet_targets} does not "
                          f"train: add --unet-targets {targets}.")
    if unet_config is not None and (n.block_dims or n.conv_block_dims):
        _check_block_ranks(name, modules, config, unet_config)
        return
    wanted = {"linear": n.rank, "conv": n.conv_rank or n.rank}
    found = {kind: sorted({rank for rank, _ in pairs}) for kind, pairs in shapes_by_kind(modules).items()}
    if any(ranks and ranks != [wanted[kind]] for kind, ranks in found.items()):
        theirs = " and ".join(str(rank) for kind in found for rank in found[kind])
        flags = f"--rank {'/'.join(map(str, found['linear'])) or n.rank}" + (
            f" --conv-rank {'/'.join(map(str, found['conv']))}" if found["conv"] else "")
        ours = f"--rank {n.rank}" + (f", --conv-rank {n.conv_rank}" if n.conv_rank else "")
        raise ConfigError(f"{OPTION}: {name} has LoRA rank {theirs} where this run has "
                          f"{' and '.join(str(wanted[kind]) for kind in found if found[kind])} ({ours}): train at "
                          f"the file's rank: {flags}.")


def file_modules(start: AdapterFile) -> dict[str, tuple[str, int, float]]:
    """{kohya module name: (kind, rank, alpha)}, kind "text_encoder", "conv" (a UNet 3x3 convolution) or "linear";
    a module without an alpha has alpha = rank, as kohya reads it."""
    from stylelora.lora import formats

    found = {}
    for module, parts in formats.group_kohya_modules(start.state).modules.items():
        down = parts["lora_down.weight"]
        wide = down.ndim == 4 and tuple(down.shape[2:]) != (1, 1)
        kind = "text_encoder" if formats.module_component(module) == "text_encoder" else "conv" if wide else "linear"
        found[module] = (kind, *formats.module_rank_alpha(module, parts))
    return found


def shapes_by_kind(modules: dict[str, tuple[str, int, float]]) -> dict[str, list[tuple[int, float]]]:
    """The (rank, alpha) pairs of a file's modules (file_modules) as the run sets them: "conv" for the 3x3
    convolutions (--conv-rank, --conv-alpha), "linear" for every other layer, the text encoders' too (--rank)."""
    return {kind: sorted({(rank, alpha) for module_kind, rank, alpha in modules.values()
                          if (module_kind == "conv") == (kind == "conv")}) for kind in ("linear", "conv")}


def with_file_network(config: TrainConfig, start: AdapterFile, unet_config=None) -> TrainConfig:
    """kohya's --dim_from_weights: the run's rank, alpha, conv rank and alpha, and --unet-targets, from the file; a
    file whose UNet modules differ by block (kohya's block_dims, as stylelora and sd-scripts write it) gives the run
    those block lists too. Refused where one block's modules of one kind have more than one rank or alpha."""
    from stylelora.config import with_sources, with_values

    modules = file_modules(start)
    shapes = shapes_by_kind(modules)
    mixed = {kind: pairs for kind, pairs in shapes.items() if len(pairs) > 1}
    if mixed and unet_config is not None:
        values = _file_block_lists(start, modules, unet_config, config.train.family == "sdxl")
        return with_sources(with_values(config, values), dict.fromkeys(values, f"file {start.path.name} "
                                                                              "(--dim-from-weights)"))
    if mixed or not shapes["linear"]:
        found = "; ".join(f"{kind}: {', '.join(f'rank {r} alpha {a:g}' for r, a in pairs)}"
                          for kind, pairs in shapes.items() if pairs)
        raise ConfigError(f"{OPTION}: --dim-from-weights needs one rank and alpha for the layers of "
                          f"{start.path.name} (and one for its 3x3 convolutions), but it has {found}: give --rank, "
                          "--alpha (and --conv-rank, --conv-alpha) instead.")
    (rank, alpha), conv = shapes["linear"][0], (shapes["conv"] or [(None, None)])[0]
    values = {"network.rank": rank, "network.alpha": alpha, "network.conv_rank": conv[0],
              "network.conv_alpha": conv[1], "network.unet_targets": file_targets(modules)}
    return with_sources(with_values(config, values), dict.fromkeys(values, f"file {start.path.name} "
                                                                          "(--dim-from-weights)"))


def _file_block_lists(start: AdapterFile, modules: dict, unet_config, sdxl: bool) -> dict:
    """The network settings that give each module of the file its own rank and alpha: kohya's block lists for the
    UNet, --rank / --alpha for the text encoders (one shape), --unet-targets."""
    from stylelora.train.block_settings import list_index, list_names

    layout, names = list_names(unet_config, sdxl)
    found = {kind: {name: set() for name in names} for kind in ("linear", "conv")}
    text = {(rank, alpha) for kind, rank, alpha in modules.values() if kind == "text_encoder"}
    for module, (kind, rank, alpha) in modules.items():
        index = list_index(layout, sdxl, names, module) if kind != "text_encoder" else None
        if index is not None:
            found[kind][names[index]].add((rank, alpha))
    mixed = [f"{name} ({', '.join(f'{r}/{a:g}' for r, a in sorted(pairs))})" for kind in found
             for name, pairs in found[kind].items() if len(pairs) > 1] + (
        [f"the text encoders ({', '.join(f'{r}/{a:g}' for r, a in sorted(text))})"] if len(text) > 1 else [])
    if mixed:
        raise ConfigError(f"{OPTION}: --dim-from-weights reads one rank and alpha per UNet block (kohya's "
                          f"block_dims), but {start.path.name} has several in {'; '.join(mixed)}: give the network "
                          "settings instead.")
    linear = [pair for pairs in found["linear"].values() for pair in pairs]
    rank, alpha = next(iter(text)) if text else Counter(linear).most_common(1)[0][0]

    def lists(kind: str) -> tuple[str, str]:
        shapes = [next(iter(pairs), (0, alpha)) for pairs in found[kind].values()]
        return ",".join(str(r) for r, _ in shapes), ",".join(f"{a:g}" for _, a in shapes)

    values = {"network.rank": rank, "network.alpha": alpha, "network.unet_targets": file_targets(modules)}
    values["network.block_dims"], values["network.block_alphas"] = lists("linear")
    if any(found["conv"].values()):
        values["network.conv_block_dims"], values["network.conv_block_alphas"] = lists("conv")
    return values


def _check_block_ranks(name: str, modules: dict, config: TrainConfig, unet_config) -> None:
    """With block lists, each UNet module of the file must have its block's rank, and each text-encoder module
    --rank: otherwise refused, naming a few."""
    from stylelora.train.block_settings import block_plan

    plan, n = block_plan(config, unet_config, config.train.family == "sdxl"), config.network
    wrong = []
    for module, (kind, rank, _) in modules.items():
        wanted = n.rank if kind == "text_encoder" else (plan.shape(module, kind == "conv") or (0, 0))[0]
        if rank != wanted:
            wrong.append(f"{module} has rank {rank}, this run {wanted}")
    if wrong:
        raise ConfigError(f"{OPTION}: {len(wrong)} LoRA modules of {name} do not have this run's block ranks (e.g. "
                          f"{'; '.join(wrong[:3])}): add --dim-from-weights to take the file's.")


def file_targets(modules: dict[str, tuple[str, int, float]]) -> str:
    """The --unet-targets a file's UNet modules need: locon with 3x3 convolutions, kohya with layers outside the
    attention projections (feed-forward, proj_in / proj_out), else attn."""
    unet = {name: kind for name, (kind, _, _) in modules.items() if kind != "text_encoder"}
    if any(kind == "conv" for kind in unet.values()):
        return "locon"
    attention = re.compile(r"_attn[12]_to_(q|k|v|out_0)$")
    return "kohya" if any(not attention.search(name) for name in unet) else "attn"


def describe_start(start: AdapterFile | None) -> str:
    """The dry run's line about the file a run starts from ("" without one)."""
    if start is None:
        return ""
    modules = file_modules(start)
    ranks = sorted({rank for _, rank, _ in modules.values()})
    return (f"starts from {start.path.name}: {len(modules)} LoRA modules of rank {' and '.join(map(str, ranks))} "
            "(matched to this run's layers once the base loads)")


def copy_start_weights(start: AdapterFile, models: dict[str, nn.Module | None], network: NetworkConfig) -> str:
    """Copy the file's LoRA (checked by check_start_fits) into the run's adapter ("default") on `models`
    (components.models_dict); refuse (ConfigError) modules on layers this run does not train, which the file's names
    alone did not show. Returns the line the run prints about it."""
    from stylelora.lora import components, formats
    from stylelora.lora.inject import module_ranks

    try:
        parts = formats.split_kohya_state(start.state, components.component_prefixes(models))
        converted = {component: formats.kohya_to_peft(parts[prefix], components.component_names(models, component))
                     for component, prefix in components.component_prefixes(models).items() if parts[prefix]}
    except ValueError as error:
        raise ConfigError(f"{OPTION}: {error}") from None
    trained = {component: module_ranks(model) for component, model in models.items() if _has_lora(model)}
    _check_layers(start.path.name, converted, trained, network)
    copied = {component: _copy(models[component], *converted[component], trained[component])
              for component in converted}
    said = (f"starting from {start.path.name}: {sum(copied.values())} of this run's "
            f"{sum(map(len, trained.values()))} LoRA modules take its weights")
    fresh = [f"the {component.replace('_', ' ')}'s {len(ranks) - copied.get(component, 0)}"
             for component, ranks in trained.items() if len(ranks) > copied.get(component, 0)]
    return said + (f"; {' and '.join(fresh)} start at zero, as in a new run" if fresh else "") + "."


def _has_lora(model: nn.Module | None) -> bool:
    return model is not None and "default" in (getattr(model, "peft_config", None) or {})


def _check_layers(name: str, converted: dict, trained: dict, network: NetworkConfig) -> None:
    """Refuse modules of the file on layers without a LoRA in this run (check_start_fits has refused other ranks
    and text-encoder modules for a run that trains none)."""
    untrained = [f"{component}:{path}" for component, (_, ranks) in converted.items() for path in ranks
                 if path not in trained.get(component, {})]
    if untrained:
        raise ConfigError(f"{OPTION}: {len(untrained)} LoRA modules of {name} are on layers this run does not train "
                          f"(e.g. {', '.join(untrained[:3])}): train the UNet layers it trains (this run: "
                          f"--unet-targets {network.unet_targets}; locon adds the 3x3 convs).")


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
