"""Which adapter file at which weight: AdapterSpec, and parsing "FILE[:W[:TE_W]][:lbw=BLOCKS]" (no torch import)."""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stylelora.lora.block_weights import parse_ratios, text_encoder_ratio

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter in a blend: file and weights (UNet, text encoder; te_weight None means the UNet weight), and
    A1111's LoRA Block Weight value as written (`blocks`, e.g. "OUTALL"; stylelora.lora.block_weights): its BASE
    multiplies the text-encoder weight here, its UNet blocks are applied where the base's layout is known."""

    path: Path
    unet_weight: float = 1.0
    te_weight: float | None = None
    blocks: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        for label, weight in (("UNet", self.unet_weight), ("text-encoder", self.te_weight)):
            if weight is not None and not math.isfinite(float(weight)):
                raise ValueError(f"{label} weight of {self.path.name} must be a finite number, got {weight!r}.")
        if self.blocks is not None:
            parse_ratios(self.blocks)  # a bad value fails here, before any model is loaded

    @property
    def text_encoder_weight(self) -> float:
        return float(self.unet_weight if self.te_weight is None else self.te_weight)

    @property
    def name(self) -> str:
        return self.path.stem

    def weight_for(self, component: str) -> float:
        """The weight of a component's layers before any UNet block multiplier: the UNet weight, or the text-encoder
        weight times the block weights' BASE."""
        if component == "unet":
            return float(self.unet_weight)
        return self.text_encoder_weight * (1.0 if self.blocks is None else text_encoder_ratio(self.blocks))

    def with_weights(self, unet_weight: float, te_weight: float | None = None) -> AdapterSpec:
        return AdapterSpec(self.path, unet_weight, te_weight, self.blocks)


def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_lora_arg(text: str) -> AdapterSpec:
    """"FILE[:W[:TE_W]][:lbw=BLOCKS]" -> AdapterSpec. Weights are peeled off the right, so "C:\\x.safetensors:0.5"
    works."""
    head, blocks = text, None
    rest, sep, tail = text.rpartition(":")
    if sep and tail.lower().startswith("lbw="):
        head, blocks = rest, tail[len("lbw="):]
    weights: list[float] = []
    for _ in range(2):
        rest, sep, tail = head.rpartition(":")
        value = _as_number(tail) if sep else None
        if value is None:
            if sep and rest.lower().endswith(WEIGHT_SUFFIXES):
                raise ValueError(
                    f"Bad weight {tail!r} in {text!r}: write FILE[:W[:TE_W]] with numbers, e.g. a.safetensors:0.8, "
                    "and block weights last (a.safetensors:1:lbw=OUTALL)"
                )
            break
        weights.insert(0, value)
        head = rest
    if not head:
        raise ValueError(f"No file in --lora {text!r}: write FILE[:W[:TE_W]], e.g. styles/stripes.safetensors:0.8")
    rest, sep, tail = head.rpartition(":")
    if sep and _as_number(tail) is not None and rest.lower().endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"Too many weights in {text!r}: write FILE[:W[:TE_W]], at most two (the UNet's, then the "
                         "text encoder's), e.g. a.safetensors:0.8:0.5")
    return AdapterSpec(Path(head), *weights, blocks=blocks)


def as_specs(items: Iterable[AdapterSpec | str | os.PathLike]) -> tuple[AdapterSpec, ...]:
    """AdapterSpecs from specs, "FILE[:W[:TE_W]]" strings or paths (weight 1)."""
    specs = []
    for item in items:
        if isinstance(item, AdapterSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(parse_lora_arg(item))
        else:
            specs.append(AdapterSpec(Path(item)))
    return tuple(specs)
