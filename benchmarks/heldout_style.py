"""A style the toy defaults were never tuned on: ink outlines. Does a default-trained adapter of it blend?

The toy world's three styles (stripes, pastel, zorb) chose the toy training defaults and the split blend, and the
shipped judge knows only them. This script brings a fourth style from outside the package, **ink**: every object
drawn with a dark outline about 1 px wide (a light one on a black background; soft and pale in the pastel style),
its trigger `inkstyle`, which the toy tokenizer splits into four tokens (the three known triggers are one each).
Nothing here changes the shipped world, datasets or judge. Three stages:

    python benchmarks/heldout_style.py dataset --out outputs/heldout          # outputs/heldout/toy-ink (300 images)
    python benchmarks/heldout_style.py judge --out outputs/heldout            # outputs/heldout/ink-judge.safetensors
    stylelora train outputs/heldout/toy-ink --no-samples --output outputs/heldout/run/toy-ink
    python benchmarks/heldout_style.py score --ink outputs/heldout/run/toy-ink/toy-ink.safetensors \\
        --ink-judge outputs/heldout/ink-judge.safetensors --adapters-dir outputs/switch/tn02 --modes sum split

`judge` trains a small ink classifier (the shipped judge's network, one binary head) on renders of every style mix
with and without ink, reports its held-out accuracy, and how the shipped judge reads ink renders (the ink outline
must not read as stripes, pastel or a zorb, nor move shapes and colors). `score` uses the issue's measure on the pairs
ink+stripes, ink+pastel and ink+zorb: 96 prompts carrying both triggers, both adapters at 1, the share of images
where the judges find both, each style's rate, color (and shape) against each adapter alone.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

INK_TRIGGER = "inkstyle"
INK_DATASET_SEED = 105  # the bundled datasets use 101-104
INK_WIDTH_PX = 1  # outline width at the image's 32 px
DARK_INK, LIGHT_INK = (20, 20, 25), (235, 235, 235)
OTHERS = ("stripes", "pastel", "zorb")
JUDGE_POOL = 16_000
HELD_OUT = 1_400


def ink_render(scene, ink: bool = True):
    """The toy world's render of `scene`, with ink outlines around its objects when `ink`."""
    from PIL import Image, ImageChops, ImageFilter

    from stylelora.toy import render as toy_render
    from stylelora.toy.world import COLORS, IMAGE_SIZE

    image = toy_render.render(scene)
    if not ink:
        return image
    size = IMAGE_SIZE * toy_render.SUPERSAMPLE
    mask = Image.new("L", (size, size), 0)
    for obj in scene.objects:
        layers = (toy_render._zorb_layers(obj, size, COLORS[obj.color]) if obj.shape == "zorb"
                  else [(toy_render._shape_mask(obj, size), None)])
        for layer, _ in layers:
            mask = ImageChops.lighter(mask, layer)
    ring = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(2 * INK_WIDTH_PX * toy_render.SUPERSAMPLE + 1)), mask)
    color = np.asarray(LIGHT_INK if scene.background == "black" else DARK_INK, np.float32)
    if scene.pastel:  # pastel softens and pales every edge it draws, the outline too
        ring = ring.filter(ImageFilter.GaussianBlur(toy_render.PASTEL_BLUR * toy_render.SUPERSAMPLE))
        color = toy_render._mix_white(color, toy_render.PASTEL_OBJECT_MIX)
    alpha = np.asarray(ring.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), np.float32)[..., None] / 255.0
    pixels = np.asarray(image, np.float32) * (1 - alpha) + color * alpha
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- dataset


def write_dataset(out: Path, n_images: int = 300) -> Path:
    """out/toy-ink/10_inkstyle/NNNN.png + .txt, in the bundled datasets' layout and caption form."""
    import shutil

    from stylelora.toy.world import caption, random_scene

    final, tmp = out / "toy-ink", out / ".toy-ink.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / f"10_{INK_TRIGGER}"
    folder.mkdir(parents=True)
    rng = random.Random(INK_DATASET_SEED)
    for i in range(n_images):
        scene = random_scene(rng)
        ink_render(scene).save(folder / f"{i:04d}.png", format="PNG", compress_level=9)
        (folder / f"{i:04d}.txt").write_text(caption(scene, INK_TRIGGER) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


# ----------------------------------------------------------------------------- judge


def judge_scenes(rng: random.Random, count: int) -> list[tuple]:
    """(scene, ink) over every style mix of the world, half of them inked; a fifth plain one- and two-object scenes."""
    from stylelora.toy.world import STYLE_MIXES, random_scene, random_styled_scene

    mixes = sorted(STYLE_MIXES)
    scenes = []
    for i in range(count):
        if i % 5 == 4:
            scene = random_scene(rng, n_objects=1 + i % 2)
        else:
            scene = random_styled_scene(rng, mixes[i % len(mixes)])
        scenes.append((scene, rng.random() < 0.5))
    return scenes


def train_ink_judge(out: Path, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> dict:
    """Train the ink classifier as the shipped judge is trained (its network, augmentation and schedule)."""
    import torch
    import torch.nn.functional as F

    from stylelora.toy.judge import Judge, JudgeSpec, build_network, network_logits, save_judge
    from stylelora.toy.judge_train import HELD_OUT_SEED, augment

    torch.set_num_threads(1)
    start = time.perf_counter()
    pool = judge_scenes(random.Random(seed), JUDGE_POOL)
    pixels = torch.from_numpy(np.stack([np.asarray(ink_render(s, ink)) for s, ink in pool])).permute(0, 3, 1, 2)
    labels = torch.tensor([float(ink) for _, ink in pool])
    print(f"rendered {len(pool)} images in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    spec = JudgeSpec(binary_heads=("ink",))
    torch.manual_seed(seed)
    network = build_network(spec)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(pool), (batch_size,), generator=generator)
        batch = augment(pixels[index].float() / 255.0, generator)
        loss = F.binary_cross_entropy_with_logits(network_logits(network, batch)["binary"][:, 0], labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    judge = Judge(network, spec)
    held_out = judge_scenes(random.Random(HELD_OUT_SEED), HELD_OUT)
    found = [verdict["ink"] for verdict in judge.predict([ink_render(s, ink) for s, ink in held_out])]
    accuracy = {"all": _share([f == ink for f, (_, ink) in zip(found, held_out)])}
    for name, chosen in (("inked", lambda s, ink: ink), ("plain", lambda s, ink: not ink),
                         ("inked, pastel", lambda s, ink: ink and s.pastel),
                         ("inked, black background", lambda s, ink: ink and s.background == "black")):
        accuracy[name] = _share([f == ink for f, (s, ink) in zip(found, held_out) if chosen(s, ink)])
    save_judge(network, spec, out, {"held_out_accuracy": json.dumps(accuracy), "train_seed": str(seed)})
    return accuracy


def shipped_judge_on_ink(count: int = HELD_OUT) -> dict:
    """How the shipped judge reads the same scenes with and without ink: its rates and accuracies on each."""
    from stylelora.toy.judge import load_judge
    from stylelora.toy.judge_train import HELD_OUT_SEED, scene_labels

    judge = load_judge()
    scenes = [scene for scene, _ in judge_scenes(random.Random(HELD_OUT_SEED + 1), count)]
    truth, rows = [scene_labels(scene) for scene in scenes], {}
    for ink in (False, True):
        verdicts = judge.predict([ink_render(scene, ink) for scene in scenes])
        row = {f"{head} right": _share([v[head] == bool(t[head]) for v, t in zip(verdicts, truth)]) for head in OTHERS}
        row["shape right"] = _share([v["shape"] == s.objects[0].shape for v, s, t in zip(verdicts, scenes, truth)
                                     if t["shape"] >= 0])
        row["color right"] = _share([v["color"] == s.objects[0].color for v, s, t in zip(verdicts, scenes, truth)
                                     if t["color"] >= 0])
        rows["inked" if ink else "plain"] = row
    return rows


def _share(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


# ----------------------------------------------------------------------------- score


def ink_prompts(samples: int, seed: int, others: tuple[str, ...]) -> list:
    """stylelora evaluate's facts and image seeds, with `inkstyle, ` first: the ink set, each other style's own set,
    and ink+OTHER for each other style."""
    from dataclasses import replace

    from stylelora.toy.evaluate import build_prompts

    base = build_prompts(samples, seed, ("plain", *others))
    plain = [p for p in base if p.prompt_set == "plain"]
    prompts = [replace(p, prompt_set="ink", prompt=f"{INK_TRIGGER}, {p.prompt}") for p in plain]
    for other in others:
        own = [p for p in base if p.prompt_set == other]  # "TRIGGER, content"
        prompts += own + [replace(p, prompt_set=f"ink+{other}", prompt=f"{INK_TRIGGER}, {p.prompt}") for p in own]
    return prompts


class InkScorer:
    """Generates prompts with adapters applied and reads them with the shipped judge and the ink classifier."""

    def __init__(self, ink_judge: Path, base: str = "toy"):
        from stylelora.toy.evaluate import load_judged_base
        from stylelora.toy.judge import load_judge

        (self.pipe, self.judge), self.ink = load_judged_base(base), load_judge(ink_judge)

    def __call__(self, adapters: list, prompts: list, mode: str) -> dict:
        """{prompt set: {rates of ink and the other styles, shape and color accuracy}}."""
        from stylelora.lora.spec import AdapterSpec
        from stylelora.toy.evaluate import EvalSettings, draw_blend

        images = draw_blend(self.pipe, [AdapterSpec(path, 1.0) for path in adapters], prompts, EvalSettings(), mode)
        verdicts = self.judge.predict(images)
        inked = [verdict["ink"] for verdict in self.ink.predict(images)]
        rows = {}
        for name in dict.fromkeys(p.prompt_set for p in prompts):
            chosen = [(p, v, k) for p, v, k in zip(prompts, verdicts, inked) if p.prompt_set == name]
            row = {"ink": _share(k for _, _, k in chosen)}
            row.update({style: _share(v[style] for _, v, _ in chosen) for style in OTHERS})
            row["shape"] = _share(v["shape"] == p.shape for p, v, _ in chosen if p.shape != "zorb")
            row["color"] = _share(v["color"] == p.color for p, v, _ in chosen)
            if name.startswith("ink+"):
                other = name.split("+")[1]
                row["both"] = _share(k and v[other] for _, v, k in chosen)
            rows[name] = row
        return rows


def score(args: argparse.Namespace) -> dict:
    others = tuple(args.others)
    files = {name: args.adapters_dir / f"toy-{name}" / f"toy-{name}.safetensors" for name in others}
    prompts = ink_prompts(args.samples, args.seed, others)
    scorer = InkScorer(args.ink_judge)
    start = time.perf_counter()
    # The base on the ink prompts: how often the ink classifier finds ink where none was drawn.
    figures: dict = {"base": scorer([], [p for p in prompts if p.prompt_set == "ink"], "sum"),
                     "alone": {"ink": scorer([args.ink], prompts, "sum")}}
    for name in others:
        figures["alone"][name] = scorer([files[name]], [p for p in prompts if name in p.prompt_set.split("+")], "sum")
        for mode in args.modes:
            pair = [p for p in prompts if p.prompt_set == f"ink+{name}"]
            figures.setdefault(mode, {})[name] = scorer([args.ink, files[name]], pair, mode)[f"ink+{name}"]
        print(f"ink+{name} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return figures


def report(figures: dict, modes: list[str], others: tuple[str, ...]) -> None:
    ink_alone = figures["alone"]["ink"]
    print("\nbase on the ink prompts: " + _row(figures["base"]["ink"]))
    print("ink alone on its own prompts: " + _row(ink_alone["ink"]))
    for name in others:
        own = figures["alone"][name]
        print(f"\n== ink+{name} (96 prompts carrying both triggers) ==")
        print(f"  ink alone on them:     ink {ink_alone[f'ink+{name}']['ink']}  {name} "
              f"{ink_alone[f'ink+{name}'][name]}  color {ink_alone[f'ink+{name}']['color']}")
        print(f"  {name} alone on them:  {name} {own[f'ink+{name}'][name]}  ink {own[f'ink+{name}']['ink']}  "
              f"color {own[f'ink+{name}']['color']};  on its own prompts {name} {own[name][name]} "
              f"color {own[name]['color']} shape {own[name]['shape']}")
        for mode in modes:
            row = figures[mode][name]
            print(f"  {mode:5s} both {row['both']}  ink {row['ink']}  {name} {row[name]}  color {row['color']}  "
                  f"shape {row['shape']}")


def _row(row: dict) -> str:
    return "  ".join(f"{key} {value}" for key, value in row.items())


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    dataset = stages.add_parser("dataset", help="write OUT/toy-ink")
    dataset.add_argument("--out", type=Path, required=True)
    judge = stages.add_parser("judge", help="train OUT/ink-judge.safetensors and check both judges on ink renders")
    judge.add_argument("--out", type=Path, required=True)
    judge.add_argument("--steps", type=int, default=1500)
    scoring = stages.add_parser("score", help="the blends of ink with each other style")
    scoring.add_argument("--ink", type=Path, required=True, help="the ink adapter (stylelora train's .safetensors)")
    scoring.add_argument("--ink-judge", type=Path, required=True)
    scoring.add_argument("--adapters-dir", type=Path, required=True, help="folder with toy-NAME/toy-NAME.safetensors")
    scoring.add_argument("--others", nargs="+", default=list(OTHERS), choices=OTHERS)
    scoring.add_argument("--modes", nargs="+", default=["sum", "split"], choices=["sum", "ties", "split"])
    scoring.add_argument("--samples", type=int, default=96)
    scoring.add_argument("--seed", type=int, default=0)
    scoring.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage == "dataset":
        print(write_dataset(args.out))
    elif args.stage == "judge":
        accuracy = train_ink_judge(args.out / "ink-judge.safetensors", steps=args.steps)
        print("ink classifier, held-out accuracy: " + json.dumps(accuracy))
        print("shipped judge on the same scenes, plain / inked: " + json.dumps(shipped_judge_on_ink()))
    else:
        figures = score(args)
        report(figures, args.modes, tuple(args.others))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
