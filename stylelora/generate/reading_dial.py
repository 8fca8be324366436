"""The weight dial: what an adapter's weight turns at generation, its LoRA weights (A1111's way) or its reading.

Why: adapters trained with base preservation act as switches under A1111's weight. Scaled in its weights, the
text-encoder LoRA moves the reading of the prompt far less than w of the way until w nears 1, and the UNet's LoRA
below 1 does not draw the trigger's look, so a style or character at 0.5 is the base's image. With both LoRAs whole
and the text encoder's output moved w of the way from the base's reading to the adapter's (base + w * (adapter -
base), as a prompt blend moves between two prompts), a texture style and a character come in gradually: at w = 0.5
the toy judge finds them on 0.35-0.69 of the images, and the images sit about halfway (docs/results.md, "The reading
as the dial"). A palette style stays a switch either way.

Under the "reading" dial, `FILE:W` moves the reading W of the way with the UNet's LoRA at 1 (off at W = 0), and
`FILE:U:T` sets the UNet weight U and moves the reading T of the way. The stack runs the text encoder once per
adapter with its LoRA added (stylelora.generate.split_attention.install_text_encoder), so no file can hold it.
"""
from __future__ import annotations

from collections.abc import Sequence

from stylelora.lora.spec import AdapterSpec

DIALS = ("weights", "reading")
DEFAULT_DIAL = "weights"  # A1111's <lora:name:w>: what every other tool does with the same file


class DialError(ValueError):
    """An unknown dial, or a mix the reading dial moves asked to become a file; the message says what to do."""


def check_dial(dial: str | None) -> str:
    """The dial's name (None: the default), or DialError listing the dials."""
    dial = DEFAULT_DIAL if dial is None else str(dial).strip().lower()
    if dial not in DIALS:
        raise DialError(f"Unknown weight dial {dial!r}: use one of {', '.join(DIALS)}.")
    return dial


def dial_help() -> str:
    return (f"what a weight turns: {' | '.join(DIALS)} (default {DEFAULT_DIAL}, A1111's; reading: the LoRAs stay "
            "whole and the weight moves the prompt's reading, so a texture or character comes in gradually)")


def fused_spec(spec: AdapterSpec) -> AdapterSpec:
    """The weights the stack fuses under the reading dial: the UNet's LoRA at 1 (off at weight 0), or at the UNet
    weight given apart (FILE:U:T); the text encoder's LoRA whole, its reading moved by `reading_share`."""
    if spec.te_weight is None:
        unet = 0.0 if spec.unet_weight == 0 else 1.0
    else:
        unet = float(spec.unet_weight)
    return spec.with_weights(unet, 1.0 if unet or spec.text_encoder_weight else 0.0)


def check_savable(specs: Sequence[AdapterSpec], dial: str | None) -> None:
    """Nothing, if a LoRA file holds what these weights draw under `dial`; else DialError saying what to do. A file
    holds weights, and the reading dial draws the same as the weights only where every text-encoder weight is 0 or 1
    (and a single weight, FILE:W, is 0 or 1)."""
    if check_dial(dial) != "reading":
        return
    moved = [spec.path.name for spec in specs if spec.text_encoder_weight not in (0, 1)
             or (spec.te_weight is None and spec.unet_weight not in (0, 1))]
    if moved:
        raise DialError(f"The reading dial moves the text encoder's reading of the prompt ({', '.join(moved)}), "
                        "which no LoRA file can hold: set the Weight dial to weights to save the mix as A1111 draws "
                        "it, or set those text-encoder weights to 0 or 1.")


def reading_share(spec: AdapterSpec) -> float:
    """How far the adapter's reading moves from the base's under the reading dial: its text-encoder weight."""
    return spec.text_encoder_weight
