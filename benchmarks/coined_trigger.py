"""A known toy style under a coined trigger: how much of a blend rests on the trigger being one token?

The toy tokenizer learned its vocabulary from the bundled captions, so `stripestyle`, `pastelstyle` and `zorb` are
one token each, while the trigger a user coins (`chalkstyle`: c h a l k style) reaches the text encoder as
fragments, as most triggers do on a real CLIP tokenizer. This script retriggers a bundled dataset (the same images,
every caption's trigger replaced), so an adapter of a known style can be trained under a coined trigger and judged
by the shipped judge, and scores it the way the issue judges blends:

    python benchmarks/coined_trigger.py dataset --style pastel --trigger chalkstyle --out outputs/coined
    stylelora train outputs/coined/toy-pastel-chalkstyle --no-samples --output outputs/coined/run/toy-pastel
    python benchmarks/coined_trigger.py score \\
        --adapter outputs/coined/run/toy-pastel/toy-pastel-chalkstyle.safetensors --style pastel \\
        --trigger chalkstyle --adapters-dir outputs/cur --others stripes zorb

`score` prints, for the coined adapter: its rate, shape and color on its own prompts; for each pair with another
adapter (96 prompts carrying both triggers, the known pair's order with the coined trigger in place of the style's,
both at 1): each adapter alone on them and the blend in each mode (both present, each rate, shape, color).

`words` asks where an adapter alone stops answering its trigger: its own prompts with words typed before the trigger
(or after it, with a leading `+`), each scored as the adapter's rate, shape and color and the tokens before the trigger:

    python benchmarks/coined_trigger.py words --adapter outputs/cur/toy-pastel/toy-pastel.safetensors \
        --style pastel --words '' 'inkstyle, ' 'ange, low, are, ' '+inkstyle, '
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from stylelora.toy.evaluate import STYLES as KNOWN  # stripes, pastel, zorb: light, no torch

REPO = Path(__file__).resolve().parents[1]


def write_dataset(style: str, trigger: str, out: Path) -> Path:
    """out/toy-STYLE-TRIGGER/10_TRIGGER/: the bundled dataset's images, each caption's trigger replaced."""
    from stylelora.toy.world import STYLE_TRIGGERS

    source = next((REPO / "datasets" / f"toy-{style}").glob("*_*"))
    repeats = source.name.split("_", 1)[0]
    final, tmp = out / f"toy-{style}-{trigger}", out / f".toy-{style}-{trigger}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / f"{repeats}_{trigger}"
    folder.mkdir(parents=True)
    for image in sorted(source.glob("*.png")):
        shutil.copyfile(image, folder / image.name)
        caption = image.with_suffix(".txt").read_text()
        # The trigger is the first tag; the character's noun (`a green zorb`) stays.
        (folder / f"{image.stem}.txt").write_text(caption.replace(STYLE_TRIGGERS[style], trigger, 1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def pair_name(style: str, other: str) -> str:
    """The known pair's order, as the issue names the pairs: stripes+pastel, stripes+zorb, pastel+zorb."""
    return "+".join(sorted((style, other), key=KNOWN.index))


def coined_prompts(samples: int, seed: int, style: str, trigger: str, others: tuple[str, ...]) -> list:
    """stylelora evaluate's prompts for the style, each other style and each pair, the style's trigger coined."""
    from stylelora.toy.evaluate import build_prompts
    from stylelora.toy.world import STYLE_TRIGGERS

    sets = (style, *others, *(pair_name(style, other) for other in others))
    return [replace(p, prompt=p.prompt.replace(STYLE_TRIGGERS[style], trigger, 1)) if style in p.prompt_set.split("+")
            else p for p in build_prompts(samples, seed, sets)]


class Scorer:
    """Generates prompts with adapters applied and reads them with the shipped judge."""

    def __init__(self, base: str = "toy"):
        from stylelora.toy.evaluate import load_judged_base

        self.pipe, self.judge = load_judged_base(base)

    def __call__(self, adapters: list[Path], prompts: list, mode: str) -> dict:
        """{prompt set: stylelora evaluate's row (each style's rate, shape and color accuracy, and for a pair
        all_styles_rate)}. The prompt sets keep the known names, so evaluate's scoring reads them as it is."""
        from stylelora.lora.spec import AdapterSpec
        from stylelora.toy.evaluate import EvalSettings, draw_blend
        from stylelora.toy.evaluate import score as evaluate_score

        images = draw_blend(self.pipe, [AdapterSpec(path, 1.0) for path in adapters], prompts, EvalSettings(), mode)
        predictions = self.judge.predict(images)
        return evaluate_score(prompts, predictions)["by_prompt_set"]


def with_words(prompt: str, trigger: str, words: str) -> str:
    """`words` typed before the prompt, or with a leading "+" just after its leading trigger tag."""
    if not words.startswith("+"):
        return words + prompt
    head = f"{trigger}, "
    if not prompt.startswith(head):
        raise ValueError(f"the prompt does not start with {head!r}: {prompt!r}")
    return head + words[1:] + prompt[len(head):]


def tokens_before(tokenizer, words: str) -> int:
    """How many tokens the text encoder reads ahead of the trigger once `words` are typed (as `with_words` types
    them; the start token not counted). CLIP's tokenizer splits at spaces and punctuation first, so the words' tokens
    are the same alone as in the prompt."""
    return 0 if words.startswith("+") else len(tokenizer(words).input_ids) - 2


def words_figures(args: argparse.Namespace) -> list[dict]:
    from stylelora.toy.evaluate import build_prompts
    from stylelora.toy.world import STYLE_TRIGGERS

    own = [replace(p, prompt=p.prompt.replace(STYLE_TRIGGERS[args.style], args.trigger, 1))
           for p in build_prompts(args.samples, args.seed, (args.style,))]
    scorer, rows = Scorer(args.base), []
    for words in args.words:
        prompts = [replace(p, prompt=with_words(p.prompt, args.trigger, words)) for p in own]
        row = scorer([args.adapter], prompts, "sum")[args.style]
        rows.append({"words": words, "tokens_before": tokens_before(scorer.pipe.tokenizer, words),
                     "example": prompts[0].prompt,
                     "rate": row[f"{args.style}_rate"], "shape": row["shape_accuracy"],
                     "color": row["color_accuracy"]})
        print(f"{words!r:28s} {args.style} {row[f'{args.style}_rate']:.2f}  shape {row['shape_accuracy']}  "
              f"color {row['color_accuracy']:.2f}  ({rows[-1]['tokens_before']} tokens before the trigger: "
              f"{prompts[0].prompt})", flush=True)
    return rows


def score(args: argparse.Namespace) -> dict:
    others = tuple(args.others)
    prompts = coined_prompts(args.samples, args.seed, args.style, args.trigger, others)
    files = {name: args.adapters_dir / f"toy-{name}" / f"toy-{name}.safetensors" for name in others}
    scorer, start = Scorer(args.base), time.perf_counter()
    figures: dict = {"alone": {args.style: scorer([args.adapter], prompts, "sum")}}
    for other in others:
        pair = pair_name(args.style, other)
        figures["alone"][other] = scorer([files[other]], [p for p in prompts if other in p.prompt_set.split("+")],
                                         "sum")
        for mode in args.modes:
            chosen = [p for p in prompts if p.prompt_set == pair]
            adapters = [args.adapter, files[other]] if pair.startswith(args.style) else [files[other], args.adapter]
            figures.setdefault(mode, {})[pair] = scorer(adapters, chosen, mode)[pair]
        print(f"{pair} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return figures


def report(figures: dict, args: argparse.Namespace) -> None:
    style, alone = args.style, figures["alone"]
    own = alone[style][style]
    print(f"{style} as `{args.trigger}` alone on its own prompts: rate {own[f'{style}_rate']}  "
          f"shape {own['shape_accuracy']}  color {own['color_accuracy']}")
    for other in args.others:
        pair = pair_name(style, other)
        print(f"\n== {pair}, `{args.trigger}` for {style} ({args.samples} prompts carrying both triggers) ==")
        for name in (style, other):
            row = alone[name][pair]
            print(f"  {name} alone on them: {name} {row[f'{name}_rate']}  color {row['color_accuracy']}  "
                  f"shape {row['shape_accuracy']}")
        for mode in args.modes:
            row = figures[mode][pair]
            print(f"  {mode:5s} both {row['all_styles_rate']}  {style} {row[f'{style}_rate']}  "
                  f"{other} {row[f'{other}_rate']}  color {row['color_accuracy']}  shape {row['shape_accuracy']}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    dataset = stages.add_parser("dataset", help="write OUT/toy-STYLE-TRIGGER")
    dataset.add_argument("--out", type=Path, required=True)
    scoring = stages.add_parser("score", help="the coined adapter alone and in pairs")
    scoring.add_argument("--adapter", type=Path, required=True, help="the adapter trained on the retriggered set")
    scoring.add_argument("--adapters-dir", type=Path, required=True, help="folder with toy-NAME/toy-NAME.safetensors")
    scoring.add_argument("--others", nargs="+", default=["stripes", "zorb"], choices=KNOWN)
    scoring.add_argument("--modes", nargs="+", default=["split", "sum"], choices=["sum", "ties", "split"])
    scoring.add_argument("--samples", type=int, default=96)
    scoring.add_argument("--seed", type=int, default=0)
    scoring.add_argument("--json", type=Path, help="also write the figures here")
    words = stages.add_parser("words", help="the adapter alone, words typed before (or +after) its trigger")
    words.add_argument("--adapter", type=Path, required=True)
    words.add_argument("--words", nargs="+", required=True, help="text before the trigger ('' = none; '+w, ' after it)")
    words.add_argument("--samples", type=int, default=32)
    words.add_argument("--seed", type=int, default=0)
    words.add_argument("--json", type=Path, help="also write the figures here")
    for stage in (dataset, scoring, words):
        stage.add_argument("--style", choices=KNOWN, default="pastel")
    for stage in (scoring, words):
        stage.add_argument("--base", default="toy", help="the base the adapters were trained on (default toy)")
    for stage in (dataset, scoring):
        stage.add_argument("--trigger", default="chalkstyle", help="the coined trigger (default chalkstyle)")
    words.add_argument("--trigger", help="the adapter's trigger (default: the style's own, e.g. pastelstyle)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage == "dataset":
        print(write_dataset(args.style, args.trigger, args.out))
        return 0
    if args.stage == "words":
        from stylelora.toy.world import STYLE_TRIGGERS

        args.trigger = args.trigger or STYLE_TRIGGERS[args.style]
        rows = words_figures(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    if args.style in args.others:
        raise SystemExit(f"--others must not hold --style {args.style}")
    figures = score(args)
    report(figures, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
