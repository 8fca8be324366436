"""`stylelora toy datasets`: writes the bundled style/character datasets in kohya layout, bit-identically per seed."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from .render import render
from .world import STYLE_TRIGGERS, caption, random_scene

DATASETS = {  # name -> (trigger word, scene options, seed)
    "toy-stripes": (STYLE_TRIGGERS["stripes"], {"stripes": True}, 101),
    "toy-pastel": (STYLE_TRIGGERS["pastel"], {"pastel": True}, 102),
    "toy-zorb": (STYLE_TRIGGERS["zorb"], {"zorb": True}, 103),
}
# Regularization ("class") images for `stylelora train --reg-dir`: plain scenes, captions without any trigger,
# kohya reg layout `1_<class>/`. name -> (class word, seed)
REG_DATASETS = {"toy-plain": ("shapes", 104)}
REPEATS = 10
IMAGES_PER_DATASET = 300


def write_dataset(name: str, root: Path, n_images: int = IMAGES_PER_DATASET) -> Path:
    """Write root/<name>/<repeats>_<trigger>/NNNN.png + NNNN.txt; replaces an existing copy atomically."""
    if name in REG_DATASETS:
        class_word, seed = REG_DATASETS[name]
        return _write(name, root, f"1_{class_word}", random.Random(seed), {}, None, n_images)
    trigger, options, seed = DATASETS[name]
    return _write(name, root, f"{REPEATS}_{trigger}", random.Random(seed), options, trigger, n_images)


def _write(name: str, root: Path, folder_name: str, rng: random.Random, options: dict, trigger: str | None,
           n_images: int) -> Path:
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / folder_name
    folder.mkdir(parents=True)
    for i in range(n_images):
        scene = random_scene(rng, **options)
        # No PNG metadata and fixed compression: the same seed gives the same bytes.
        render(scene).save(folder / f"{i:04d}.png", format="PNG", compress_level=9)
        (folder / f"{i:04d}.txt").write_text(caption(scene, trigger) + "\n")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def write_all(root: Path) -> list[Path]:
    return [write_dataset(name, root) for name in [*DATASETS, *REG_DATASETS]]
