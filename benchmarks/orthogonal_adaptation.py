"""Orthogonal adaptation (Po et al., arXiv 2311.18822) on `stylelora train`: does it make adapters blend better?

Each LoRA down projection starts as `rank` rows of a random orthonormal basis of its layer's input. Every adapter
shares the basis (seeded by the module's path) and draws its own rows (seeded by --key), so two adapters trained
apart read near-orthogonal directions of each input. With `--rows fixed` (the paper's) the rows stay and only the
up projections train; with `--rows learned` they are a starting point. Everything after `--` is `stylelora train`'s
arguments; score the adapters with benchmarks/blend_quality.py (docs/results.md, "Orthogonal adaptation"):

    for name in stripes pastel zorb; do python benchmarks/orthogonal_adaptation.py --rows fixed --key $name -- \\
        datasets/toy-$name --no-samples --output outputs/ortho/toy-$name; done
    python benchmarks/blend_quality.py --adapters-dir outputs/ortho --modes sum split --sweep '' --sweep-one '' \\
        --no-dial --no-single
"""
from __future__ import annotations

import argparse
import math
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def orthogonal_attach(original, key: str, fixed: bool, parts: tuple[str, ...] = ("unet", "text")):
    """`stylelora.lora.inject.attach_adapter` with each Linear LoRA's down projection set to orthonormal rows, in
    the UNet and the text encoders, or in the `parts` named."""
    import torch
    from transformers import PreTrainedModel

    from stylelora.lora import inject

    def attach(model, config, adapter_name="default"):
        params = original(model, config, adapter_name)
        if ("text" if isinstance(model, PreTrainedModel) else "unet") not in parts:
            return params
        frozen = set()
        for path, layer in inject.lora_layers(model, adapter_name):
            down = layer.lora_A[adapter_name]
            if not isinstance(down, torch.nn.Linear):
                continue  # conv LoRA (locon) keeps its usual start
            rank, width = down.weight.shape
            basis = torch.Generator().manual_seed(zlib.crc32(f"{path}:{width}".encode()))
            q, _ = torch.linalg.qr(torch.randn(width, width, generator=basis, dtype=torch.float64))
            rows = torch.randperm(width, generator=torch.Generator().manual_seed(zlib.crc32(f"{key}:{path}".encode())))
            # Rows of norm 1/sqrt(3), the norm of peft's default (kaiming-uniform) rows, so the step sizes match.
            down.weight.data = (q.T[rows[:rank]] / math.sqrt(3)).to(down.weight.dtype)
            if fixed:
                frozen.add(id(down.weight))
        # peft turns requires_grad back on when adapters are switched (base preservation does), so fixed rows
        # are kept out of the optimizer instead.
        return [param for param in params if id(param) not in frozen]

    return attach


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", choices=["fixed", "learned"], default="fixed")
    parser.add_argument("--key", help="what picks this adapter's rows (default: the --output folder's name)")
    parser.add_argument("--parts", nargs="+", choices=["unet", "text"], default=["unet", "text"],
                        help="where the rows go: the UNet, the text encoders, or both (default)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then stylelora train's arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    key = args.key or (Path(train_args[train_args.index("--output") + 1]).name if "--output" in train_args else None)
    if not key:
        parser.error("give --key, or --output among the train arguments")

    from stylelora.cli import main as stylelora
    from stylelora.lora import inject

    inject.attach_adapter = orthogonal_attach(inject.attach_adapter, key, args.rows == "fixed", tuple(args.parts))
    return stylelora(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main())
