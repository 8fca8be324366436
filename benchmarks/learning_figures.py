"""What the trainer learns on the toy world, measured by the judge: the figures quoted for the trainer and blend issues.

For each style dataset (toy-stripes, toy-pastel, toy-zorb) this trains an adapter with `stylelora train`'s defaults
(wall time measured), then scores it with the judge at weights 0, 0.25, 0.5, 0.75, 1.0 on the plain prompts and the
prompts carrying its trigger (weight 0 is the base itself). Then the blend: stripes:1 + pastel:1 on prompts carrying
both triggers (all_styles_rate = images where the judge finds both), each adapter alone on those stacked prompts
(does it still answer its trigger with the other trigger beside it?), and each weight swept with the other at 1.

    python benchmarks/learning_figures.py                        # train all three, then measure (~25 min on 2 cores)
    python benchmarks/learning_figures.py --reuse                # measure adapters already in --out
    python benchmarks/learning_figures.py --styles stripes --samples 16

Writes <out>/figures.json and prints a table with the targets next to each figure.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGETS = {"stripes": ("stripes_rate", 0.90), "pastel": ("pastel_rate", 0.90), "zorb": ("zorb_rate", 0.80)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "outputs" / "learning"))
    parser.add_argument("--base", default="toy", help="base model to train on and measure (default toy)")
    parser.add_argument("--styles", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--samples", type=int, default=32, help="prompts per prompt set")
    parser.add_argument("--reuse", action="store_true", help="skip training where the adapter already exists")
    parser.add_argument("--train-args", default="", help='extra `stylelora train` flags, e.g. --train-args="--steps 500"')
    return parser.parse_args()


def adapter_path(out: Path, style: str) -> Path:
    return out / style / f"toy-{style}.safetensors"


def train(style: str, out: Path, base: str, extra: list[str]) -> float:
    """Runs the CLI exactly as a user would; returns the wall time in seconds."""
    command = [sys.executable, "-m", "stylelora.cli", "train", str(REPO / "datasets" / f"toy-{style}"),
               "--output", str(out / style), "--output-name", f"toy-{style}", "--base", base, "--overwrite", *extra]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    return time.perf_counter() - start


def measure(pipe, stack, judge, adapters: list[tuple[Path, float]], prompt_sets: tuple[str, ...], samples: int) -> dict:
    from stylelora.lora.spec import AdapterSpec
    from stylelora.toy.evaluate import EvalSettings, evaluate_pipeline

    stack.apply([AdapterSpec(path, weight) for path, weight in adapters if weight != 0.0])
    metrics, _ = evaluate_pipeline(pipe, judge, EvalSettings(samples=samples, prompt_sets=prompt_sets))
    stack.clear()
    return metrics


def style_sweep(pipe, stack, judge, style: str, adapter: Path, samples: int) -> list[dict]:
    rows = []
    for weight in WEIGHTS:
        metrics = measure(pipe, stack, judge, [(adapter, weight)], ("plain", style), samples)
        rows.append({"weight": weight, **{k: metrics[k] for k in ("shape_accuracy", "color_accuracy", f"{style}_rate")},
                     # Where shapes go wrong tells a leak (plain prompts) from an over-strong style (its own prompts).
                     "shape_by_prompt_set": {name: row["shape_accuracy"]
                                             for name, row in metrics["by_prompt_set"].items()}})
        print(f"  {style} w={weight:<4} {rows[-1]}", flush=True)
    return rows


def blend_figures(pipe, stack, judge, stripes: Path, pastel: Path, samples: int) -> dict:
    both = ("stripes+pastel",)
    full = measure(pipe, stack, judge, [(stripes, 1.0), (pastel, 1.0)], both, samples)["by_prompt_set"]["stripes+pastel"]
    print(f"  stripes:1 + pastel:1 {full}", flush=True)
    alone = {}
    for style, adapter in (("stripes", stripes), ("pastel", pastel)):
        row = measure(pipe, stack, judge, [(adapter, 1.0)], both, samples)["by_prompt_set"]["stripes+pastel"]
        alone[style] = row[f"{style}_rate"]
        print(f"  {style}:1 alone on the stacked prompts: {style}_rate {alone[style]}", flush=True)
    sweeps = {}
    for swept, held in (("stripes", pastel), ("pastel", stripes)):
        moving = stripes if swept == "stripes" else pastel
        sweeps[swept] = []
        for weight in WEIGHTS:
            row = measure(pipe, stack, judge, [(moving, weight), (held, 1.0)], both, samples)["by_prompt_set"]["stripes+pastel"]
            sweeps[swept].append({"weight": weight, f"{swept}_rate": row[f"{swept}_rate"]})
            print(f"  sweep {swept} w={weight:<4} (other at 1) {swept}_rate {row[f'{swept}_rate']}", flush=True)
    return {"stripes:1+pastel:1": full, "alone_on_stacked_prompts": alone, "sweeps": sweeps}


def monotonic(values: list[float]) -> bool:
    return all(b >= a for a, b in zip(values, values[1:]))


def report(figures: dict) -> None:
    print("\nstyle    train s  base shape/color  w=1 shape/color  w=1 shape plain/trigger  w=1 rate (target)  monotonic")
    for style, entry in figures["styles"].items():
        key, target = TARGETS[style]
        base, full = entry["sweep"][0], entry["sweep"][-1]
        rates = [row[key] for row in entry["sweep"]]
        seconds = entry.get("train_seconds")
        trained = "reused" if seconds is None else f"{seconds:.0f}"  # --reuse measures an existing adapter
        print(f"{style:8s} {trained:>7}  "
              f"{base['shape_accuracy']:.3f}/{base['color_accuracy']:.3f}       "
              f"{full['shape_accuracy']:.3f}/{full['color_accuracy']:.3f}      "
              f"{_shapes_by_set(full, style):>21}  "
              f"{full[key]:.3f} (≥{target:.2f})      {monotonic(rates)}  {rates}")
    if "blend" in figures:
        blend = figures["blend"]
        print(f"blend stripes:1+pastel:1 both styles {blend['stripes:1+pastel:1']['all_styles_rate']:.3f} (≥0.80); "
              + "; ".join(f"{k} sweep monotonic {monotonic([r[f'{k}_rate'] for r in v])}" for k, v in blend["sweeps"].items()))
        alone = blend.get("alone_on_stacked_prompts")  # absent in figures.json files written before it was measured
        if alone:
            print("each alone on the stacked prompts (both triggers): "
                  + ", ".join(f"{style} rate {rate:.3f}" for style, rate in alone.items()))


def _shapes_by_set(row: dict, style: str) -> str:
    """'plain/trigger' shape accuracy ('-' where a set has no shapes to score: zorb prompts draw the character)."""
    by_set = row.get("shape_by_prompt_set", {})  # absent in figures.json files written before it was recorded
    return "/".join("-" if by_set.get(name) is None else f"{by_set[name]:.3f}" for name in ("plain", style))


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    figures: dict = {"base": args.base, "styles": {}, "samples": args.samples, "train_args": args.train_args}
    for style in args.styles:
        seconds = None
        if not (args.reuse and adapter_path(out, style).exists()):
            seconds = train(style, out, args.base, shlex.split(args.train_args))
        figures["styles"][style] = {"adapter": str(adapter_path(out, style)), "train_seconds": seconds}

    from stylelora.generate.stack import AdapterStack
    from stylelora.models.load import load_base
    from stylelora.toy.judge import load_judge

    pipe, judge = load_base(args.base), load_judge()
    stack = AdapterStack.for_pipe(pipe)
    for style in args.styles:
        figures["styles"][style]["sweep"] = style_sweep(pipe, stack, judge, style, adapter_path(out, style), args.samples)
    if {"stripes", "pastel"} <= set(args.styles):
        figures["blend"] = blend_figures(pipe, stack, judge, adapter_path(out, "stripes"), adapter_path(out, "pastel"),
                                         args.samples)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    report(figures)
    print(f"\nwrote {out / 'figures.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
