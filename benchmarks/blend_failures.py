"""Where a blend loses a style: the images of a pair's stacked prompts in which the judge misses one adapter,
counted by the prompt's background and color, each beside the judge's verdict on the same prompt with the missing
adapter alone, and a contact sheet of them to look at (docs/results.md, "What the character loses beside pastel").

    python benchmarks/blend_failures.py --adapters-dir outputs/switch/tn02 --pair pastel+zorb --out outputs/failures

The images are the ones `stylelora evaluate --lora A:1 --lora B:1 --prompt-set A+B --samples N --blend-mode MODE`
draws (same prompts, same seeds). Writes OUT/A+B-MODE.png (each failed image over the same prompt drawn by the
adapter the blend lost, alone; 8x size; none when nothing failed) and OUT/A+B-MODE-colors.png (each image whose
color the judge reads wrong over the toy world's render of its prompt), and prints a line per failure, then the colors
the judge reads wrong in the blend and in each adapter alone, asked -> read (docs/results.md, "Where split loses
colors"). It also judges the toy world's renders of the prompts, as drawn and through the base's VAE: the ceiling.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters-dir", default=str(REPO / "outputs" / "switch" / "tn02"),
                        help="holds toy-NAME/toy-NAME.safetensors for each style of the pair")
    parser.add_argument("--pair", default="pastel+zorb", help="A+B, as a prompt set of stylelora evaluate")
    parser.add_argument("--mode", default="split", help="blend mode")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--out", default=str(REPO / "outputs" / "failures"))
    return parser.parse_args(argv)


def draw(pipe, paths: list[Path], mode: str, prompts, settings):
    from stylelora.lora.spec import AdapterSpec
    from stylelora.toy.evaluate import draw_blend

    return draw_blend(pipe, [AdapterSpec(str(path), 1.0) for path in paths], prompts, settings, mode)


def world_renders(prompts, styles: list[str]) -> list:
    """The toy world's own image of each prompt (its facts, in the pair's styles): what the judge reads right."""
    from stylelora.toy.evaluate import world_image

    return [world_image(prompt, stripes="stripes" in styles, pastel="pastel" in styles) for prompt in prompts]


def color_misses(prompts, verdicts) -> Counter:
    """{(asked color, color the judge read): images} over the images whose color the judge reads wrong."""
    return Counter((prompt.color, verdict["color"]) for prompt, verdict in zip(prompts, verdicts)
                   if verdict["color"] != prompt.color)


def print_color_misses(prompts, verdicts_by_row: dict) -> None:
    """One line per row: how many colors are read wrong, and which, most first (e.g. yellow -> orange 9 of 12)."""
    asked = Counter(prompt.color for prompt in prompts)
    for row, verdicts in verdicts_by_row.items():
        misses = color_misses(prompts, verdicts)
        detail = ", ".join(f"{color} -> {read} {count} of {asked[color]}" for (color, read), count in misses.most_common())
        print(f"colors read wrong, {row}: {sum(misses.values())} of {len(prompts)}" + (f" ({detail})" if detail else ""))


def main(argv=None) -> int:
    from stylelora.grid import save_grid
    from stylelora.toy.evaluate import EvalSettings, build_prompts, load_judged_base
    from stylelora.toy.vae_train import vae_round_trip

    args = parse_args(argv)
    styles = args.pair.split("+")
    files = {style: Path(args.adapters_dir) / f"toy-{style}" / f"toy-{style}.safetensors" for style in styles}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"no adapter at {', '.join(missing)}: train it with stylelora train datasets/toy-NAME "
                         f"--output {args.adapters_dir}/toy-NAME")
    pipe, judge = load_judged_base("toy")
    settings = EvalSettings(samples=args.samples, prompt_sets=(args.pair,))
    prompts = build_prompts(args.samples, settings.seed, settings.prompt_sets)
    blended = draw(pipe, list(files.values()), args.mode, prompts, settings)
    verdicts = judge.predict(blended)
    alone_images = {style: draw(pipe, [files[style]], args.mode, prompts, settings) for style in styles}
    alone = {style: judge.predict(images) for style, images in alone_images.items()}
    totals, counts, sheet = Counter(), Counter(), []  # sheet: (blend, the adapter it lost alone) per failure
    for index, (prompt, verdict) in enumerate(zip(prompts, verdicts)):
        totals.update([prompt.color, prompt.background])
        lost = [style for style in styles if not verdict[style]]
        if lost:
            counts.update([prompt.color, prompt.background])
            sheet.append((blended[index], alone_images[lost[0]][index]))
            judged = ", ".join(f"{style} {verdict[f'{style}_prob']:.2f}" for style in styles)
            print(f"{prompt.prompt} | blend: {judged} | {lost[0]} alone: {alone[lost[0]][index][f'{lost[0]}_prob']:.2f}")
    print(f"{args.pair} in {args.mode}: {len(sheet)} of {len(prompts)} images miss a style")
    for name in sorted(totals, key=lambda key: -counts[key] / totals[key]):
        print(f"  {name:8s} {counts[name]} of {totals[name]}")
    renders = world_renders(prompts, styles)
    truth = judge.predict(renders)
    print(f"the toy world's own renders of these prompts: {sum(not all(v[s] for s in styles) for v in truth)} of "
          f"{len(prompts)} miss a style")
    through_vae = judge.predict(vae_round_trip(pipe.vae, renders))  # the ceiling of every blend
    print(f"the same renders encoded and decoded by the base's VAE: "
          f"{sum(not all(v[s] for s in styles) for v in through_vae)} of {len(prompts)} miss a style")
    print_color_misses(prompts, {f"{args.pair} in {args.mode}": verdicts, **{f"{s} alone": alone[s] for s in styles},
                                 "the toy world's renders": truth})
    if sheet:  # the blend's images in the top row, the adapter each lost, alone, below it (8x, no gaps)
        out = save_grid([blend for blend, _ in sheet] + [alone for _, alone in sheet],
                        Path(args.out) / f"{args.pair}-{args.mode}.png", columns=len(sheet), scale=8, gap=0)
        print(f"contact sheet: {out} (the blend on top, the adapter it lost alone below)")
    wrong = [index for index, (prompt, verdict) in enumerate(zip(prompts, verdicts)) if verdict["color"] != prompt.color]
    if wrong:  # the blend's images whose color is read wrong, over the world's render of the same prompt
        out = save_grid([blended[i] for i in wrong] + [renders[i] for i in wrong],
                        Path(args.out) / f"{args.pair}-{args.mode}-colors.png", columns=len(wrong), scale=8, gap=0)
        print(f"colors sheet: {out} (the blend on top, the toy world's render below)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
