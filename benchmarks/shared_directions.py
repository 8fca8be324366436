"""How much two adapter files share the input directions of their LoRA layers (their `lora_down` rows).

A LoRA layer reads its input through `lora_down` (rank r rows). Two adapters trained from the same random start
(the same `--seed`) may keep reading the same directions; adapters trained from different starts read nearly
unrelated ones. For every layer both files have, this prints the cosine of the two `lora_down` matrices and the
overlap of their row spaces (the mean squared cosine of the principal angles: 1 is the same subspace, 0 orthogonal,
about r / in for two random ones), and the mean of each over the layers.

    python benchmarks/shared_directions.py A.safetensors B.safetensors
    python benchmarks/shared_directions.py A.safetensors B.safetensors --layers   # one line per layer too

Figures made with it: docs/results.md, "Adapters from different seeds".
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="a kohya LoRA .safetensors file")
    parser.add_argument("second", help="another, for the same base")
    parser.add_argument("--layers", action="store_true", help="also print one line per layer")
    return parser.parse_args(argv)


def subspace_overlap(down_a, down_b) -> float:
    """Mean squared cosine of the principal angles between the row spaces of two (rank, in) matrices."""
    import torch

    basis_a, _ = torch.linalg.qr(down_a.double().T)
    basis_b, _ = torch.linalg.qr(down_b.double().T)
    return float((basis_a.T @ basis_b).pow(2).sum() / min(basis_a.shape[1], basis_b.shape[1]))


def compare(first: dict, second: dict) -> dict[str, tuple[float, float]]:
    """{module: (cosine of the two lora_down matrices, row-space overlap)} for the modules both files have."""
    import torch

    rows = {}
    for key in sorted(first):
        if not key.endswith(".lora_down.weight") or key not in second:
            continue
        down_a, down_b = first[key].flatten(1), second[key].flatten(1)  # a conv's down reads (in x kh x kw)
        if down_a.shape != down_b.shape:
            continue
        cosine = float(torch.nn.functional.cosine_similarity(down_a.double().flatten(), down_b.double().flatten(), 0))
        rows[key.removesuffix(".lora_down.weight")] = (cosine, subspace_overlap(down_a, down_b))
    return rows


def main(argv=None) -> int:
    from stylelora.lora.io import load_adapter_state

    args = parse_args(argv)
    (first, _), (second, _) = load_adapter_state(args.first), load_adapter_state(args.second)
    rows = compare(first, second)
    if not rows:
        raise SystemExit("the two files share no LoRA layer of the same shape: are they for the same base?")
    if args.layers:
        for module, (cosine, overlap) in rows.items():
            print(f"{module:70s} cosine {cosine:6.3f}  overlap {overlap:5.3f}")
    cosines, overlaps = zip(*rows.values())
    print(f"{len(rows)} layers: mean cosine {statistics.mean(cosines):.3f}, "
          f"mean row-space overlap {statistics.mean(overlaps):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
