"""Cuts an adapter file down by layer, to find which layers make one adapter drown another in a blend.

Writes a copy of a kohya LoRA file with only some of its modules, or some of them scaled, chosen by regular
expressions on the module names (`lora_unet_…_attn2_to_k`). The text encoder's modules are kept unless a pattern
names them. The metadata is copied, so `stylelora evaluate --lora CUT:1` reads the cut file as it reads the original.

    python benchmarks/layer_cut.py ZORB.safetensors --out cut.safetensors --keep-unet attn2_to_[kv]
    python benchmarks/layer_cut.py ZORB.safetensors --out cut.safetensors --drop attn2_to_[kv]
    python benchmarks/layer_cut.py ZORB.safetensors --out cut.safetensors --scale attn2_to_[kv]=0.5

Figures made with it: docs/results.md, "Where the character collides".
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="a kohya LoRA .safetensors file")
    parser.add_argument("--out", required=True, help="the cut file to write")
    parser.add_argument("--keep-unet", help="keep only the UNet modules matching this pattern (text encoder kept)")
    parser.add_argument("--drop", help="drop every module matching this pattern")
    parser.add_argument("--scale", action="append", default=[], metavar="PATTERN=F",
                        help="multiply the lora_up weight of the modules matching PATTERN by F (repeatable)")
    return parser.parse_args(argv)


def cut(tensors: dict, *, keep_unet: str | None = None, drop: str | None = None,
        scale: dict[str, float] | None = None) -> dict:
    """The tensors of the modules kept, with `lora_up` scaled where a scale pattern matches (first match wins)."""
    from stylelora.lora.formats import UNET_PREFIX

    result = {}
    for key, tensor in tensors.items():
        module = key.split(".", 1)[0]
        if keep_unet and module.startswith(UNET_PREFIX) and not re.search(keep_unet, module):
            continue
        if drop and re.search(drop, module):
            continue
        factor = next((f for pattern, f in (scale or {}).items() if re.search(pattern, module)), 1.0)
        result[key] = tensor * factor if factor != 1.0 and key.endswith("lora_up.weight") else tensor
    return result


def main(argv=None) -> int:
    from stylelora.lora.io import load_adapter_state, write_safetensors_atomic

    args = parse_args(argv)
    scale = {}
    for item in args.scale:
        pattern, _, factor = item.rpartition("=")
        if not pattern:
            raise SystemExit(f"--scale takes PATTERN=F, e.g. attn2_to_[kv]=0.5 (got {item!r})")
        scale[pattern] = float(factor)
    tensors, metadata = load_adapter_state(args.adapter)
    kept = cut(tensors, keep_unet=args.keep_unet, drop=args.drop, scale=scale)
    write_safetensors_atomic(args.out, kept, metadata)
    modules = {key.split(".", 1)[0] for key in kept}
    print(f"wrote {args.out}: {len(kept)} of {len(tensors)} tensors, {len(modules)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
