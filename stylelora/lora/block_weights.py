"""A1111's LoRA Block Weight (`lbw=`): per-UNet-block multipliers for one adapter, and which block a layer is in.

The LoRA Block Weight extension (hako-mikan/sd-webui-lora-block-weight; ComfyUI Inspire's "Lora Loader (Block
Weight)") names the UNet's blocks as the original Stable Diffusion code numbers them: BASE (the text encoder), IN00
(the input convolution), IN01... (input_blocks), M00 (the middle block) and OUT00... (output_blocks). A weight list
gives one multiplier per block, in either of two lengths: every block of the UNet (26 for SD 1.x/2.x, 20 for SDXL), or
only the blocks that hold attention, where a plain LoRA lives (17 for SD 1.x/2.x, 12 for SDXL). In the short form
the blocks it leaves out get 0, as the extension does (a LoRA on attention only has nothing there). Style LoRA users
keep a style to the output blocks (`lbw=OUTALL`) so that it leaves a character's shape to the character's LoRA.

Block numbers come from the UNet's config (down_block_types, layers_per_block), so the toy base and any other
SD-architecture UNet get their own lists; an `lbw=` value of the wrong length is refused with them. Torch-free.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

# The extension's default presets, 17 weights each (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 ... OUT11):
# sd-webui-lora-block-weight's README, "Weight setting examples", and its built-in preset list.
PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}
_DIFFUSERS_BLOCK = re.compile(r"(?:^|[._])(down|up)_?blocks[._](\d+)[._](attentions|resnets|downsamplers|upsamplers)"
                              r"[._](\d+)")
_SGM_BLOCK = re.compile(r"(?:^|[._])(input|output)_blocks[._](\d+)[._]")


class BlockWeightError(ValueError):
    """An `lbw=` value cannot be used; the message says what to write instead."""


@lru_cache(maxsize=256)  # a blend's plan asks once per text-encoder layer
def parse_ratios(text: str) -> tuple[float, ...]:
    """The multipliers an `lbw=` value names: a preset (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5)
    or comma-separated numbers, BASE first."""
    value = text.strip()
    numbers = PRESETS.get(value.upper(), value)
    ratios = []
    for item in numbers.split(","):
        try:
            ratio = float(item)
        except ValueError:
            raise BlockWeightError(
                f"lbw={text}: {item.strip()!r} is neither a number nor a preset; write numbers separated by commas, "
                f"BASE first (e.g. lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1), or one of {', '.join(PRESETS)}.") from None
        if not math.isfinite(ratio):
            raise BlockWeightError(f"lbw={text}: {item.strip()!r} must be a finite number.")
        ratios.append(ratio)
    return tuple(ratios)


def text_encoder_ratio(text: str) -> float:
    """BASE, the multiplier the `lbw=` value gives the text encoder(s)."""
    return parse_ratios(text)[0]


def _per_block(value, count: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * count


@dataclass(frozen=True)
class BlockLayout:
    """A UNet's blocks in A1111's numbering: per down block (first input index, resnet count, holds attention), per
    up block (first output index, resnet count, holds attention), and whether the middle block holds attention."""

    down: tuple[tuple[int, int, bool], ...]
    up: tuple[tuple[int, int, bool], ...]
    mid_attention: bool

    @classmethod
    def from_config(cls, config: Mapping) -> BlockLayout:
        down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
        layers = _per_block(config.get("layers_per_block", 2), len(down_types))
        down, index = [], 1  # input_blocks[0] is conv_in
        for position, (kind, count) in enumerate(zip(down_types, layers)):
            down.append((index, count, "Attn" in kind))
            index += count + (position < len(down_types) - 1)  # every block but the last ends in a downsampler
        up, index = [], 0
        for kind, count in zip(up_types, reversed(layers)):
            # an up block has one resnet more than a down block, and its upsampler sits in its last numbered block
            up.append((index, count + 1, "Attn" in kind))
            index += count + 1
        return cls(tuple(down), tuple(up), "Attn" in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"))

    def blocks(self, attention_only: bool = False) -> list[str]:
        """BASE, then the input, middle and output blocks in order: all of them, or those that hold attention."""
        inputs = [] if attention_only else ["IN00"]
        for position, (first, count, attention) in enumerate(self.down):
            last = position == len(self.down) - 1
            if attention or not attention_only:
                inputs += [f"IN{first + j:02d}" for j in range(count)]
            if not last and not attention_only:
                inputs.append(f"IN{first + count:02d}")
        middle = ["M00"] if self.mid_attention or not attention_only else []
        outputs = [f"OUT{first + j:02d}" for first, count, attention in self.up for j in range(count)
                   if attention or not attention_only]
        return ["BASE", *inputs, *middle, *outputs]

    def block_of(self, name: str) -> str | None:
        """The block a UNet layer is in, from a diffusers path (down_blocks.1.attentions.0.…), a kohya name of one
        (lora_unet_down_blocks_1_attentions_0_…) or an SGM/SAI name (input_blocks.4.1.…,
        lora_unet_input_blocks_4_1_…); None for layers outside the numbered blocks (time embedding, conv_out)."""
        sgm = _SGM_BLOCK.search(name)
        if sgm:
            return f"{'IN' if sgm.group(1) == 'input' else 'OUT'}{int(sgm.group(2)):02d}"
        if "mid_block" in name or "middle_block" in name:
            return "M00"
        if re.search(r"(?:^|[._])conv_in(?:$|[._])", name):
            return "IN00"
        found = _DIFFUSERS_BLOCK.search(name)
        if not found:
            return None
        side, block, part, j = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
        first, count, _ = (self.down if side == "down" else self.up)[block]
        if part == "downsamplers":
            return f"IN{first + count:02d}"
        if part == "upsamplers":
            return f"OUT{first + count - 1:02d}"
        return f"{'IN' if side == 'down' else 'OUT'}{first + j:02d}"

    def multipliers(self, text: str) -> dict[str, float]:
        """{block: multiplier} for an `lbw=` value on this UNet; blocks the short form leaves out get 0."""
        ratios = parse_ratios(text)
        every, attention = self.blocks(), self.blocks(attention_only=True)
        for names in (attention, every):
            if len(ratios) == len(names):
                return {block: 0.0 for block in every} | dict(zip(names, ratios))
        preset = f" (preset {text.strip().upper()}, which is for SD 1.x/2.x)" if text.strip().upper() in PRESETS else ""
        raise BlockWeightError(
            f"lbw={text} gives {len(ratios)} weights{preset}, but this base's UNet takes {len(attention)} "
            f"({','.join(attention)}) or {len(every)} ({','.join(every)}).")

    def multiplier_of(self, text: str) -> Callable[[str], float]:
        """UNet layer name (any form `block_of` reads) -> the `lbw=` value's multiplier for the block it is in; 1 for
        layers outside the numbered blocks."""
        by_block = self.multipliers(text)
        return lambda name: by_block.get(self.block_of(name), 1.0)
