"""Owns kohya's block-wise training settings: per UNet block, a learning-rate multiplier (sd-scripts' network_args
down_lr_weight, mid_lr_weight, up_lr_weight, block_lr_zero_threshold) and the rank and alpha of its LoRA modules
(block_dims, block_alphas, conv_block_dims, conv_block_alphas). The lists are checked against the base's config files
and the layers of a weightless (meta-device) UNet built from them, before its weights load.

Why: users train a style on the output blocks only, or give the blocks near the image a larger rank, and share
sd-scripts configs that say so. The lists are kohya's, block for block. Blocks are numbered as A1111 and the LoRA
Block Weight extension number them (stylelora.lora.block_weights.BlockLayout): IN00 (the input conv) to IN11, M00,
OUT00 to OUT11 on SD 1.x/2.x. On SDXL kohya's lists follow its UNet's own layout: 9 input blocks, the middle block's
three parts (resnet, attention, resnet) as M00 to M02 and 9 output blocks, and block_dims has one more entry at each
end (the time embedding and the output layers, which hold no LoRA). On any other UNet (the toy base) the lists are as
long as its blocks. A block at multiplier 0 (or at most block_lr_zero_threshold) or at rank 0 gets no LoRA module at
all, as in sd-scripts: it neither trains nor goes into the file. The text encoders keep --rank and their own rates.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stylelora.config import OPTIONS_BY_KEY, ConfigError, TrainConfig
from stylelora.lora.block_weights import BlockLayout

# sd-scripts' named curves for down_lr_weight / up_lr_weight, each optionally "+BASE" (networks/lora.py,
# get_block_lr_weight): over a list of n blocks, block i gets f(i / (n - 1)) + BASE.
LR_WEIGHT_CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
_SDXL_MID_PART = re.compile(r"(?:mid_block[._](resnets|attentions)[._](\d+))|(?:middle_block[._](\d+))")


def flag(key: str) -> str:
    """The command-line flag of a block option (stylelora.config declares it)."""
    return OPTIONS_BY_KEY[key].flag


def parse_numbers(text: str, key: str, *, integers: bool = False) -> tuple[float, ...]:
    """The comma-separated numbers of a block list; ValueError naming the item that is not one."""
    numbers = []
    for item in text.split(","):
        try:
            number = int(item) if integers else float(item)
        except ValueError:
            curves = f", or one of sd-scripts' curves: {', '.join(LR_WEIGHT_CURVES)} (e.g. sine+0.5)" \
                if key in ("down_lr_weight", "up_lr_weight") else ""
            raise ValueError(f"{flag(key)} {text}: {item.strip()!r} is not a {'whole ' if integers else ''}number; "
                             f"give one per block, separated by commas{curves}") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{flag(key)} {text}: {item.strip()!r} must be 0 or more")
        numbers.append(number)
    return tuple(numbers)


def curve(text: str, count: int) -> tuple[float, ...] | None:
    """sd-scripts' named curve over `count` blocks ("sine", "linear+0.5", ...); None when `text` names none."""
    name, _, base = text.strip().partition("+")
    if name not in LR_WEIGHT_CURVES:
        return None
    offset = float(base) if base else 0.0
    spread = [i / (count - 1) if count > 1 else 0.0 for i in range(count)]
    values = {"cosine": [math.sin(math.pi * x / 2) for x in reversed(spread)],
              "sine": [math.sin(math.pi * x / 2) for x in spread],
              "linear": spread, "reverse_linear": list(reversed(spread)), "zeros": [0.0] * count}[name]
    return tuple(value + offset for value in values)


def syntax_problem(key: str, text: str) -> str | None:
    """What is wrong with a block option's value before the base is known (None: nothing)."""
    name, plus, base = text.strip().partition("+")
    if key in ("down_lr_weight", "up_lr_weight") and name in LR_WEIGHT_CURVES:
        return None if not plus or re.fullmatch(r"\d+(\.\d*)?|\.\d+", base) else \
            f"{flag(key)} {text}: after '+' give the number every block adds, e.g. {name}+0.5"
    try:
        parse_numbers(text, key, integers=key in ("block_dims", "conv_block_dims"))
    except ValueError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class BlockPlan:
    """Per block of kohya's list (`names`), the learning-rate multiplier and the LoRA shapes a run trains with;
    `plain` and `plain_conv`: the (rank, alpha) of layers outside the numbered blocks."""

    layout: BlockLayout
    sdxl: bool
    names: tuple[str, ...]
    lr: tuple[float, ...]  # 1.0 everywhere when no lr weight is set
    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...]
    conv_alphas: tuple[float, ...]
    plain: tuple[int, float]
    plain_conv: tuple[int, float]

    def index(self, path: str) -> int | None:
        """The position in the block lists of a UNet layer (diffusers path or kohya/SAI name); None outside them."""
        return list_index(self.layout, self.sdxl, self.names, path)

    def lr_weight(self, path: str) -> float:
        index = self.index(path)
        return 1.0 if index is None else self.lr[index]

    def shape(self, path: str, conv: bool) -> tuple[int, float] | None:
        """(rank, alpha) of the layer's LoRA module; None where it gets none (rank 0 or multiplier 0)."""
        index = self.index(path)
        if index is None:
            return self.plain_conv if conv else self.plain
        rank, alpha = (self.conv_dims[index], self.conv_alphas[index]) if conv else (self.dims[index],
                                                                                     self.alphas[index])
        return (rank, alpha) if rank > 0 and self.lr[index] > 0 else None


def list_index(layout: BlockLayout, sdxl: bool, names: tuple[str, ...], path: str) -> int | None:
    """The position in kohya's block lists (`names`, from list_names) of a UNet layer (diffusers path or kohya/SAI
    name); None outside them."""
    block = layout.block_of(path)
    if block == "M00" and sdxl:  # kohya numbers SDXL's middle block's parts: resnet, attention, resnet
        found = _SDXL_MID_PART.search(path)
        if found:
            part = 2 * int(found.group(2)) + (found.group(1) == "attentions") if found.group(1) \
                else int(found.group(3))
            block = f"M{part:02d}"
    return names.index(block) if block in names else None


def list_names(unet_config: Mapping, sdxl: bool) -> tuple[BlockLayout, tuple[str, ...]]:
    """The UNet's layout, and the blocks of kohya's block_dims list for it, in order."""
    layout = BlockLayout.from_config(unet_config)
    down, mid, up = block_names(layout, sdxl)
    ends = ["time_embed"], ["out"]  # SDXL's block_dims hold these two; no LoRA lives there
    return layout, tuple((ends[0] if sdxl else []) + down + mid + up + (ends[1] if sdxl else []))


def block_names(layout: BlockLayout, sdxl: bool) -> tuple[list[str], list[str], list[str]]:
    """kohya's down, middle and up lists for this UNet, as block names."""
    every = layout.blocks()[1:]  # no BASE: the text encoder has no block settings
    down = [name for name in every if name.startswith("IN")]
    up = [name for name in every if name.startswith("OUT")]
    return down, (["M00", "M01", "M02"] if sdxl else ["M00"]), up


def is_set(config: TrainConfig) -> bool:
    return any(getattr(config.optim, key) is not None for key in LR_WEIGHT_KEYS) or \
        any(getattr(config.network, key) is not None for key in DIM_KEYS)


def block_plan(config: TrainConfig, unet_config: Mapping, sdxl: bool) -> BlockPlan | None:
    """The run's plan for a UNet of this config, None when no block option is set; ConfigError for a list of the
    wrong length, naming the blocks it must cover."""
    if not is_set(config):
        return None
    layout, names = list_names(unet_config, sdxl)
    down, mid, up = block_names(layout, sdxl)
    o, n = config.optim, config.network
    lr = [*_lr_list(o.down_lr_weight, "down_lr_weight", down, o.block_lr_zero_threshold),
          *_lr_list(o.mid_lr_weight, "mid_lr_weight", mid, o.block_lr_zero_threshold),
          *_lr_list(o.up_lr_weight, "up_lr_weight", up, o.block_lr_zero_threshold)]
    lr = ([1.0] if sdxl else []) + lr + ([1.0] if sdxl else [])
    conv_rank = n.conv_rank or n.rank
    conv_alpha = n.conv_alpha if n.conv_alpha is not None else n.alpha
    return BlockPlan(layout, sdxl, names, tuple(lr),
                     dims=tuple(int(d) for d in _dim_list(n.block_dims, "block_dims", names, n.rank, integers=True)),
                     alphas=_dim_list(n.block_alphas, "block_alphas", names, n.alpha),
                     conv_dims=tuple(int(d) for d in _dim_list(n.conv_block_dims, "conv_block_dims", names,
                                                               conv_rank, integers=True)),
                     conv_alphas=_dim_list(n.conv_block_alphas, "conv_block_alphas", names, conv_alpha),
                     plain=(n.rank, n.alpha), plain_conv=(conv_rank, conv_alpha))


def _lr_list(text: str | None, key: str, blocks: list[str], zero_threshold: float) -> tuple[float, ...]:
    if text is None:
        return (1.0,) * len(blocks)
    values = _fit(curve(text, len(blocks)) if key != "mid_lr_weight" else None, key, text, blocks)
    # sd-scripts: a given list's multipliers at or under the threshold become 0, and those blocks get no module
    return tuple(weight if weight > zero_threshold else 0.0 for weight in values)


def _dim_list(text: str | None, key: str, names: tuple[str, ...], default: float, integers: bool = False):
    return (default,) * len(names) if text is None else _fit(None, key, text, list(names), integers)


def _fit(values: tuple[float, ...] | None, key: str, text: str, blocks: list[str],
         integers: bool = False) -> tuple[float, ...]:
    try:
        values = values or parse_numbers(text, key, integers=integers)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if len(values) != len(blocks):
        raise ConfigError(f"{flag(key)} {text} gives {len(values)} values, but this base's UNet has {len(blocks)} "
                          f"blocks there: {','.join(blocks)}; give one value per block, in that order.")
    return values


def unet_targets_of(unet_config: Mapping, preset: str):
    """The layers `preset` (--unet-targets) adapts in a UNet of this config, read from the model built on the meta
    device: what a block holds, without loading or allocating any weight."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from stylelora.lora.inject import unet_lora_targets

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return unet_lora_targets(unet, preset)


def modules_by_block(plan: BlockPlan, targets) -> dict[str, list[tuple[int, float] | None]]:
    """{block: the (rank, alpha) each adapted layer in it gets, None where it gets no LoRA}, blocks in list order."""
    found: dict[str, list] = {name: [] for name in plan.names}
    for path in targets.all:
        index = plan.index(path)
        if index is not None:
            found[plan.names[index]].append(plan.shape(path, path in targets.conv))
    return {name: shapes for name, shapes in found.items() if shapes}


def describe(plan: BlockPlan | None, targets) -> str:
    """One line a run and its dry run print: each block's multiplier where they differ, the blocks left without a
    LoRA, and each block's ranks/alphas where they differ (`targets`: the layers --unet-targets adapts)."""
    if plan is None:
        return ""
    blocks = modules_by_block(plan, targets)
    parts = []
    if len(set(plan.lr)) > 1:
        parts.append("learning rate × " + ", ".join(f"{name} {weight:g}" for name, weight in zip(plan.names, plan.lr)
                                                     if name not in ("time_embed", "out")))
    skipped = [name for name, shapes in blocks.items() if not any(shapes)]
    if skipped:
        parts.append(f"no LoRA in {', '.join(skipped)}")
    shapes = {name: sorted({shape for shape in found if shape}) for name, found in blocks.items()}
    if len({shape for found in shapes.values() for shape in found}) > 1:
        parts.append("rank/alpha " + ", ".join(f"{name} {' '.join(f'{r}/{a:g}' for r, a in found)}"
                                               for name, found in shapes.items() if found))
    return "UNet blocks: " + "; ".join(parts) if parts else ""


def check_against_base(config: TrainConfig, base_configs: Path) -> str:
    """The run's plan read against the base's UNet config (no weights), so that a run and its dry run refuse a list
    of the wrong length, or one that leaves every adapted layer without a LoRA, before the base loads. Returns the
    line that describes it ("" when no block option is set)."""
    from stylelora.models.family import folder_configs

    if not is_set(config):
        return ""
    unet_config = folder_configs(base_configs)["unet"]
    plan = block_plan(config, unet_config, config.train.family == "sdxl")
    n = config.network
    targets = unet_targets_of(unet_config, n.unet_targets)
    blocks = modules_by_block(plan, targets)
    if not any(shape for shapes in blocks.values() for shape in shapes):
        given = [name for i, name in enumerate(plan.names) if name not in blocks and plan.lr[i] > 0
                 and (plan.dims[i] or plan.conv_dims[i]) and name not in ("time_embed", "out")]
        raise ConfigError(f"The block settings leave every layer --unet-targets {n.unet_targets} adapts without a "
                          f"LoRA: each block that holds one ({', '.join(blocks)}) has a multiplier or a rank of 0"
                          + (f", and {', '.join(given)} hold none" if given else "")
                          + "; give one of those blocks a multiplier and a rank above 0.")
    emptied = [name for name, shapes in blocks.items() if not all(shapes)]
    if n.weights and not n.dim_from_weights and (n.block_dims or n.conv_block_dims or emptied):
        zeros = f" and the multipliers of 0 in {', '.join(emptied)}" if emptied else ""
        raise ConfigError("--network-weights starts every module from its file, at the file's rank: drop "
                          f"--block-dims / --conv-block-dims (--dim-from-weights takes the file's){zeros} (a block's "
                          "multiplier may change its rate, not its modules).")
    return describe(plan, targets)
