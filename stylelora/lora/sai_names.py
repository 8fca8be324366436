"""SAI/SGM module names of a diffusers UNet2DConditionModel, derived from its config and its live modules.

Stability's "generative-models" (SGM) code, like the original LDM code of SD1.x/2.x, lays a UNet out as flat
sequences: `input_blocks.N.K`, `middle_block.K`, `output_blocks.N.K`, plus `time_embed`, `label_emb` and `out`.
kohya sd-scripts trains SDXL on that layout, so SDXL LoRA files name UNet modules from it, e.g.
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`. The rules, for a UNet whose config has levels
0..L-1 (`block_out_channels`), `layers_per_block` resnets per down level and one more per up level:

- `input_blocks.0.0` is `conv_in`. Then, level by level, one input block per down resnet (`.0` = the resnet,
  `.1` = its Transformer2DModel when the level has cross-attention), then one input block for the level's
  downsampler (`.0.op`) unless it is the last level.
- `middle_block.0` / `.1` / `.2` are the mid block's resnet 0, Transformer2DModel and resnet 1.
- One output block per up resnet, counted across levels: `.0` the resnet, `.1` its Transformer2DModel if any,
  and on a level's last resnet the upsampler (`.conv`) in the next free slot (`.1` or `.2`), except on the last level.
- Inside a resnet: norm1/conv1 -> in_layers.0/.2, time_emb_proj -> emb_layers.1, norm2/conv2 -> out_layers.0/.3,
  conv_shortcut -> skip_connection. Inside a Transformer2DModel names are the same in both layouts.
- time_embedding.linear_1/2 -> time_embed.0/.2; add_embedding (SDXL) or class_embedding -> label_emb.0.0/.2;
  conv_norm_out -> out.0; conv_out -> out.2.

The transformer depth of each level only changes names inside a Transformer2DModel, which both layouts share,
so it never moves an SGM index. The map is computed per UNet and every Linear/Conv2d must get exactly one name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from stylelora.lora.formats import UNET_PREFIX, KohyaNames
from stylelora.lora.layers import adaptable_layers

# Sub-module renames per diffusers block kind (first path component, diffusers -> SGM).
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers TimestepEmbedding(linear_1, act, linear_2) is SGM's nn.Sequential(Linear, SiLU, Linear).
EMBEDDING_PARTS = {"linear_1": "0", "linear_2": "2"}
DOWNSAMPLER_PARTS = {"conv": "op"}
UPSAMPLER_PARTS = {"conv": "conv"}
LAYER = {}  # the block is itself one layer: its SGM path is the block's
SAME_NAMES = None  # Transformer2DModel / SpatialTransformer: identical names inside

DOWN_BLOCK_ATTENTION = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCK_ATTENTION = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# diffusers always builds its cross-attention mid block as resnet, Transformer2DModel, resnet.
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"
LABEL_EMBEDDINGS = {"add_embedding": ("addition_embed_type", ("text_time",)),
                    "class_embedding": ("class_embed_type", ("timestep", "projection"))}
NAMED_LAYER_TYPES = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class SgmBlock:
    """One diffusers sub-module and where it sits in the SGM layout; `parts` renames what is inside it."""

    diffusers: str
    sai: str
    parts: Mapping[str, str] | None

    def sai_path(self, local: str) -> str | None:
        """SGM path of the module at `local` (relative to this block); None if the block has no such part."""
        if not local:
            return self.sai
        if self.parts is None:
            return f"{self.sai}.{local}"
        head, _, rest = local.partition(".")
        if head not in self.parts:
            return None
        return ".".join(part for part in (self.sai, self.parts[head], rest) if part)


def _per_level(value, levels: int, key: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"UNet config {key}={value!r} does not give one value per level ({levels} levels).")
    return [int(v) for v in values]


def _has_attention(block_type: str, table: dict[str, bool], side: str) -> bool:
    if block_type not in table:
        raise ValueError(
            f"There is no SAI/SGM layout for the {side} block type {block_type!r}; SD-style UNets use "
            f"{' / '.join(table)}."
        )
    return table[block_type]


def _top_level_blocks(config: Mapping) -> list[SgmBlock]:
    blocks = [
        SgmBlock("conv_in", "input_blocks.0.0", LAYER),
        SgmBlock("time_embedding", "time_embed", EMBEDDING_PARTS),
        SgmBlock("conv_norm_out", "out.0", LAYER),
        SgmBlock("conv_out", "out.2", LAYER),
    ]
    label = [name for name, (key, kinds) in LABEL_EMBEDDINGS.items() if config.get(key) in kinds]
    if len(label) > 1:
        raise ValueError(f"UNet has both {' and '.join(label)}; the SGM layout has one label_emb for them.")
    blocks += [SgmBlock(name, "label_emb.0", EMBEDDING_PARTS) for name in label]
    return blocks


def _down_blocks(config: Mapping, layers: list[int]) -> list[SgmBlock]:
    blocks: list[SgmBlock] = []
    index = 1  # input_blocks.0 is conv_in
    last = len(layers) - 1
    for level, (block_type, count) in enumerate(zip(config["down_block_types"], layers)):
        attention = _has_attention(block_type, DOWN_BLOCK_ATTENTION, "down")
        for i in range(count):
            blocks.append(SgmBlock(f"down_blocks.{level}.resnets.{i}", f"input_blocks.{index}.0", RESNET_PARTS))
            if attention:
                blocks.append(SgmBlock(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{index}.1", SAME_NAMES))
            index += 1
        if level < last:
            blocks.append(SgmBlock(f"down_blocks.{level}.downsamplers.0", f"input_blocks.{index}.0",
                                   DOWNSAMPLER_PARTS))
            index += 1
    return blocks


def _mid_blocks(config: Mapping) -> list[SgmBlock]:
    mid_type = config.get("mid_block_type", MID_BLOCK_TYPE)
    if mid_type is None:
        return []
    if mid_type != MID_BLOCK_TYPE:
        raise ValueError(
            f"There is no SAI/SGM layout for the mid block type {mid_type!r}; SD-style UNets use {MID_BLOCK_TYPE}."
        )
    return [
        SgmBlock("mid_block.resnets.0", "middle_block.0", RESNET_PARTS),
        SgmBlock("mid_block.attentions.0", "middle_block.1", SAME_NAMES),
        SgmBlock("mid_block.resnets.1", "middle_block.2", RESNET_PARTS),
    ]


def _up_blocks(config: Mapping, layers: list[int]) -> list[SgmBlock]:
    blocks: list[SgmBlock] = []
    index = 0
    last = len(layers) - 1
    for level, (block_type, count) in enumerate(zip(config["up_block_types"], reversed(layers))):
        attention = _has_attention(block_type, UP_BLOCK_ATTENTION, "up")
        resnets = count + 1  # an up level has one resnet more than its down level
        for i in range(resnets):
            blocks.append(SgmBlock(f"up_blocks.{level}.resnets.{i}", f"output_blocks.{index}.0", RESNET_PARTS))
            slot = 1
            if attention:
                blocks.append(SgmBlock(f"up_blocks.{level}.attentions.{i}", f"output_blocks.{index}.1", SAME_NAMES))
                slot = 2
            if i == resnets - 1 and level < last:
                blocks.append(SgmBlock(f"up_blocks.{level}.upsamplers.0", f"output_blocks.{index}.{slot}",
                                       UPSAMPLER_PARTS))
            index += 1
    return blocks


def sgm_blocks(config: Mapping) -> list[SgmBlock]:
    """The SGM position of every diffusers block a UNet2DConditionModel with this config builds."""
    levels = len(config["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if len(config[key]) != levels:
            raise ValueError(f"UNet config has {len(config[key])} {key} for {levels} block_out_channels.")
    layers = _per_level(config["layers_per_block"], levels, "layers_per_block")
    return _top_level_blocks(config) + _down_blocks(config, layers) + _mid_blocks(config) + _up_blocks(config, layers)


def _named_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv2d (peft wrappers resolved) and normalisation layers of the UNet, by diffusers path."""
    layers = dict(adaptable_layers(unet))
    layers.update((path, m) for path, m in unet.named_modules() if isinstance(m, NAMED_LAYER_TYPES))
    position = {path: i for i, (path, _) in enumerate(unet.named_modules())}
    return dict(sorted(layers.items(), key=lambda item: position[item[0]]))


def _owner(path: str, blocks: dict[str, SgmBlock]) -> tuple[SgmBlock, str] | None:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        block = blocks.get(".".join(parts[:cut]))
        if block is not None:
            return block, ".".join(parts[cut:])
    return None


def sai_unet_names(unet: nn.Module) -> dict[str, str]:
    """{diffusers module path: SAI/SGM module path} for every Linear, Conv2d and norm layer of `unet`.

    Raises ValueError when the config and the live modules disagree, when a Linear/Conv2d (or norm) has no
    SGM name, or when two modules would get the same one.
    """
    config = unet.config
    blocks = {block.diffusers: block for block in sgm_blocks(config)}
    live = dict(unet.named_modules())
    missing = [path for path in blocks if path not in live]
    if missing:
        raise ValueError(
            f"The UNet's config implies blocks its modules lack ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): config and model disagree."
        )
    names: dict[str, str] = {}
    unnamed: list[str] = []
    for path in _named_layers(unet):
        owner = _owner(path, blocks)
        sai = owner[0].sai_path(owner[1]) if owner else None
        if sai is None:
            unnamed.append(path)
        else:
            names[path] = sai
    if unnamed:
        raise ValueError(
            f"{len(unnamed)} layers of this {type(unet).__name__} have no SAI/SGM name (e.g. "
            f"{', '.join(unnamed[:4])}): the SGM layout covers SD1.x/2.x/SDXL UNets, not extra embeddings or "
            f"projections. Save this model's LoRA with diffusers names instead."
        )
    _refuse_collisions(names, "SAI/SGM path")
    return names


def _refuse_collisions(names: dict[str, str], what: str) -> None:
    seen: dict[str, str] = {}
    for path, name in names.items():
        if name in seen:
            raise ValueError(f"Modules {seen[name]} and {path} would share the {what} {name}.")
        seen[name] = path


def sai_kohya_names(unet: nn.Module, prefix: str = UNET_PREFIX) -> KohyaNames:
    """kohya names `<prefix>_<SAI path with _>` (as sd-scripts writes SDXL) for every Linear/Conv2d of `unet`.

    The result plugs into formats.peft_to_kohya / kohya_to_peft like formats.kohya_names does for diffusers names.
    """
    sai = sai_unet_names(unet)
    layers = dict(adaptable_layers(unet))
    by_path = {path: f"{prefix}_{sai[path].replace('.', '_')}" for path in layers}
    _refuse_collisions(by_path, "kohya name")
    by_name = {name: path for path, name in by_path.items()}
    return KohyaNames(prefix=prefix, by_path=by_path, by_name=by_name, ambiguous={}, layers=layers)
