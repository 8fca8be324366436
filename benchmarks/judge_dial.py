"""What a perfectly even weight dial would score: the judge's rate on the toy world's own renders of each style's
evaluation prompts, faded in pixels from the render without the style (share 0) to the render with it (share 1)
(docs/results.md, "The judge on a faded style").

    python benchmarks/judge_dial.py --samples 96

An adapter whose image moved a share s of the way from the base's image to its full style at weight w would score at
w what this prints at s. The character fades from a circle of the same color, size and place (the world's plain
stand-in for it). Prints one line per style: the rate (and the judge's mean probability) at each share.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96, help="prompts per style, as stylelora evaluate --samples")
    parser.add_argument("--shares", type=float, nargs="+", default=[0, 0.25, 0.5, 0.6, 0.7, 0.75, 1],
                        help="how far each image is faded toward the styled render")
    return parser.parse_args(argv)


def render_pair(prompt, style: str):
    """(without the style, with it) as float arrays: the world's renders of the prompt's facts."""
    import numpy as np

    from stylelora.toy.evaluate import world_image
    from stylelora.toy.world import CHARACTER

    plain = world_image(prompt, shape="circle" if prompt.shape == CHARACTER else None)
    styled = world_image(prompt, stripes=style == "stripes", pastel=style == "pastel")
    return tuple(np.asarray(image, dtype=np.float32) for image in (plain, styled))


def faded(pairs, share: float) -> list:
    """Each pair's images mixed in pixels: (1 - share) x without + share x with, as 8-bit images."""
    import numpy as np
    from PIL import Image

    return [Image.fromarray(np.clip((1 - share) * plain + share * styled + 0.5, 0, 255).astype(np.uint8))
            for plain, styled in pairs]


def dial(judge, style: str, samples: int, shares: list[float]) -> list[tuple[float, float, float]]:
    """(share, rate, mean probability) of `style` on its evaluation prompts faded by each share."""
    from stylelora.toy.evaluate import build_prompts

    pairs = [render_pair(prompt, style) for prompt in build_prompts(samples, 0, (style,))]
    rows = []
    for share in shares:
        verdicts = judge.predict(faded(pairs, share))
        rows.append((share, sum(bool(v[style]) for v in verdicts) / len(verdicts),
                     sum(v[f"{style}_prob"] for v in verdicts) / len(verdicts)))
    return rows


def main(argv=None) -> int:
    from stylelora.toy.evaluate import STYLES
    from stylelora.toy.judge import load_judge

    args = parse_args(argv)
    judge = load_judge()
    print(f"{args.samples} prompts per style, seed 0; rate (mean probability) at each share of the fade")
    for style in STYLES:
        cells = " | ".join(f"{share:g}: {rate:.2f} ({prob:.2f})" for share, rate, prob in
                           dial(judge, style, args.samples, args.shares))
        print(f"{style:8s} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
