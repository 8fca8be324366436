"""What `--scale-weight-norms` (stylelora.lora.max_norm) adds to a training step on a real architecture.

Every optimizer step, the cap measures every LoRA module's ΔW norm. This builds the UNet of the published config
(stylelora/models/configs/FAMILY/unet.json, weights left unset: only the LoRA weights are read), adds LoRA at the
kohya targets, and times one pass of the cap over it, side by side in one run with the same norms taken by building
each ΔW in full (peft's get_delta_weight), median of --repeats passes each. Compare with the training step's
seconds in docs/benchmarks.md (SD 1.5 on CPU: 7.2 s per step at the defaults).

    python benchmarks/max_norm_cost.py --family sd15
    python benchmarks/max_norm_cost.py --family sdxl --rank 32
    python benchmarks/max_norm_cost.py --family sdxl --device cuda

Figures: docs/results.md, "Max-norm regularization".
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "stylelora" / "models" / "configs"


def lora_unet(family: str, rank: int, device: str):
    """The family's UNet with LoRA at the kohya targets, its LoRA weights random (the base's left unset)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from stylelora.lora.inject import add_lora, lora_parameters

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / family / "unet.json").read_text()))
    add_lora(unet, None, rank=rank, alpha=float(rank))
    unet.to_empty(device=device)  # memory for every weight, none of it written: only the LoRA weights are read
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.normal_(std=0.02)
    return unet


def timed(run, repeats: int, device: str) -> float:
    """Median seconds of `repeats` calls of run()."""
    import torch

    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from stylelora.lora.inject import lora_layers
    from stylelora.lora.max_norm import cap_module_norms

    unet = lora_unet(args.family, args.rank, args.device)
    layers = [layer for _, layer in lora_layers(unet, "default")]
    cap = timed(lambda: cap_module_norms([unet], float("inf")), args.repeats, args.device)

    def full_products():
        with torch.no_grad():
            return [float(layer.get_delta_weight("default").norm()) for layer in layers]

    full = timed(full_products, args.repeats, args.device)
    print(f"{args.family}: {len(layers)} UNet LoRA modules at rank {args.rank} on {args.device}: one pass of the "
          f"cap {cap * 1000:.1f} ms; each ΔW built in full {full * 1000:.1f} ms ({full / cap:.1f}×)")


if __name__ == "__main__":
    main()
