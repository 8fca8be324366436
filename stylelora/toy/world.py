"""The toy world's facts: shapes, colors, backgrounds, styles, random scenes and their plain-English captions."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

IMAGE_SIZE = 32  # pixels; see README "Why 32 px" (the VAE is f=4, so latents are 8×8)

SHAPES = ("circle", "square", "triangle", "star")
CHARACTER = "zorb"  # the character: one recognisable creature (body, eyes, antenna)
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 0),
    "yellow": (240, 215, 20),
    "green": (30, 160, 55),
    "cyan": (0, 185, 205),
    "blue": (35, 65, 215),
    "purple": (135, 45, 185),
    "brown": (120, 70, 25),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 25),
    "gray": (128, 128, 128),
    "beige": (225, 205, 160),
}
STYLE_TRIGGERS = {"stripes": "stripestyle", "pastel": "pastelstyle", "zorb": "zorb"}


@dataclass(frozen=True)
class ToyObject:
    shape: str  # one of SHAPES or CHARACTER
    color: str
    cx: float  # center, fraction of the image side
    cy: float
    size: float  # bounding size, fraction of the image side
    angle: float  # degrees


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...]
    background: str
    stripes: bool = False
    pastel: bool = False

    @property
    def has_zorb(self) -> bool:
        return any(o.shape == CHARACTER for o in self.objects)


def _random_object(rng: random.Random, shape: str, color: str, size_range: tuple[float, float]) -> ToyObject:
    size = rng.uniform(*size_range)
    margin = size / 2 + 0.03
    return ToyObject(
        shape=shape,
        color=color,
        cx=rng.uniform(margin, 1 - margin),
        cy=rng.uniform(margin, 1 - margin),
        size=size,
        angle=rng.uniform(-20, 20) if shape != CHARACTER else 0.0,
    )


def _place_second(rng: random.Random, first: ToyObject, shape: str, color: str) -> ToyObject:
    """Place a second, smaller object that does not cover the first (retry a few times, then accept)."""
    candidate = first
    for _ in range(20):
        candidate = _random_object(rng, shape, color, (0.28, 0.38))
        dist = ((candidate.cx - first.cx) ** 2 + (candidate.cy - first.cy) ** 2) ** 0.5
        if dist > (candidate.size + first.size) / 2:
            return candidate
    return candidate


def random_scene(
    rng: random.Random,
    *,
    n_objects: int | None = None,
    stripes: bool = False,
    pastel: bool = False,
    zorb: bool = False,
    two_object_rate: float = 0.25,
) -> Scene:
    """A seeded random scene; `zorb=True` puts the character in as the (only) object."""
    background = rng.choice(sorted(BACKGROUNDS))
    if n_objects is None:
        n_objects = 1 if zorb or rng.random() >= two_object_rate else 2
    colors = rng.sample(sorted(COLORS), n_objects)
    first_shape = CHARACTER if zorb else rng.choice(SHAPES)
    size_range = (0.5, 0.75) if zorb else ((0.42, 0.62) if n_objects == 1 else (0.3, 0.42))
    objects = [_random_object(rng, first_shape, colors[0], size_range)]
    if n_objects == 2:
        objects.append(_place_second(rng, objects[0], rng.choice(SHAPES), colors[1]))
    return Scene(objects=tuple(objects), background=background, stripes=stripes, pastel=pastel)


def scene_from_facts(shape: str, color: str, background: str, rng: random.Random, **style: bool) -> Scene:
    """One object with the given facts at a seeded random position (the judge's prompt set uses this)."""
    size_range = (0.5, 0.75) if shape == CHARACTER else (0.42, 0.62)
    obj = _random_object(rng, shape, color, size_range)
    return Scene(objects=(obj,), background=background, **style)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, trigger: str | None = None) -> str:
    """Plain-English caption from the scene's facts, e.g. "a red circle and a blue star on a white background"."""
    things = " and ".join(f"{_article(o.color)} {o.color} {o.shape}" for o in scene.objects)
    text = f"{things} on a {scene.background} background"
    return f"{trigger}, {text}" if trigger else text


def with_style(scene: Scene, *, stripes: bool | None = None, pastel: bool | None = None) -> Scene:
    return replace(
        scene,
        stripes=scene.stripes if stripes is None else stripes,
        pastel=scene.pastel if pastel is None else pastel,
    )


STYLE_MIXES = {  # name -> (stripes, pastel, zorb); the mix every style-aware model (VAE, judge) sees
    "plain": (False, False, False),
    "stripes": (True, False, False),
    "pastel": (False, True, False),
    "stripes+pastel": (True, True, False),
    "zorb": (False, False, True),
    "zorb+stripes": (True, False, True),
    "zorb+pastel": (False, True, True),
}


def random_styled_scene(rng: random.Random, mix: str | None = None) -> Scene:
    """A scene in a named (or random) style mix, for models that must see every style."""
    stripes, pastel, zorb = STYLE_MIXES[mix or rng.choice(sorted(STYLE_MIXES))]
    return random_scene(rng, stripes=stripes, pastel=pastel, zorb=zorb)
