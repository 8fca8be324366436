"""Does an adapter answer its trigger, or the wording of its captions? Each prompt as evaluated, then reworded.

Every bundled toy caption reads `TRIGGER, a COLOR SUBJECT on a BACKGROUND background`, and so do the prompts
`stylelora evaluate` scores. A user types other wordings. This script draws each prompt set twice, as evaluated
and with ` on a … background` cut off (`zorb, a red zorb`): the base on the plain prompts, each adapter alone on its
own prompts, each pair in split on the prompts carrying both triggers. `--reword OLD=NEW` adds a wording (A1111's
emphasis, `zorb=(zorb:1.2)`, is read as `stylelora generate` reads it). Per wording it prints both present, each
adapter's rate, shape and color (the toy judge; `stylelora evaluate`'s prompts and seeds).

    python benchmarks/prompt_wording.py --adapters-dir outputs/cur                     # the character's sets
    python benchmarks/prompt_wording.py --adapters-dir outputs/cur --zorb FILE --sets zorb pastel+zorb
    python benchmarks/prompt_wording.py --adapters-dir outputs/cur --sets stripes pastel stripes+pastel --mode sum
    python benchmarks/prompt_wording.py --adapters-dir outputs/cur --sets pastel+zorb --reword 'zorb=(zorb:1.2)'

Use OMP_NUM_THREADS=1 on a shared machine.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from blend_quality import add_adapter_arguments, adapter_path, figures_text  # noqa: E402  (the same adapter flags)

SETS = ("plain", "stripes", "pastel", "zorb", "stripes+pastel", "stripes+zorb", "pastel+zorb")  # plain: the base
BACKGROUND_PHRASE = " on a "  # every evaluation prompt ends "… on a BACKGROUND background"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(parser, REPO / "outputs" / "cur")
    parser.add_argument("--sets", nargs="+", default=["zorb", "stripes+zorb", "pastel+zorb"], choices=SETS)
    parser.add_argument("--mode", default="split", help="blend mode of the pairs (default split)")
    parser.add_argument("--samples", type=int, default=96, help="prompts per prompt set (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed (stylelora evaluate's)")
    parser.add_argument("--reword", action="append", default=[], metavar="OLD=NEW",
                        help="one more wording: the first OLD of each prompt made NEW, e.g. 'zorb=(zorb:1.2)' for "
                             "A1111's emphasis on the trigger (repeatable: one wording each)")
    args = parser.parse_args(argv)
    if any("=" not in rule or not rule.split("=", 1)[0] for rule in args.reword):
        parser.error("--reword takes OLD=NEW, e.g. --reword 'zorb=(zorb:1.2)'")
    return args


def reworded(prompt: str, rule: str) -> str:
    """`prompt` with the first OLD of the rule OLD=NEW made NEW."""
    old, new = rule.split("=", 1)
    return prompt.replace(old, new, 1)


def without_background(prompt: str) -> str:
    """`zorb, a red zorb on a beige background` → `zorb, a red zorb`."""
    return prompt.split(BACKGROUND_PHRASE)[0]


def wording_rows(pipe, judge, args: argparse.Namespace, prompt_set: str) -> list[dict]:
    """One row per wording: the prompt set's figures for its adapters (one, or a pair in args.mode)."""
    from stylelora.toy.evaluate import EvalSettings, build_prompts, draw_blend, score

    files = [] if prompt_set == "plain" else [str(adapter_path(args, style)) for style in prompt_set.split("+")]
    settings = EvalSettings(samples=args.samples, seed=args.seed, prompt_sets=(prompt_set,))
    prompts = build_prompts(args.samples, args.seed, (prompt_set,))
    wordings = [("as evaluated", prompts),
                ("without the background", [replace(p, prompt=without_background(p.prompt)) for p in prompts])]
    wordings += [(rule, [replace(p, prompt=reworded(p.prompt, rule)) for p in prompts]) for rule in args.reword]
    rows = []
    for wording, drawn in wordings:
        images = draw_blend(pipe, files, drawn, settings, args.mode if len(files) > 1 else None)
        figures = score(drawn, judge.predict(images))["by_prompt_set"][prompt_set]
        rows.append({"set": prompt_set, "wording": wording, "example": drawn[0].prompt, **figures})
    return rows


def format_row(row: dict) -> str:
    styles = [] if row["set"] == "plain" else row["set"].split("+")
    return f"{row['set']:<15} {row['wording']:<23} {figures_text(row, styles)}   e.g. '{row['example']}'"


def main(argv=None) -> int:
    from stylelora.toy.evaluate import load_judged_base

    args = parse_args(argv)
    pipe, judge = load_judged_base(args.base)
    for prompt_set in args.sets:
        for row in wording_rows(pipe, judge, args, prompt_set):
            print(format_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
