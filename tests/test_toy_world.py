"""The toy world: seeded renders are deterministic, captions state the facts, and the bundled datasets regenerate bit-identically."""
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from stylelora.toy.datasets import DATASETS, IMAGES_PER_DATASET, write_dataset
from stylelora.toy.evaluate import build_prompts, score
from stylelora.toy.render import render
from stylelora.toy.world import COLORS, SHAPES, STYLE_MIXES, STYLE_TRIGGERS, caption, random_scene, random_styled_scene

REPO = Path(__file__).resolve().parents[1]


def test_same_seed_same_pixels_and_different_seed_differs():
    a = [np.asarray(render(random_styled_scene(random.Random(7), mix))) for mix in STYLE_MIXES]
    b = [np.asarray(render(random_styled_scene(random.Random(7), mix))) for mix in STYLE_MIXES]
    c = [np.asarray(render(random_styled_scene(random.Random(8), mix))) for mix in STYLE_MIXES]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_world_has_the_promised_vocabulary():
    assert {"circle", "square", "triangle", "star"} <= set(SHAPES)
    assert len(COLORS) >= 8


@pytest.mark.parametrize("n_objects", [1, 2])
def test_caption_names_every_object_and_the_background(n_objects):
    scene = random_scene(random.Random(3), n_objects=n_objects)
    text = caption(scene, trigger="stripestyle")
    assert text.startswith("stripestyle, ")
    for obj in scene.objects:
        assert f"{obj.color} {obj.shape}" in text
    assert text.endswith(f"on a {scene.background} background")


def test_styles_change_pixels_where_the_object_is():
    scene = random_scene(random.Random(5), n_objects=1)
    plain = np.asarray(render(scene)).astype(int)
    for style in ({"stripes": True}, {"pastel": True}):
        styled = np.asarray(render(type(scene)(scene.objects, scene.background, **style))).astype(int)
        assert np.abs(styled - plain).mean() > 3


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_bundled_dataset_regenerates_bit_identically(tmp_path, name):
    fresh = write_dataset(name, tmp_path)
    shipped = REPO / "datasets" / name
    trigger = DATASETS[name][0]
    files = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == IMAGES_PER_DATASET
    assert all(f.parent.name == f"10_{trigger}" for f in files)  # kohya layout: <repeats>_<trigger>/
    for rel in files:
        assert hashlib.sha256((fresh / rel).read_bytes()).digest() == hashlib.sha256((shipped / rel).read_bytes()).digest(), rel
    assert all(trigger in (shipped / f).read_text() for f in files if f.suffix == ".txt")


def test_evaluate_prompt_set_is_fixed_by_seed():
    assert build_prompts(8, 0) == build_prompts(8, 0)
    assert build_prompts(8, 0) != build_prompts(8, 1)
    sets = {p.prompt_set for p in build_prompts(4, 0)}
    assert sets == {"plain", "stripes", "pastel", "zorb"}


@pytest.mark.parametrize("name, triggers, subject", [
    ("plain", [], "shape"),
    ("stripes", ["stripestyle"], "shape"),
    ("stripes+pastel", ["stripestyle", "pastelstyle"], "shape"),
    ("zorb+stripes", ["zorb", "stripestyle"], "zorb"),
])
def test_prompt_sets_carry_their_triggers(name, triggers, subject):
    prompts = build_prompts(6, 0, (name,))
    assert len(prompts) == 6
    for p in prompts:
        assert p.prompt.startswith("".join(f"{t}, " for t in triggers))
        assert (p.shape == "zorb") == (subject == "zorb")


def test_world_image_draws_the_prompts_facts_as_the_judge_reads_them():
    from stylelora.toy.evaluate import world_image
    from stylelora.toy.judge import load_judge

    prompts = build_prompts(8, 0, ("pastel+zorb",))
    assert all(p.prompt.endswith(f" on a {p.background} background") for p in prompts)
    verdicts = load_judge().predict([world_image(p, pastel=True) for p in prompts])
    assert all(v["color"] == p.color and v["zorb"] and v["pastel"] and not v["stripes"] for v, p in zip(verdicts, prompts))
    circles = load_judge().predict([world_image(p, shape="circle") for p in prompts])  # another shape, same facts
    assert all(v["shape"] == "circle" and not v["zorb"] and not v["pastel"] for v in circles)


@pytest.mark.parametrize("name", ["stripe", "stripes+stripes", "plain+zorb", ""])
def test_unknown_prompt_sets_are_refused(name):
    with pytest.raises(ValueError, match="prompt set"):
        build_prompts(2, 0, (name,))


def test_blend_prompt_set_counts_images_with_every_style():
    prompts = build_prompts(4, 0, ("stripes+pastel",))
    verdict = lambda stripes, pastel: {"shape": "circle", "color": "red", "stripes": stripes, "pastel": pastel, "zorb": False}
    predictions = [verdict(True, True), verdict(True, False), verdict(False, True), verdict(True, True)]
    row = score(prompts, predictions)["by_prompt_set"]["stripes+pastel"]
    assert row["all_styles_rate"] == 0.5
    assert row["stripes_rate"] == 0.75 and row["pastel_rate"] == 0.75


def test_bundled_reg_dataset_regenerates_bit_identically(tmp_path):
    from stylelora.toy.datasets import REG_DATASETS

    for name, (class_word, _) in REG_DATASETS.items():
        fresh, shipped = write_dataset(name, tmp_path), REPO / "datasets" / name
        files = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
        assert len([f for f in files if f.suffix == ".png"]) == IMAGES_PER_DATASET
        assert all(f.parent.name == f"1_{class_word}" for f in files)  # kohya reg layout
        for rel in files:
            assert (fresh / rel).read_bytes() == (shipped / rel).read_bytes(), rel
        assert not any(t in (shipped / f).read_text() for f in files if f.suffix == ".txt" for t in STYLE_TRIGGERS.values())
