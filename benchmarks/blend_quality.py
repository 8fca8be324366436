"""How well blends keep both adapters, every blend mode side by side in one run (issue 18), scored by the toy judge.

For each pair (stripes+pastel, stripes+zorb, pastel+zorb) on the prompts carrying both triggers:
    blend A:1 + B:1 in each mode   both-present rate, A's rate, B's rate, shape and color fidelity, mean probabilities
    each adapter alone             on the same stacked prompts, and on the prompts carrying only its own trigger
    blend on single-trigger prompts  the same blend on the prompts carrying only A's trigger, then only B's: does each
                                   adapter keep its own look, and does the other one stay off (--no-single: skip)
    weight sweep                   both adapters at w (--sweep), and one at w with the other at 1 (--sweep-one)
and for each adapter alone on its own prompts the weight dial: rate and the judge's mean probability at w = 0..1, and
how far the images themselves have moved from the base's toward the adapter's at w = 1 (`pixel_share`), which tells
whether the images turn over as a switch or the judge does. The dial turns both weights (A1111's <lora:name:w>), the
UNet weight alone (--dial-te-weight 1), the text-encoder weight alone (--dial-unet-weight 1), or the text encoder's
reading alone (--dial-reading: both LoRAs at 1, the prompt's encoding moved w of the way from the base's to the
adapter's).
The goal rows (both >= 0.85; each own rate, shape and color within 0.05 of that adapter alone on its own prompts;
each alone on the stacked prompts >= 0.9, a character >= 0.8) are checked and printed, and on the single-trigger
prompts: the named adapter's rate, shape and color within 0.05 of it alone, the other's style within 0.05 of the base.

    python benchmarks/blend_quality.py --adapters-dir outputs/blend                 # toy-NAME/toy-NAME.safetensors
    python benchmarks/blend_quality.py --adapters-dir outputs/blend --samples 16 --modes sum ties --json out.json

Use OMP_NUM_THREADS=1 on a shared machine: with 2 threads and other jobs running, torch spends its time waiting.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STYLES = ("stripes", "pastel", "zorb")
PAIRS = (("stripes", "pastel"), ("stripes", "zorb"), ("pastel", "zorb"))
DIAL = (0.0, 0.25, 0.5, 0.75, 1.0)
BOTH_GOAL, CLOSE_GOAL = 0.85, 0.05
ALONE_GOAL = {"stripes": 0.9, "pastel": 0.9, "zorb": 0.8}


def add_adapter_arguments(parser: argparse.ArgumentParser, adapters_dir: Path) -> None:
    """--adapters-dir, a file per toy adapter (--stripes, --pastel, --zorb) and --base; read by `adapter_path`."""
    parser.add_argument("--adapters-dir", default=str(adapters_dir),
                        help="folder with toy-stripes/toy-stripes.safetensors etc. (stylelora train's layout)")
    for style in STYLES:
        parser.add_argument(f"--{style}", help=f"the {style} adapter file (default: from --adapters-dir)")
    parser.add_argument("--base", default="toy")


def adapter_path(args: argparse.Namespace, style: str) -> Path:
    return Path(getattr(args, style) or Path(args.adapters_dir) / f"toy-{style}" / f"toy-{style}.safetensors")


def figures_text(row: dict, styles: list[str]) -> str:
    """'both 0.79 (1.00 / 0.79), shape 0.75, color 0.95' for a prompt set's scores ('rate …' for one style)."""
    rates = " / ".join(f"{row[f'{style}_rate']:.2f}" for style in styles)
    parts = [f"both {row['all_styles_rate']:.2f} ({rates})" if len(styles) > 1 else f"rate {rates}"] if styles else []
    if row.get("shape_accuracy") is not None:
        parts.append(f"shape {row['shape_accuracy']:.2f}")
    return ", ".join([*parts, f"color {row['color_accuracy']:.2f}"])


def parse_args(argv=None) -> argparse.Namespace:
    from stylelora.lora.blend_modes import MODES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(parser, REPO / "outputs" / "blend")
    parser.add_argument("--samples", type=int, default=96, help="prompts per prompt set (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed (stylelora evaluate's)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--pairs", nargs="*", default=["+".join(p) for p in PAIRS],
                        choices=["+".join(p) for p in PAIRS])
    parser.add_argument("--sweep", default="0.25,0.5,0.75", help="both adapters at each of these weights ('' = none)")
    parser.add_argument("--sweep-one", default="0.5", help="one adapter at each weight, the other at 1 ('' = none)")
    parser.add_argument("--no-dial", action="store_true", help="skip the single-adapter weight dial")
    parser.add_argument("--no-single", action="store_true",
                        help="skip the blends on the prompts carrying only one of the two triggers")
    parser.add_argument("--dial-te-weight", type=float, default=None,
                        help="hold the text-encoder weight here in the dial and turn only the UNet weight "
                             "(default: both, as A1111's <lora:name:w>)")
    parser.add_argument("--dial-unet-weight", type=float, default=None,
                        help="hold the UNet weight here in the dial and turn only the text-encoder weight")
    parser.add_argument("--dial-reading", action="store_true",
                        help="in the dial, hold both LoRAs at 1 and move the text encoder's output w of the way from "
                             "the base's reading of the prompt to the adapter's; the sweeps' weights likewise "
                             "(stylelora's --dial reading)")
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=list(STYLES),
                        help="adapters measured alone (and in the dial) besides those of --pairs")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    held = [flag for flag, value in (("--dial-te-weight", args.dial_te_weight),
                                     ("--dial-unet-weight", args.dial_unet_weight)) if value is not None]
    if args.dial_reading and held:
        parser.error(f"--dial-reading holds both weights at 1: leave out {held[0]}")
    if len(held) == 2:
        parser.error("with both weights held nothing turns: give --dial-te-weight or --dial-unet-weight, not both")
    return args


def _weights(text: str) -> list[float]:
    return [float(w) for w in text.split(",") if w.strip()]


class Scorer:
    """Generates a prompt set with a blend fused and scores it; prompts and seeds are stylelora evaluate's."""

    def __init__(self, base: str, samples: int, seed: int):
        from stylelora.toy.evaluate import load_judged_base

        self.pipe, self.judge = load_judged_base(base)
        self.samples, self.seed = samples, seed
        self.images = 0
        self.pixels: dict = {}  # prompt set: the last call's images as one float array (images, height, width, 3)

    def __call__(self, adapters: list[tuple], prompt_sets: tuple[str, ...], mode: str = "sum",
                 dial: str | None = None) -> dict:
        """{prompt set: row} with the rates, accuracies and the judge's mean probability per style head.
        adapters: (path, weight) or (path, UNet weight, text-encoder weight); dial: what the weights turn
        (stylelora.generate.reading_dial; None: the LoRA weights, as A1111)."""
        from stylelora.lora.spec import AdapterSpec
        from stylelora.toy.evaluate import EvalSettings, build_prompts, draw_blend, score

        settings = EvalSettings(samples=self.samples, seed=self.seed, prompt_sets=prompt_sets)
        prompts = build_prompts(settings.samples, settings.seed, settings.prompt_sets)
        specs = [AdapterSpec(*adapter) for adapter in adapters if any(adapter[1:])]
        images = draw_blend(self.pipe, specs, prompts, settings, mode, dial)
        predictions = self.judge.predict(images)
        self.images += len(prompts)
        self.pixels = {name: np.stack([np.asarray(image, dtype=np.float32) / 255 for image, prompt in
                                       zip(images, prompts) if prompt.prompt_set == name]) for name in prompt_sets}
        rows = score(prompts, predictions)["by_prompt_set"]
        for name, row in rows.items():
            chosen = [pred for prompt, pred in zip(prompts, predictions) if prompt.prompt_set == name]
            for style in STYLES:
                row[f"{style}_prob"] = round(sum(p[f"{style}_prob"] for p in chosen) / len(chosen), 4)
        return rows


def run(args: argparse.Namespace) -> dict:
    paths = {style: adapter_path(args, style) for style in STYLES}
    pairs = [tuple(p.split("+")) for p in args.pairs]
    used = sorted({s for pair in pairs for s in pair} | set(args.styles if not pairs else ()), key=STYLES.index)
    missing = [str(paths[s]) for s in used if not paths[s].is_file()]
    if missing:
        raise SystemExit(f"adapter files not found: {', '.join(missing)} (train them with `stylelora train`)")
    scorer = Scorer(args.base, args.samples, args.seed)
    start = time.perf_counter()
    figures: dict = {"samples": args.samples, "seed": args.seed, "modes": args.modes,
                     "dial_te_weight": args.dial_te_weight, "dial_unet_weight": args.dial_unet_weight,
                     "dial_reading": args.dial_reading,
                     "adapters": {s: str(paths[s]) for s in used},
                     "alone": {}, "dial": {}, "pairs": {}}
    pair_sets = tuple("+".join(p) for p in pairs)

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    base = scorer([], tuple(used) + pair_sets)
    figures["base"] = base
    base_pixels = scorer.pixels
    for style in used:
        own_sets = (style,) + tuple(s for s in pair_sets if style in s.split("+"))
        figures["alone"][style] = scorer([(paths[style], 1.0)], own_sets)
        full_pixels = scorer.pixels[style]
        log(f"{style}:1 alone " + ", ".join(f"{k} {v[f'{style}_rate']}" for k, v in figures["alone"][style].items()))
        if not args.no_dial:
            dial = []
            for weight in DIAL:
                unet = weight if args.dial_unet_weight is None else args.dial_unet_weight
                te = weight if args.dial_te_weight is None else args.dial_te_weight
                if args.dial_reading and weight < 1:  # FILE:1:W, the UNet at 1 even at w = 0: the reading alone
                    row = scorer([(paths[style], 1.0, weight)], (style,), dial="reading")[style]
                    pixels = scorer.pixels[style]
                elif unet == te == 0:
                    row, pixels = base[style], base_pixels[style]
                elif unet == te == 1:
                    row, pixels = figures["alone"][style][style], full_pixels
                else:
                    row, pixels = scorer([(paths[style], unet, te)], (style,))[style], scorer.pixels[style]
                dial.append({"weight": weight, "rate": row[f"{style}_rate"], "prob": row[f"{style}_prob"],
                             "shape": row["shape_accuracy"], "color": row["color_accuracy"],
                             **pixel_share(base_pixels[style], pixels, full_pixels)})
            figures["dial"][style] = dial
            log(f"{style} dial " + ", ".join(f"w={d['weight']}: {d['rate']}/{d['prob']}" for d in dial))
    sweep_dial = "reading" if args.dial_reading else None  # the sweeps' FILE:W under the same dial as the dial's
    for a, b in pairs:
        name = f"{a}+{b}"
        entry = figures["pairs"][name] = {"modes": {}}
        for mode in args.modes:
            rows = scorer([(paths[a], 1.0), (paths[b], 1.0)], (name,) if args.no_single else (name, a, b), mode)
            result = entry["modes"][mode] = {"1:1": rows[name], "single": {s: rows[s] for s in (a, b) if s in rows}}
            log(f"{name} {mode} 1:1 {_short(result['1:1'], a, b)}")
            for style, row in result["single"].items():
                log(f"{name} {mode} 1:1 on {style}'s prompts: {_short(row, a, b)}")
            result["sweep_both"] = []
            for weight in _weights(args.sweep):
                row = scorer([(paths[a], weight), (paths[b], weight)], (name,), mode, sweep_dial)[name]
                result["sweep_both"].append({"weight": weight, **row})
                log(f"{name} {mode} both at {weight}: {_short(row, a, b)}")
            result["sweep_one"] = []
            for weight in _weights(args.sweep_one):
                for moving, held in ((a, b), (b, a)):
                    row = scorer([(paths[moving], weight), (paths[held], 1.0)], (name,), mode, sweep_dial)[name]
                    result["sweep_one"].append({"moving": moving, "weight": weight, **row})
                    log(f"{name} {mode} {moving} at {weight}, {held} at 1: {_short(row, a, b)}")
    figures["goals"] = goals(figures, pairs)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    figures["images"] = scorer.images
    return figures


def pixel_share(base, partial, full) -> dict:
    """How far the images at a partial weight have moved from the base's images toward the full weight's, per image
    the projection of (partial - base) on (full - base), so 0 is the base's image and 1 the adapter's at w = 1:
    "pixels" is its median over the images, "closer" the share of images nearer the full weight's than the base's.
    The judge answers yes or no; this says whether the image itself turned over at once or moved step by step.
    Images the adapter does not change at all (full = base) are left out."""
    change = (full - base).reshape(len(base), -1)
    moved = (partial - base).reshape(len(base), -1)
    size = (change * change).sum(1)
    kept = size > 0
    if not kept.any():
        return {"pixels": None, "closer": None}
    share = (moved * change).sum(1)[kept] / size[kept]
    to_full = ((partial - full) ** 2).reshape(len(base), -1).sum(1)[kept]
    return {"pixels": round(float(np.median(share)), 3),
            "closer": round(float((to_full < (moved * moved).sum(1)[kept]).mean()), 3)}


def _short(row: dict, a: str, b: str) -> str:
    return (f"both {row.get('all_styles_rate', '-')} {a} {row[f'{a}_rate']} {b} {row[f'{b}_rate']} "
            f"shape {row['shape_accuracy']} color {row['color_accuracy']}")


def goals(figures: dict, pairs) -> dict:
    """Per pair and mode: the issue's goal rows, each with its figures and met/not met."""
    out = {}
    for a, b in pairs:
        name = f"{a}+{b}"
        for mode, result in figures["pairs"][name]["modes"].items():
            row, checks = result["1:1"], {}
            checks["both >= 0.85"] = (row["all_styles_rate"], row["all_styles_rate"] >= BOTH_GOAL)
            for style in (a, b):
                alone = figures["alone"][style][style]
                diff = row[f"{style}_rate"] - alone[f"{style}_rate"]
                checks[f"{style} rate within 0.05 of alone"] = (round(diff, 4), diff >= -CLOSE_GOAL)
                for key in ("shape_accuracy", "color_accuracy"):
                    if row[key] is not None and alone[key] is not None:
                        diff = row[key] - alone[key]
                        label = f"{key.split('_')[0]} within 0.05 of {style} alone"
                        checks[label] = (round(diff, 4), diff >= -CLOSE_GOAL)
            out[f"{name} {mode}"] = checks
            if result.get("single"):
                out[f"{name} {mode} on single-trigger prompts"] = single_trigger_checks(figures, result["single"], a, b)
    for style, rows in figures["alone"].items():
        for prompt_set, row in rows.items():
            if "+" in prompt_set:
                rate = row[f"{style}_rate"]
                out.setdefault("alone on stacked prompts", {})[f"{style} on {prompt_set} >= {ALONE_GOAL[style]}"] = (
                    rate, rate >= ALONE_GOAL[style])
    return out


def single_trigger_checks(figures: dict, single: dict, a: str, b: str) -> dict:
    """The blend on prompts naming one adapter: that adapter as alone (within 0.05), the other as the base (its style
    on at most 0.05 more of the images than the base draws it)."""
    checks = {}
    for style, row in single.items():
        other = b if style == a else a
        alone = figures["alone"][style][style]
        for key in (f"{style}_rate", "shape_accuracy", "color_accuracy"):
            if row[key] is not None and alone[key] is not None:
                diff = round(row[key] - alone[key], 4)  # rounded: 0.97 - 1.02 must read as -0.05
                label = "rate" if key.endswith("_rate") else key.split("_")[0]
                checks[f"{label} on {style} prompts within 0.05 of {style} alone"] = (diff, diff >= -CLOSE_GOAL)
        leak = round(row[f"{other}_rate"] - figures["base"][style][f"{other}_rate"], 4)
        checks[f"{other} off on {style} prompts (vs base)"] = (leak, leak <= CLOSE_GOAL)
    return checks


def report(figures: dict) -> None:
    print(f"\nblend quality: {figures['samples']} prompts per set, seed {figures['seed']}, "
          f"{figures['images']} images, {figures['seconds']:.0f} s")
    print("\nadapter alone (w=1): own rate / shape / color on its own prompts; own rate on each stacked set")
    for style, rows in figures["alone"].items():
        own = rows[style]
        stacked = ", ".join(f"{k} {v[f'{style}_rate']:.3f}" for k, v in rows.items() if "+" in k)
        print(f"  {style:8s} {own[f'{style}_rate']:.3f} / {_fmt(own['shape_accuracy'])} / "
              f"{_fmt(own['color_accuracy'])}; stacked: {stacked}")
    if figures["dial"]:
        held, held_unet = figures["dial_te_weight"], figures.get("dial_unet_weight")
        turned = ("(UNet and text encoder at w)" if held is None else f"(UNet at w, text encoder held at {held:g})")
        if held_unet is not None:
            turned = f"(text encoder at w, UNet held at {held_unet:g})"
        if figures.get("dial_reading"):
            turned = "(both LoRAs at 1, the text encoder's reading moved w of the way from the base's)"
        print("\nweight dial, adapter alone on its own prompts: rate / judge mean probability " + turned)
        print("  " + " " * 8 + "".join(f"  w={d:<11}" for d in DIAL))
        for style, dial in figures["dial"].items():
            print(f"  {style:8s}" + "".join(f"  {d['rate']:.2f} / {d['prob']:.3f} " for d in dial))
        print("the images' way from the base's to the adapter's at w = 1 (median; share nearer the adapter's)")
        for style, dial in figures["dial"].items():
            print(f"  {style:8s}" + "".join(f"  {_fmt(d['pixels'])} ({_fmt(d['closer'])})" for d in dial))
    print("\npair            mode    both   rate A  rate B  shape  color | both-at-w sweep: both (A/B) ...")
    for name, entry in figures["pairs"].items():
        a, b = name.split("+")
        for mode, result in entry["modes"].items():
            row = result["1:1"]
            sweep = "  ".join(f"w{s['weight']}: {s['all_styles_rate']:.2f} ({s[f'{a}_rate']:.2f}/{s[f'{b}_rate']:.2f})"
                              for s in result["sweep_both"])
            print(f"{name:15s} {mode:7s} {row['all_styles_rate']:.3f}  {row[f'{a}_rate']:.3f}   "
                  f"{row[f'{b}_rate']:.3f}   {_fmt(row['shape_accuracy'])}  {_fmt(row['color_accuracy'])} | {sweep}")
            for s in result["sweep_one"]:
                print(f"{'':15s} {'':7s} {s['moving']} at {s['weight']}, other at 1: both {s['all_styles_rate']:.3f} "
                      f"({s[f'{a}_rate']:.2f}/{s[f'{b}_rate']:.2f}); mean prob {a} {s[f'{a}_prob']:.3f} "
                      f"{b} {s[f'{b}_prob']:.3f}")
    singles = [(name, mode, result["single"]) for name, entry in figures["pairs"].items()
               for mode, result in entry["modes"].items() if result.get("single")]
    if singles:
        print("\nblend 1:1 on single-trigger prompts: named adapter's rate / shape / color (alone), other's rate")
        for name, mode, single in singles:
            a, b = name.split("+")
            for style, row in single.items():
                alone, other = figures["alone"][style][style], b if style == a else a
                print(f"{name:15s} {mode:7s} {style:8s} {row[f'{style}_rate']:.3f} / {_fmt(row['shape_accuracy'])} / "
                      f"{_fmt(row['color_accuracy'])} ({alone[f'{style}_rate']:.3f} / {_fmt(alone['shape_accuracy'])} / "
                      f"{_fmt(alone['color_accuracy'])}), {other} {row[f'{other}_rate']:.3f}")
    print("\ngoals (figure, met)")
    for group, checks in figures["goals"].items():
        failed = [f"{k} ({v[0]})" for k, v in checks.items() if not v[1]]
        print(f"  {group}: " + ("all met" if not failed else "NOT met: " + "; ".join(failed)))


def _fmt(value) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    figures = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    report(figures)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
