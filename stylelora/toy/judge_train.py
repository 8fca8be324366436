"""Training the toy-world judge: a seeded pool of renders with per-head labels, augmentation, and the held-out accuracy check."""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .judge import DEFAULT_JUDGE_PATH, Judge, JudgeSpec, build_network, load_judge, network_logits, save_judge
from .render import render
from .world import CHARACTER, COLORS, SHAPES, STYLE_MIXES, Scene, random_scene, random_styled_scene

POOL_STYLED = 12_000  # random_styled_scene: every style mix, incl. two-object scenes (style/zorb heads)
POOL_SINGLE = 8_000  # single-object non-zorb scenes over the non-zorb mixes: more signal for shape and color
POOL_PAIRS = 4_000  # two-object non-zorb scenes: small spiky shapes (stars) on dark backgrounds otherwise read as stripes
HELD_OUT_SEED = 1_000_003  # far from any training seed; random.Random streams of different seeds are independent
IGNORE = -1  # label of a head that is undefined for a scene (shape of a zorb, color of a two-object scene)

SHIFT_PX = 2
JITTER = 8 / 255
MAX_NOISE_STD = 0.03
BLUR_SIGMA = 1.0  # one fixed 3×3 kernel; a random per-image blend with it gives "slight blur" of varying strength


def scene_labels(scene: Scene) -> dict[str, int]:
    """Per-head labels; shape only for single non-zorb objects, color only for single objects (zorb: body color)."""
    single = len(scene.objects) == 1
    first = scene.objects[0]
    return {
        "shape": SHAPES.index(first.shape) if single and first.shape != CHARACTER else IGNORE,
        "color": list(COLORS).index(first.color) if single else IGNORE,
        "stripes": int(scene.stripes),
        "pastel": int(scene.pastel),
        "zorb": int(scene.has_zorb),
    }


def training_scenes(
    rng: random.Random, n_styled: int = POOL_STYLED, n_single: int = POOL_SINGLE, n_pairs: int = POOL_PAIRS
) -> list[Scene]:
    scenes = [random_styled_scene(rng) for _ in range(n_styled)]
    plain_mixes = sorted(name for name, (_, _, zorb) in STYLE_MIXES.items() if not zorb)
    for n_objects, count in ((1, n_single), (2, n_pairs)):
        for i in range(count):
            stripes, pastel, _ = STYLE_MIXES[plain_mixes[i % len(plain_mixes)]]
            scenes.append(random_scene(rng, n_objects=n_objects, stripes=stripes, pastel=pastel))
    return scenes


def held_out_scenes(n: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """Fresh scenes cycling through every style mix (about a quarter of non-zorb ones have two objects)."""
    rng = random.Random(seed)
    mixes = sorted(STYLE_MIXES)
    return [random_styled_scene(rng, mixes[i % len(mixes)]) for i in range(n)]


def render_pool(scenes: list[Scene]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8 N×H×W×3 pixels and int64 label vectors per head."""
    pixels = np.stack([np.asarray(render(scene)) for scene in scenes])
    labels = [scene_labels(scene) for scene in scenes]
    return pixels, {head: np.array([row[head] for row in labels], np.int64) for head in labels[0]}


def augment(images, generator):
    """Imperfections like a generator's: 1–2 px shifts, slight blur, per-channel color offsets, gaussian noise."""
    import torch

    n = images.shape[0]
    images = _random_shift(images, generator)
    images = _random_blur(images, generator)
    offsets = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * JITTER
    noise_std = torch.rand(n, 1, 1, 1, generator=generator) * MAX_NOISE_STD
    noise = torch.randn(images.shape, generator=generator) * noise_std
    return (images + offsets + noise).clamp(0.0, 1.0)


def _random_shift(images, generator):
    import torch
    import torch.nn.functional as F

    size = images.shape[-1]
    # replicate-pad so a shift brings in background, not black borders the renders never have
    padded = F.pad(images, (SHIFT_PX,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * SHIFT_PX + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def _random_blur(images, generator):
    import torch
    import torch.nn.functional as F

    taps = torch.exp(-(torch.arange(3.0) - 1) ** 2 / (2 * BLUR_SIGMA**2))
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    blurred = F.conv2d(F.pad(images, (1,) * 4, mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    # half the images stay sharp; the others get a random share of the blur
    strength = torch.rand(images.shape[0], 1, 1, 1, generator=generator) * (
        torch.rand(images.shape[0], 1, 1, 1, generator=generator) < 0.5
    )
    return images + strength * (blurred - images)


def batch_loss(network, pixels, labels: dict):
    """Sum of the heads' losses; undefined labels (IGNORE) drop out of shape and color."""
    import torch
    import torch.nn.functional as F

    logits = network_logits(network, pixels)
    binary_targets = torch.stack([labels[head] for head in ("stripes", "pastel", "zorb")], dim=1).float()
    return (
        F.cross_entropy(logits["shape"], labels["shape"], ignore_index=IGNORE)
        + F.cross_entropy(logits["color"], labels["color"], ignore_index=IGNORE)
        + F.binary_cross_entropy_with_logits(logits["binary"], binary_targets) * 3
    )


def train_judge(
    out_path: str | Path = DEFAULT_JUDGE_PATH,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 3e-3,
    spec: JudgeSpec = JudgeSpec(),
    log: Callable[[str], None] = print,
    num_threads: int | None = 1,
) -> Path:
    """Train a judge from seeded renders and write it (weights + spec + measured held-out accuracy) to out_path.

    Deterministic for a given seed and thread count; `num_threads=1` keeps it so and leaves the other core free.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        network = _trained_network(seed, steps, batch_size, lr, spec, log)
    finally:
        torch.set_num_threads(previous_threads)
    accuracy = measure_accuracy(Judge(network, spec))
    log("held-out accuracy: " + json.dumps({head: round(acc, 4) for head, acc in accuracy.items()}))
    metadata = {"train_seed": str(seed), "train_steps": str(steps), "held_out_accuracy": json.dumps(accuracy)}
    path = save_judge(network, spec, out_path, metadata)
    log(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path


def _trained_network(seed: int, steps: int, batch_size: int, lr: float, spec: JudgeSpec, log):
    import torch

    start = time.perf_counter()
    pixels, labels = render_pool(training_scenes(random.Random(seed)))
    log(f"rendered {len(pixels)} training images in {time.perf_counter() - start:.0f} s")
    pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    labels = {head: torch.from_numpy(values) for head, values in labels.items()}

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build_network(spec).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    order = torch.randperm(len(pixels), generator=generator)
    cursor = 0
    for step in range(1, steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(pixels), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        batch = augment(pixels[index].float() / 255.0, generator)
        loss = batch_loss(network, batch, {head: values[index] for head, values in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return network.eval()


def measure_accuracy(judge: Judge, n: int = 1400, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Per-head accuracy on fresh renders of every style mix; shape/color only where the head is defined."""
    scenes = held_out_scenes(n, seed)
    verdicts = judge.predict([render(scene) for scene in scenes])
    names = {"shape": SHAPES, "color": tuple(COLORS)}
    hits: dict[str, list[bool]] = {head: [] for head in ("shape", "color", "stripes", "pastel", "zorb")}
    for scene, verdict in zip(scenes, verdicts):
        for head, label in scene_labels(scene).items():
            if label == IGNORE:
                continue
            expected = names[head][label] if head in names else bool(label)
            hits[head].append(verdict[head] == expected)
    return {head: float(np.mean(values)) for head, values in hits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy-world judge, or measure a trained one.")
    parser.add_argument("--out", type=Path, default=DEFAULT_JUDGE_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--measure-only", action="store_true", help="only measure the judge at --out")
    parser.add_argument("--n", type=int, default=1400, help="held-out images for --measure-only")
    args = parser.parse_args(argv)
    if args.measure_only:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(measure_accuracy(load_judge(args.out), n=args.n), indent=1))
        return
    train_judge(args.out, seed=args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
