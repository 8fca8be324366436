"""Rendering toy scenes to RGB pixels: shapes, the zorb character, and the stripes (texture) and pastel (palette) styles."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import BACKGROUNDS, CHARACTER, COLORS, IMAGE_SIZE, Scene, ToyObject

SUPERSAMPLE = 4  # draw at 4× and box-downsample: anti-aliased edges are easier for the VAE to reconstruct
STRIPE_PERIOD = 4  # low-res pixels; a multiple of the VAE's factor so stripes sit on the latent grid
PASTEL_OBJECT_MIX = 0.5  # share of white mixed into object colors
PASTEL_BACKGROUND_MIX = 0.35
PASTEL_BLUR = 1.0  # low-res pixels of edge softening
EYE_WHITE = (250, 250, 250)
PUPIL = (15, 15, 15)


def _polygon(obj: ToyObject, n_points: int, scale: float, inner_ratio: float | None = None) -> list[tuple[float, float]]:
    """Regular polygon (or star, with inner_ratio) around the object's center, rotated by its angle."""
    radius = obj.size * scale / 2
    points = []
    steps = n_points * (2 if inner_ratio else 1)
    for k in range(steps):
        r = radius * (inner_ratio if inner_ratio and k % 2 else 1.0)
        theta = math.radians(obj.angle) - math.pi / 2 + 2 * math.pi * k / steps
        points.append((obj.cx + r * math.cos(theta), obj.cy + r * math.sin(theta)))
    return points


def _mask(size: int, draw_fn) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(mask), size)
    return mask


def _shape_mask(obj: ToyObject, size: int) -> Image.Image:
    def ellipse(cx, cy, rx, ry):
        return lambda d, s: d.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=255)

    def poly(points):
        return lambda d, s: d.polygon([(x * s, y * s) for x, y in points], fill=255)

    if obj.shape == "circle":
        return _mask(size, ellipse(obj.cx, obj.cy, obj.size / 2, obj.size / 2))
    if obj.shape == "square":
        return _mask(size, poly(_polygon(obj, 4, math.sqrt(2) * 0.85)))
    if obj.shape == "triangle":
        shifted = ToyObject(obj.shape, obj.color, obj.cx, obj.cy + obj.size * 0.08, obj.size, obj.angle)
        return _mask(size, poly(_polygon(shifted, 3, 1.1)))
    if obj.shape == "star":
        return _mask(size, poly(_polygon(obj, 5, 1.05, inner_ratio=0.45)))
    raise ValueError(f"unknown shape {obj.shape!r}")


def _zorb_layers(obj: ToyObject, size: int, body_rgb) -> list[tuple[Image.Image, tuple]]:
    """The character: a round body with two big eyes, an antenna with a ball, and two feet."""
    s, cx, cy = obj.size, obj.cx, obj.cy

    def ell(x, y, rx, ry):
        return _mask(size, lambda d, k: d.ellipse([(x - rx) * k, (y - ry) * k, (x + rx) * k, (y + ry) * k], fill=255))

    body_y = cy + 0.08 * s
    stalk = _mask(size, lambda d, k: d.line([(cx + 0.05 * s) * k, (body_y - 0.3 * s) * k, (cx + 0.15 * s) * k, (cy - 0.42 * s) * k], fill=255, width=max(1, int(0.06 * s * k))))
    dark = tuple(int(c * 0.45) for c in body_rgb)
    layers = [
        (stalk, dark),
        (ell(cx + 0.15 * s, cy - 0.42 * s, 0.08 * s, 0.08 * s), "body"),
        (ell(cx - 0.2 * s, body_y + 0.32 * s, 0.12 * s, 0.07 * s), dark),
        (ell(cx + 0.2 * s, body_y + 0.32 * s, 0.12 * s, 0.07 * s), dark),
        (ell(cx, body_y, 0.4 * s, 0.33 * s), "body"),
    ]
    for ex in (-0.15, 0.15):
        layers.append((ell(cx + ex * s, body_y - 0.08 * s, 0.11 * s, 0.12 * s), EYE_WHITE))
        layers.append((ell(cx + ex * s + 0.02 * s, body_y - 0.06 * s, 0.05 * s, 0.06 * s), PUPIL))
    return layers


def _mix_white(rgb, share: float) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float32) * (1 - share) + 255.0 * share


def _body_fill(rgb: np.ndarray, scene: Scene, size: int) -> np.ndarray:
    """The object's own color, striped when the scene is in the stripes style (stripes fixed to the pixel grid)."""
    fill = np.broadcast_to(rgb, (size, size, 3)).copy()
    if scene.stripes:
        yy, xx = np.mgrid[0:size, 0:size]
        half_period = STRIPE_PERIOD * SUPERSAMPLE // 2
        dark = ((xx + yy) // half_period) % 2 == 1
        fill[dark] = rgb * 0.4
    return fill


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene to an RGB PIL image of `image_size`² pixels; deterministic for the same scene."""
    size = image_size * SUPERSAMPLE
    mix = PASTEL_OBJECT_MIX if scene.pastel else 0.0
    background = _mix_white(BACKGROUNDS[scene.background], PASTEL_BACKGROUND_MIX if scene.pastel else 0.0)
    canvas = np.broadcast_to(background, (size, size, 3)).astype(np.float32)
    for obj in scene.objects:
        body_rgb = np.asarray(COLORS[obj.color], dtype=np.float32)
        if obj.shape == CHARACTER:
            layers = _zorb_layers(obj, size, COLORS[obj.color])
        else:
            layers = [(_shape_mask(obj, size), "body")]
        for mask, fill_kind in layers:
            if scene.pastel:
                mask = mask.filter(ImageFilter.GaussianBlur(PASTEL_BLUR * SUPERSAMPLE))
            alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
            fill = _body_fill(body_rgb, scene, size) if fill_kind == "body" else np.asarray(fill_kind, np.float32)
            fill = fill * (1 - mix) + 255.0 * mix
            canvas = canvas * (1 - alpha) + fill * alpha
    hi = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    return hi.resize((image_size, image_size), Image.Resampling.BOX)
