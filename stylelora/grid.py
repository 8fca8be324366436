"""Image grids: tiling PIL images (optionally labelled, optionally upscaled for small toy images) into one PNG; with
a Z axis, A1111's X/Y/Z plot layout: one labelled X/Y grid per Z value, side by side, each under its Z value."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw

LABEL_FONT_SIZE = 10  # px: Pillow's default, legible on a toy grid's 96 px cells
Z_MARGIN = 8  # px between two X/Y grids at 10 px text (growing with it): the sub-grids must not read as one


def make_grid(images: list[Image.Image], columns: int, *, scale: int = 1, gap: int = 2,
              row_labels: list[str] | None = None, column_labels: list[str] | None = None,
              label_width: int = 110, label_height: int = 14) -> Image.Image:
    """Tile images row-major; nearest-neighbour upscaling keeps 32 px toy pixels crisp. Cells take the largest
    image's size, and a smaller image sits in the middle of its cell (sample prompts may set their own size).
    Labels grow with the cells (label_width/label_height are their size at 10 px text, a toy cell's), as A1111's
    X/Y plot scales its font: 10 px text on a 512 or 1024 px cell cannot be read once the grid is shrunk to a screen."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = max(image.width for image in images) * scale, max(image.height for image in images) * scale
    rows = (len(images) + columns - 1) // columns
    font, grow = scaled_font(w, h)
    widest = max((font.getlength(label) for label in row_labels or []), default=0)
    # Row labels take the room they need, up to a cell's width, so a long adapter name is not cut on a big cell.
    left = max(round(label_width * grow), min(round(widest) + 8, w)) if row_labels else 0
    top = round(label_height * grow) if column_labels else 0
    grid = Image.new("RGB", (left + columns * (w + gap) + gap, top + rows * (h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        tile = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        grid.paste(tile, (left + gap + c * (w + gap) + (w - tile.width) // 2,
                          top + gap + r * (h + gap) + (h - tile.height) // 2))
    for c, label in enumerate(column_labels or []):
        draw.text((left + gap + c * (w + gap), 1), _fitted(draw, label, w, font), fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels or []):
        y = top + gap + r * (h + gap) + h // 2 - round(5 * grow)
        draw.text((2, y), _fitted(draw, label, left - 4, font), fill=(0, 0, 0), font=font)
    return grid


def make_z_grid(images: list[Image.Image], columns: int, titles: list[str], *, scale: int = 1, gap: int = 2,
                label_height: int = 14, **labels) -> Image.Image:
    """One make_grid X/Y grid per title (a Z value), of len(images) / len(titles) images each in turn, laid side by
    side with the title centred above each, as A1111's X/Y/Z plot lays out its Z axis; labels: make_grid's."""
    if not titles or len(images) % len(titles):
        raise ValueError(f"make_z_grid needs the same number of images for each of the {len(titles)} titles "
                         f"(got {len(images)} images)")
    per_grid = len(images) // len(titles)
    grids = [make_grid(images[i * per_grid:(i + 1) * per_grid], columns, scale=scale, gap=gap,
                       label_height=label_height, **labels) for i in range(len(titles))]
    # The titles' text is the size of the sub-grids' labels, which grow with the cells.
    cell = max(image.width for image in images) * scale, max(image.height for image in images) * scale
    font, grow = scaled_font(*cell)
    top, margin = round(label_height * grow), round(Z_MARGIN * grow)
    width = sum(grid.width for grid in grids) + margin * (len(grids) - 1)
    canvas = Image.new("RGB", (width, top + max(grid.height for grid in grids)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for grid, title in zip(grids, titles):
        canvas.paste(grid, (left, top))
        shown = _fitted(draw, title, grid.width, font)
        draw.text((left + (grid.width - draw.textlength(shown, font=font)) // 2, 1), shown, fill=(0, 0, 0), font=font)
        left += grid.width + margin
    return canvas


def scaled_font(width: int, height: int):
    """(label_font for a cell of this size, its size over the toy cell's 10 px): the factor the label bands grow by."""
    font = label_font(width, height)
    return font, getattr(font, "size", LABEL_FONT_SIZE) / LABEL_FONT_SIZE


def label_font(width: int, height: int):
    """Pillow's own font (no font file to ship) at 10 px on a toy cell (96 px), (w + h) / 40 px on bigger ones
    (26 px on 512 px cells); the fixed-size bitmap font where Pillow has no FreeType."""
    from PIL import ImageFont

    size = max(LABEL_FONT_SIZE, round((width + height) / 40))
    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType, or before 10.1
        return ImageFont.load_default()


def _fitted(draw: ImageDraw.ImageDraw, label: str, width: int, font=None) -> str:
    """`label`, or its end after '…' where it is wider than `width`: labels that share a start (a run's
    checkpoints: toy-stripes-step000500, toy-stripes-step000750) differ at the end, and must not run together."""
    if draw.textlength(label, font=font) <= width:
        return label
    for start in range(1, len(label)):
        if draw.textlength("…" + label[start:], font=font) <= width:
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
