"""`stylelora evaluate`: generate from a fixed toy-world prompt set and score the images with the judge."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .world import BACKGROUNDS, CHARACTER, COLORS, SHAPES, STYLE_TRIGGERS, scene_from_facts

PROMPT_SETS = ("plain", "stripes", "pastel", "zorb")  # plain = no trigger; the others carry their trigger word
STYLES = ("stripes", "pastel", "zorb")


def prompt_set_styles(name: str) -> tuple[str, ...]:
    """'plain' → (); 'stripes' → ('stripes',); a blend set 'stripes+pastel' → both. Unknown names are refused."""
    if name == "plain":
        return ()
    styles = tuple(name.split("+"))
    unknown = [s for s in styles if s not in STYLES]
    if unknown or len(set(styles)) != len(styles):
        raise ValueError(f"unknown prompt set {name!r}: use plain, {', '.join(STYLES)} or a '+' combination "
                         f"such as stripes+pastel")
    return styles


@dataclass(frozen=True)
class EvalPrompt:
    prompt_set: str
    prompt: str
    shape: str
    color: str
    seed: int
    background: str


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 32  # prompts per prompt set
    seed: int = 0
    prompt_sets: tuple[str, ...] = PROMPT_SETS
    steps: int = 25
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    guidance_rescale: float = 0.0  # diffusers' CFG rescale φ; 0 is plain guidance (benchmarks/cfg_rescale.py)


def _content(shape: str, color: str, background: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {background} background"


def build_prompts(samples: int, seed: int, prompt_sets: tuple[str, ...] = PROMPT_SETS) -> list[EvalPrompt]:
    """The same seed gives the same prompts and per-image seeds; content is shared across prompt sets."""
    rng = random.Random(seed)
    facts = [(rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(sorted(BACKGROUNDS))) for _ in range(samples)]
    image_seeds = [rng.randrange(2**31) for _ in range(samples)]
    prompts = []
    for prompt_set in prompt_sets:
        styles = prompt_set_styles(prompt_set)
        triggers = "".join(f"{STYLE_TRIGGERS[style]}, " for style in styles)
        for (shape, color, background), image_seed in zip(facts, image_seeds):
            subject = CHARACTER if "zorb" in styles else shape
            text = triggers + _content(subject, color, background)
            prompts.append(EvalPrompt(prompt_set, text, subject, color, image_seed, background))
    return prompts


def world_image(prompt: EvalPrompt, shape: str | None = None, **style: bool):
    """The toy world's own render of the prompt's facts (its `shape`, if given, in place of the prompt's), in the
    styles named (stripes=True, pastel=True): what the judge reads right, beside what a model drew."""
    from .render import render

    return render(scene_from_facts(shape or prompt.shape, prompt.color, prompt.background, random.Random(prompt.seed),
                                   **style))


def generate_images(pipe, prompts: list[EvalPrompt], settings: EvalSettings, batch: int = 64):
    """Images for every prompt, each from its own seeded generator (so batching does not change results)."""
    import torch

    from ..generate import prompt_schedule

    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator("cpu").manual_seed(p.seed) for p in chunk]
        # read as `stylelora generate` reads a prompt (emphasis, editing, long prompts); evaluate's own are plain
        out = prompt_schedule.draw(pipe, [p.prompt for p in chunk], [settings.negative_prompt] * len(chunk),
                                   steps=settings.steps, guidance_scale=settings.guidance_scale,
                                   guidance_rescale=settings.guidance_rescale, generator=generators, output_type="pil")
        images.extend(out.images)
    return images


def load_judged_base(base: str = "toy"):
    """(pipe, judge): a base with its progress bar off, and the toy-world judge, for scoring blend after blend."""
    from ..models.load import load_base
    from .judge import load_judge

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_judge()


def draw_blend(pipe, specs: list, prompts: list[EvalPrompt], settings: EvalSettings, mode: str | None = None,
               dial: str | None = None) -> list:
    """Images of `prompts` with this blend applied, and the base's own weights back afterwards, so that one loaded
    pipe draws one blend after another (specs: AdapterSpec or "FILE[:W[:TE_W]]"; mode, dial: AdapterStack.apply's)."""
    from ..generate.stack import AdapterStack

    with AdapterStack.for_pipe(pipe).applied(specs, mode, dial) as stack:
        try:
            return generate_images(pipe, prompts, settings)
        finally:
            stack.clear()


def score(prompts: list[EvalPrompt], predictions: list[dict]) -> dict:
    """Shape/color accuracy over the shape prompts, and the rate at which each prompt set shows each style."""
    shape_hits = [pred["shape"] == p.shape for p, pred in zip(prompts, predictions) if p.shape != CHARACTER]
    color_hits = [pred["color"] == p.color for p, pred in zip(prompts, predictions)]
    by_prompt_set = {}
    for prompt_set in dict.fromkeys(p.prompt_set for p in prompts):
        pairs = [(p, pred) for p, pred in zip(prompts, predictions) if p.prompt_set == prompt_set]
        row = {
            "shape_accuracy": _mean([pred["shape"] == p.shape for p, pred in pairs if p.shape != CHARACTER]),
            "color_accuracy": _mean([pred["color"] == p.color for p, pred in pairs]),
            **{f"{head}_rate": _mean([bool(pred[head]) for _, pred in pairs]) for head in STYLES},
        }
        styles = prompt_set_styles(prompt_set)
        if len(styles) > 1:  # a blend set: how often the judge finds every one of its styles in the same image
            row["all_styles_rate"] = _mean([all(pred[style] for style in styles) for _, pred in pairs])
        by_prompt_set[prompt_set] = row
    return {
        "shape_accuracy": _mean(shape_hits),
        "color_accuracy": _mean(color_hits),
        # A style's hit rate: how often its own prompt set (the one carrying just its trigger) shows it.
        **{f"{style}_rate": by_prompt_set.get(style, {}).get(f"{style}_rate") for style in STYLES},
        "by_prompt_set": by_prompt_set,
    }


def _mean(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def evaluate_pipeline(pipe, judge, settings: EvalSettings = EvalSettings()) -> tuple[dict, list]:
    """Generate the prompt set with `pipe` (adapters already applied) and score it; returns (metrics, images)."""
    prompts = build_prompts(settings.samples, settings.seed, settings.prompt_sets)
    pipe.set_progress_bar_config(disable=True)
    images = generate_images(pipe, prompts, settings)
    metrics = score(prompts, judge.predict(images))
    metrics["settings"] = {"samples": settings.samples, "seed": settings.seed, "steps": settings.steps,
                           "guidance_scale": settings.guidance_scale, "prompt_sets": list(settings.prompt_sets),
                           "images": len(images)}
    return metrics, images
