"""Owns kohya's LoRA dropouts while a run trains: --network-dropout (sd-scripts' --network_dropout: elements of what
each down factor outputs), --rank-dropout (network_args rank_dropout: whole ranks, per sample) and --module-dropout
(network_args module_dropout: a whole module, per forward pass), as forward hooks on peft's down factors.

Why hooks and not peft's own `lora_dropout`: peft drops the layer's input before the down factor, which is another
regularizer than sd-scripts' dropout after it. The hooks leave peft's layers as they are and act only while the
module trains, so sample grids, the saved file and every loader see the plain LoRA.

The draws come from torch's global generator, as peft's and sd-scripts' dropouts do: gradient checkpointing replays
a block's forward pass with that generator's state (torch.utils.checkpoint's preserve_rng_state), so the replay
drops what the first pass dropped, and every checkpoint saves the state, so a resume stays exact.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from stylelora.lora.inject import lora_layers

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from stylelora.config import NetworkConfig


def dropped(output: torch.Tensor, *, neuron: float, rank: float, module: float, conv: bool) -> torch.Tensor:
    """What a down factor passes on to its up factor while training: all of it zeroed with probability `module`;
    otherwise each element zeroed with probability `neuron` and each rank of each sample with probability `rank`,
    the rest scaled by 1 / (1 - p) so that the expected output stays the same."""
    if module and torch.rand(1).item() < module:
        return output * 0  # not torch.zeros_like: the graph still reaches the down factor, as in sd-scripts
    if neuron:
        output = torch.nn.functional.dropout(output, p=neuron, training=True)
    if rank:
        ranks = output.shape[1] if conv else output.shape[-1]
        kept = (torch.rand(output.shape[0], ranks, device=output.device) > rank).to(output.dtype)
        shape = (output.shape[0], ranks, *[1] * (output.dim() - 2)) if conv else \
            (output.shape[0], *[1] * (output.dim() - 2), ranks)
        output = output * kept.view(shape) / (1 - rank)
    return output


def add_lora_dropout(models: list[nn.Module | None], network: NetworkConfig,
                     adapter_name: str = "default") -> list[RemovableHandle]:
    """Hook every LoRA down factor of `models` (the UNet and the trained text encoders) with the run's dropouts;
    nothing when all three are 0. The handles remove the hooks."""
    rates = {"neuron": network.dropout, "rank": network.rank_dropout, "module": network.module_dropout}
    if not any(rates.values()):
        return []
    handles = []
    for model in models:
        if model is None:
            continue
        for _, layer in lora_layers(model, adapter_name):
            down = layer.lora_A[adapter_name]
            conv = isinstance(down, nn.Conv2d)

            def hook(factor, inputs, output, conv=conv):
                return dropped(output, conv=conv, **rates) if factor.training else None

            handles.append(down.register_forward_hook(hook))
    return handles
