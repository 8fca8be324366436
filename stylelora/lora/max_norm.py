"""Max-norm regularization of LoRA modules (kohya's `--scale_weight_norms`): after an optimizer step, every module
whose weight change ΔW = up @ down × alpha/rank has a Frobenius norm above the cap is scaled back to the cap.

Why: sd-scripts offers it against overfitting and for "stability when used with other LoRAs" (its README, 3 Jun.
2023, PR #545; "try from 1.0"): no module's change can grow past the cap, so no module of one adapter dominates a
layer it shares with another. Off unless asked, as in sd-scripts.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from stylelora.lora.inject import lora_layers


@dataclass(frozen=True)
class NormReport:
    """What one pass of the cap did: modules scaled back, and the mean and largest module norm after it."""

    scaled: int
    mean_norm: float
    max_norm: float


def module_norm(layer, adapter_name: str = "default") -> float:
    """‖up @ down‖ × scaling of one peft LoRA layer (Linear or Conv2d), without building ΔW.

    ‖B A‖²_F = Σ (A Aᵀ) ∘ (Bᵀ B): two rank × rank products instead of an out × in matrix per module at every step
    (on SD 1.5's largest modules, 1280 × 5120, the full product would be 6.5 M entries)."""
    down = layer.lora_A[adapter_name].weight.detach().float().flatten(1)  # (rank, in × k × k) for a conv
    up = layer.lora_B[adapter_name].weight.detach().float().flatten(1)  # (out, rank)
    squared = ((down @ down.T) * (up.T @ up)).sum().clamp(min=0)
    return float(squared.sqrt()) * abs(float(layer.scaling[adapter_name]))


def cap_module_norms(models: Iterable[nn.Module], cap: float, adapter_name: str = "default") -> NormReport:
    """Scale every LoRA module of `models` whose ΔW norm is above `cap` back to `cap`, up and down each by the square
    root of the ratio (as sd-scripts does: both factors stay the same size)."""
    import torch

    if not cap > 0:
        raise ValueError(f"the weight-norm cap must be > 0, got {cap}")
    scaled, norms = 0, []
    with torch.no_grad():
        for model in models:
            for _, layer in lora_layers(model, adapter_name):
                norm = module_norm(layer, adapter_name)
                if norm > cap:
                    root = (cap / norm) ** 0.5
                    layer.lora_A[adapter_name].weight.mul_(root)
                    layer.lora_B[adapter_name].weight.mul_(root)
                    scaled, norm = scaled + 1, cap
                norms.append(norm)
    if not norms:
        return NormReport(0, 0.0, 0.0)
    return NormReport(scaled, sum(norms) / len(norms), max(norms))
