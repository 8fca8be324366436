"""Does CFG rescale keep what a blend loses? Each pair in split at several rescale factors φ, side by side.

CFG rescale (diffusers' `guidance_rescale`, ComfyUI's RescaleCFG; Lin et al., arXiv 2305.08891) pulls the guided
prediction's spread back toward the conditional prediction's, which tames the burnt colors of a high guidance
scale. Split loses colors where a texture meets a palette and a character's details beside a soft palette, both
where guidance multiplies the adapters' changes. Per pair and φ this prints both present, each adapter's rate,
shape and color (the toy judge; `stylelora evaluate`'s prompts and seeds; φ = 0 is plain guidance).

    python benchmarks/cfg_rescale.py --adapters-dir outputs/cur --phis 0 0.7 1

Use OMP_NUM_THREADS=1 on a shared machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from blend_quality import add_adapter_arguments, adapter_path, figures_text  # noqa: E402  (the same adapter flags)

PAIRS = ("stripes+pastel", "stripes+zorb", "pastel+zorb")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(parser, REPO / "outputs" / "cur")
    parser.add_argument("--pairs", nargs="+", default=["stripes+pastel", "pastel+zorb"], choices=PAIRS)
    parser.add_argument("--phis", nargs="+", type=float, default=[0.0, 0.7, 1.0], help="rescale factors (0: off)")
    parser.add_argument("--mode", default="split", help="blend mode of the pairs (default split)")
    parser.add_argument("--samples", type=int, default=96, help="prompts per prompt set (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed (stylelora evaluate's)")
    return parser.parse_args(argv)


def pair_row(pipe, judge, args: argparse.Namespace, pair: str, phi: float) -> str:
    from stylelora.toy.evaluate import EvalSettings, build_prompts, draw_blend, score

    files = [str(adapter_path(args, style)) for style in pair.split("+")]
    settings = EvalSettings(samples=args.samples, seed=args.seed, prompt_sets=(pair,), guidance_rescale=phi)
    prompts = build_prompts(args.samples, args.seed, (pair,))
    row = score(prompts, judge.predict(draw_blend(pipe, files, prompts, settings, args.mode)))["by_prompt_set"][pair]
    return f"{pair:<15} φ {phi:<4g} {figures_text(row, pair.split('+'))}"


def main(argv=None) -> int:
    from stylelora.toy.evaluate import load_judged_base

    args = parse_args(argv)
    pipe, judge = load_judged_base(args.base)
    for pair in args.pairs:
        for phi in args.phis:
            print(pair_row(pipe, judge, args, pair, phi), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
