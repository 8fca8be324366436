"""Image grids: tiling PIL images (optionally labelled, optionally upscaled for small toy images) into one PNG."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw


def make_grid(images: list[Image.Image], columns: int, *, scale: int = 1, gap: int = 2,
              row_labels: list[str] | None = None, column_labels: list[str] | None = None,
              label_width: int = 110, label_height: int = 14) -> Image.Image:
    """Tile images row-major; nearest-neighbour upscaling keeps 32 px toy pixels crisp. Cells take the largest
    image's size, and a smaller image sits in the middle of its cell (sample prompts may set their own size)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = max(image.width for image in images) * scale, max(image.height for image in images) * scale
    rows = (len(images) + columns - 1) // columns
    left = label_width if row_labels else 0
    top = label_height if column_labels else 0
    grid = Image.new("RGB", (left + columns * (w + gap) + gap, top + rows * (h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        tile = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        grid.paste(tile, (left + gap + c * (w + gap) + (w - tile.width) // 2,
                          top + gap + r * (h + gap) + (h - tile.height) // 2))
    for c, label in enumerate(column_labels or []):
        draw.text((left + gap + c * (w + gap), 1), _fitted(draw, label, w), fill=(0, 0, 0))
    for r, label in enumerate(row_labels or []):
        draw.text((2, top + gap + r * (h + gap) + h // 2 - 5), _fitted(draw, label, left - 4), fill=(0, 0, 0))
    return grid


def _fitted(draw: ImageDraw.ImageDraw, label: str, width: int) -> str:
    """`label`, or its end after '…' where it is wider than `width`: labels that share a start (a run's
    checkpoints: toy-stripes-step000500, toy-stripes-step000750) differ at the end, and must not run together."""
    if draw.textlength(label) <= width:
        return label
    for start in range(1, len(label)):
        if draw.textlength("…" + label[start:]) <= width:
            return "…" + label[start:]
    return "…"


def save_grid(images: list[Image.Image], path: Path, columns: int, **kwargs) -> Path:
    """Write the grid atomically (temp name + rename) so a viewer never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    scale = kwargs.pop("scale", 3 if images and images[0].width <= 64 else 1)
    make_grid(images, columns, scale=scale, **kwargs).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
