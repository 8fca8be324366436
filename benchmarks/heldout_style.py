"""Styles the toy defaults were never tuned on (ink outlines, drop shadows). Does a default-trained adapter blend?

The toy world's three styles (stripes, pastel, zorb) chose the toy training defaults and the split blend, and the
shipped judge knows only them. This script brings a fourth style from outside the package (`--style`, ink by
default), each with a coined trigger that the toy tokenizer splits into pieces (the three known triggers are one
token each):

- **ink** (`inkstyle`, 4 tokens): every object drawn with a dark outline about 1 px wide (a light one on a black
  background; soft and pale in the pastel style);
- **shadow** (`shadowstyle`, 6 tokens): every object casts a hard drop shadow 2 px down and to the right onto the
  background (a light glow on a black background; soft and pale in the pastel style).

Nothing here changes the shipped world, datasets or judge. Three stages (for the second style put `--style shadow`
before the stage, and train its judge with `--vae-share 0.5`: the toy VAE blurs a thin shadow, and the classifier
must read what a generated image can carry; its files are toy-shadow and shadow-judge.safetensors):

    python benchmarks/heldout_style.py dataset --out outputs/heldout          # outputs/heldout/toy-ink (300 images)
    python benchmarks/heldout_style.py judge --out outputs/heldout            # outputs/heldout/ink-judge.safetensors
    stylelora train outputs/heldout/toy-ink --no-samples --output outputs/heldout/run/toy-ink
    python benchmarks/heldout_style.py score --ink outputs/heldout/run/toy-ink/toy-ink.safetensors \\
        --ink-judge outputs/heldout/ink-judge.safetensors --adapters-dir outputs/switch/tn02 --modes sum split

`judge` trains a small classifier for the style (the shipped judge's network, one binary head) on renders of every
style mix with and without it, reports its held-out accuracy, and how the shipped judge reads the styled renders (the
style must not read as stripes, pastel or a zorb, nor move shapes and colors). `score` uses the issue's measure on the
pairs STYLE+stripes, STYLE+pastel and STYLE+zorb: 96 prompts carrying both triggers, both adapters at 1, the share of
images where the judges find both, each style's rate, color (and shape) against each adapter alone.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INK_TRIGGER = "inkstyle"
INK_DATASET_SEED = 105  # the bundled datasets use 101-104
INK_WIDTH_PX = 1  # outline width at the image's 32 px
DARK_INK, LIGHT_INK = (20, 20, 25), (235, 235, 235)
SHADOW_OFFSET_PX = 2  # down and to the right, at the image's 32 px
SHADOW_DARKEN, SHADOW_GLOW = 0.45, (110, 110, 115)  # the background's share kept under a shadow; the glow on black
OTHERS = ("stripes", "pastel", "zorb")
JUDGE_POOL = 16_000
HELD_OUT = 1_400


def ink_render(scene, ink: bool = True):
    """The toy world's render of `scene`, with ink outlines around its objects when `ink`."""
    from PIL import ImageChops, ImageFilter

    from stylelora.toy import render as toy_render
    from stylelora.toy.world import IMAGE_SIZE

    image = toy_render.render(scene)
    if not ink:
        return image
    mask = _objects_mask(scene, IMAGE_SIZE * toy_render.SUPERSAMPLE)
    ring = ImageChops.subtract(mask.filter(ImageFilter.MaxFilter(2 * INK_WIDTH_PX * toy_render.SUPERSAMPLE + 1)), mask)
    color = np.asarray(LIGHT_INK if scene.background == "black" else DARK_INK, np.float32)
    if scene.pastel:  # pastel softens and pales every edge it draws, the outline too
        ring = ring.filter(ImageFilter.GaussianBlur(toy_render.PASTEL_BLUR * toy_render.SUPERSAMPLE))
        color = toy_render._mix_white(color, toy_render.PASTEL_OBJECT_MIX)
    return _painted(image, ring, color)


def _painted(image, coverage, color):
    """`image` with `color` laid over it where the supersampled `coverage` mask covers it (box-downsampled to the
    image's size, as the world's renders are)."""
    from PIL import Image

    alpha = np.asarray(coverage.resize(image.size, Image.Resampling.BOX), np.float32)[..., None] / 255.0
    pixels = np.asarray(image, np.float32) * (1 - alpha) + color * alpha
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _objects_mask(scene, size: int):
    """Where the scene's objects (the character's eyes and antenna included) cover the supersampled canvas."""
    from PIL import Image, ImageChops

    from stylelora.toy import render as toy_render
    from stylelora.toy.world import COLORS

    mask = Image.new("L", (size, size), 0)
    for obj in scene.objects:
        layers = (toy_render._zorb_layers(obj, size, COLORS[obj.color]) if obj.shape == "zorb"
                  else [(toy_render._shape_mask(obj, size), None)])
        for layer, _ in layers:
            mask = ImageChops.lighter(mask, layer)
    return mask


def shadow_render(scene, shadow: bool = True):
    """The toy world's render of `scene`, each object casting a drop shadow onto the background when `shadow`."""
    from PIL import ImageChops, ImageFilter

    from stylelora.toy import render as toy_render
    from stylelora.toy.world import BACKGROUNDS, IMAGE_SIZE

    image = toy_render.render(scene)
    if not shadow:
        return image
    size = IMAGE_SIZE * toy_render.SUPERSAMPLE
    objects = _objects_mask(scene, size)
    offset = SHADOW_OFFSET_PX * toy_render.SUPERSAMPLE
    cast = ImageChops.offset(objects, offset, offset)
    cast.paste(0, (0, 0, size, offset))  # ImageChops.offset wraps around: nothing falls in from the far edge
    cast.paste(0, (0, 0, offset, size))
    if scene.pastel:
        cast = cast.filter(ImageFilter.GaussianBlur(toy_render.PASTEL_BLUR * toy_render.SUPERSAMPLE))
    background = np.asarray(BACKGROUNDS[scene.background], np.float32)
    color = (np.asarray(SHADOW_GLOW, np.float32) if scene.background == "black" else background * SHADOW_DARKEN)
    if scene.pastel:
        color = toy_render._mix_white(color, toy_render.PASTEL_BACKGROUND_MIX)
    return _painted(image, ImageChops.subtract(cast, objects), color)  # a shadow falls on the background only


@dataclass(frozen=True)
class HeldOutStyle:
    """A style from outside the package: its name, coined trigger, renderer and dataset seed."""

    name: str
    trigger: str
    render: Callable
    dataset_seed: int


STYLES = {"ink": HeldOutStyle("ink", INK_TRIGGER, ink_render, INK_DATASET_SEED),
          "shadow": HeldOutStyle("shadow", "shadowstyle", shadow_render, INK_DATASET_SEED + 1)}


# ----------------------------------------------------------------------------- dataset


def write_dataset(out: Path, n_images: int = 300, style: HeldOutStyle = STYLES["ink"]) -> Path:
    """out/toy-NAME/10_TRIGGER/NNNN.png + .txt, in the bundled datasets' layout and caption form."""
    import shutil

    from stylelora.toy.world import caption, random_scene

    final, tmp = out / f"toy-{style.name}", out / f".toy-{style.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / f"10_{style.trigger}"
    folder.mkdir(parents=True)
    rng = random.Random(style.dataset_seed)
    for i in range(n_images):
        scene = random_scene(rng)
        style.render(scene).save(folder / f"{i:04d}.png", format="PNG", compress_level=9)
        (folder / f"{i:04d}.txt").write_text(caption(scene, style.trigger) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


# ----------------------------------------------------------------------------- judge


def judge_scenes(rng: random.Random, count: int) -> list[tuple]:
    """(scene, styled) over every style mix of the world, half of them styled; a fifth plain one- and two-object
    scenes."""
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


def toy_vae_round_trip(images: list) -> list:
    """Each image encoded and decoded by the toy base's VAE: what of the style a generated image can carry at most."""
    from diffusers import AutoencoderKL

    from stylelora.models.load import TOY_BASE_DIR
    from stylelora.toy.vae_train import vae_round_trip

    return vae_round_trip(AutoencoderKL.from_pretrained(TOY_BASE_DIR / "vae").float().eval(), images)


def train_style_judge(out: Path, style: HeldOutStyle = STYLES["ink"], steps: int = 1500, batch_size: int = 64,
                      lr: float = 3e-3, seed: int = 0, vae_share: float = 0.0) -> dict:
    """Train the style's classifier as the shipped judge is trained (its network, augmentation and schedule).
    `vae_share` of the renders pass through the toy VAE first (`toy_vae_round_trip`): a style the VAE blurs, such as a
    thin drop shadow, is then read as a generated image can draw it."""
    import torch
    import torch.nn.functional as F

    from stylelora.toy.judge import Judge, JudgeSpec, build_network, network_logits, save_judge
    from stylelora.toy.judge_train import HELD_OUT_SEED, augment

    torch.set_num_threads(1)
    start = time.perf_counter()
    pool = judge_scenes(random.Random(seed), JUDGE_POOL)
    renders = _through_vae([style.render(s, on) for s, on in pool], vae_share)
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in renders])).permute(0, 3, 1, 2)
    labels = torch.tensor([float(on) for _, on in pool])
    print(f"rendered {len(pool)} images in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    spec = JudgeSpec(binary_heads=(style.name,))
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
    renders = [style.render(s, on) for s, on in held_out]
    found = [verdict[style.name] for verdict in judge.predict(renders)]
    accuracy = {"all": _share([f == on for f, (_, on) in zip(found, held_out)])}
    for name, chosen in (("styled", lambda s, on: on), ("plain", lambda s, on: not on),
                         ("styled, pastel", lambda s, on: on and s.pastel),
                         ("styled, black background", lambda s, on: on and s.background == "black")):
        accuracy[name] = _share([f == on for f, (s, on) in zip(found, held_out) if chosen(s, on)])
    found = [verdict[style.name] for verdict in judge.predict(toy_vae_round_trip(renders))]
    accuracy["through the VAE"] = _share([f == on for f, (_, on) in zip(found, held_out)])
    accuracy["through the VAE, styled"] = _share([f for f, (_, on) in zip(found, held_out) if on])
    save_judge(network, spec, out, {"held_out_accuracy": json.dumps(accuracy), "train_seed": str(seed)})
    return accuracy


def _through_vae(images: list, share: float) -> list:
    """The images with every k-th one (a `share` of them) replaced by its toy-VAE round trip."""
    if share <= 0:
        return images
    every = max(1, round(1 / share))
    round_trips = iter(toy_vae_round_trip(images[::every]))
    return [next(round_trips) if index % every == 0 else image for index, image in enumerate(images)]


def shipped_judge_on_style(style: HeldOutStyle = STYLES["ink"], count: int = HELD_OUT) -> dict:
    """How the shipped judge reads the same scenes with and without the style: its rates and accuracies on each."""
    from stylelora.toy.judge import load_judge
    from stylelora.toy.judge_train import HELD_OUT_SEED, scene_labels

    judge = load_judge()
    scenes = [scene for scene, _ in judge_scenes(random.Random(HELD_OUT_SEED + 1), count)]
    truth, rows = [scene_labels(scene) for scene in scenes], {}
    for on in (False, True):
        verdicts = judge.predict([style.render(scene, on) for scene in scenes])
        row = {f"{head} right": _share([v[head] == bool(t[head]) for v, t in zip(verdicts, truth)]) for head in OTHERS}
        row["shape right"] = _share([v["shape"] == s.objects[0].shape for v, s, t in zip(verdicts, scenes, truth)
                                     if t["shape"] >= 0])
        row["color right"] = _share([v["color"] == s.objects[0].color for v, s, t in zip(verdicts, scenes, truth)
                                     if t["color"] >= 0])
        rows["styled" if on else "plain"] = row
    return rows


def _share(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


# ----------------------------------------------------------------------------- score


def style_prompts(samples: int, seed: int, others: tuple[str, ...], style: HeldOutStyle = STYLES["ink"]) -> list:
    """stylelora evaluate's facts and image seeds, with the style's trigger first: the style's set, each other
    style's own set, and NAME+OTHER for each other style."""
    from dataclasses import replace

    from stylelora.toy.evaluate import build_prompts

    base = build_prompts(samples, seed, ("plain", *others))
    plain = [p for p in base if p.prompt_set == "plain"]
    prompts = [replace(p, prompt_set=style.name, prompt=f"{style.trigger}, {p.prompt}") for p in plain]
    for other in others:
        own = [p for p in base if p.prompt_set == other]  # "TRIGGER, content"
        prompts += own + [replace(p, prompt_set=f"{style.name}+{other}", prompt=f"{style.trigger}, {p.prompt}")
                          for p in own]
    return prompts


class StyleScorer:
    """Generates prompts with adapters applied and reads them with the shipped judge and the style's classifier."""

    def __init__(self, style_judge: Path, style: HeldOutStyle = STYLES["ink"], base: str = "toy"):
        from stylelora.toy.evaluate import load_judged_base
        from stylelora.toy.judge import load_judge

        (self.pipe, self.judge), self.classifier, self.style = load_judged_base(base), load_judge(style_judge), style

    def __call__(self, adapters: list, prompts: list, mode: str) -> dict:
        """{prompt set: {rates of the held-out style and the other styles, shape and color accuracy}}; `adapters`
        are AdapterSpecs."""
        from stylelora.toy.evaluate import EvalSettings, draw_blend

        name = self.style.name
        images = draw_blend(self.pipe, adapters, prompts, EvalSettings(), mode)
        verdicts = self.judge.predict(images)
        found = [verdict[name] for verdict in self.classifier.predict(images)]
        rows = {}
        for prompt_set in dict.fromkeys(p.prompt_set for p in prompts):
            chosen = [(p, v, k) for p, v, k in zip(prompts, verdicts, found) if p.prompt_set == prompt_set]
            row = {name: _share(k for _, _, k in chosen)}
            row.update({other: _share(v[other] for _, v, _ in chosen) for other in OTHERS})
            row["shape"] = _share(v["shape"] == p.shape for p, v, _ in chosen if p.shape != "zorb")
            row["color"] = _share(v["color"] == p.color for p, v, _ in chosen)
            if prompt_set.startswith(f"{name}+"):
                other = prompt_set.split("+")[1]
                row["both"] = _share(k and v[other] for _, v, k in chosen)
            rows[prompt_set] = row
        return rows


def score(args: argparse.Namespace) -> dict:
    from stylelora.lora.spec import AdapterSpec

    style, others = STYLES[args.style], tuple(args.others)
    held = AdapterSpec(args.adapter, args.weight, 1.0)  # a faint style raised by its UNet weight (docs/blending.md)
    files = {name: AdapterSpec(args.adapters_dir / f"toy-{name}" / f"toy-{name}.safetensors", 1.0) for name in others}
    prompts = style_prompts(args.samples, args.seed, others, style)
    scorer = StyleScorer(args.style_judge, style)
    start = time.perf_counter()
    # The base on the style's prompts: how often the classifier finds the style where none was drawn.
    figures: dict = {"base": scorer([], [p for p in prompts if p.prompt_set == style.name], "sum"),
                     "alone": {style.name: scorer([held], prompts, "sum")}}
    for name in others:
        figures["alone"][name] = scorer([files[name]], [p for p in prompts if name in p.prompt_set.split("+")], "sum")
        pair_set = f"{style.name}+{name}"
        for mode in args.modes:
            pair = [p for p in prompts if p.prompt_set == pair_set]
            figures.setdefault(mode, {})[name] = scorer([held, files[name]], pair, mode)[pair_set]
        print(f"{pair_set} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return figures


def report(figures: dict, modes: list[str], others: tuple[str, ...], style: str = "ink", samples: int = 96) -> None:
    held = figures["alone"][style]
    print(f"\nbase on the {style} prompts: " + _row(figures["base"][style]))
    print(f"{style} alone on its own prompts: " + _row(held[style]))
    for name in others:
        own, pair_set = figures["alone"][name], f"{style}+{name}"
        print(f"\n== {pair_set} ({samples} prompts carrying both triggers) ==")
        print(f"  {style} alone on them:     {style} {held[pair_set][style]}  {name} "
              f"{held[pair_set][name]}  color {held[pair_set]['color']}")
        print(f"  {name} alone on them:  {name} {own[pair_set][name]}  {style} {own[pair_set][style]}  "
              f"color {own[pair_set]['color']};  on its own prompts {name} {own[name][name]} "
              f"color {own[name]['color']} shape {own[name]['shape']}")
        for mode in modes:
            row = figures[mode][name]
            print(f"  {mode:5s} both {row['both']}  {style} {row[style]}  {name} {row[name]}  color {row['color']}  "
                  f"shape {row['shape']}")


def _row(row: dict) -> str:
    return "  ".join(f"{key} {value}" for key, value in row.items())


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", choices=sorted(STYLES), default="ink", help="the held-out style (default ink)")
    stages = parser.add_subparsers(dest="stage", required=True)
    dataset = stages.add_parser("dataset", help="write OUT/toy-STYLE")
    dataset.add_argument("--out", type=Path, required=True)
    judge = stages.add_parser("judge", help="train OUT/STYLE-judge.safetensors and check both judges on its renders")
    judge.add_argument("--out", type=Path, required=True)
    judge.add_argument("--steps", type=int, default=1500)
    judge.add_argument("--vae-share", type=float, default=0.0,
                       help="share of the training renders passed through the toy VAE first (0.5 for shadow)")
    scoring = stages.add_parser("score", help="the blends of the style with each other style")
    scoring.add_argument("--adapter", "--ink", type=Path, required=True,
                         help="the held-out style's adapter (stylelora train's .safetensors)")
    scoring.add_argument("--weight", type=float, default=1.0,
                         help="the held-out adapter's UNet weight, its text encoder at 1 (default 1)")
    scoring.add_argument("--style-judge", "--ink-judge", type=Path, required=True)
    scoring.add_argument("--adapters-dir", type=Path, required=True, help="folder with toy-NAME/toy-NAME.safetensors")
    scoring.add_argument("--others", nargs="+", default=list(OTHERS), choices=OTHERS)
    scoring.add_argument("--modes", nargs="+", default=["sum", "split"], choices=["sum", "ties", "split"])
    scoring.add_argument("--samples", type=int, default=96)
    scoring.add_argument("--seed", type=int, default=0)
    scoring.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    style = STYLES[args.style]
    if args.stage == "dataset":
        print(write_dataset(args.out, style=style))
    elif args.stage == "judge":
        accuracy = train_style_judge(args.out / f"{style.name}-judge.safetensors", style, steps=args.steps,
                                     vae_share=args.vae_share)
        print(f"{style.name} classifier, held-out accuracy: " + json.dumps(accuracy))
        print("shipped judge on the same scenes, plain / styled: " + json.dumps(shipped_judge_on_style(style)))
    else:
        figures = score(args)
        report(figures, args.modes, tuple(args.others), style.name, args.samples)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
