"""benchmarks/heldout_style.py: the held-out styles drawn as they say, datasets reproducible, prompts as evaluate's."""
from __future__ import annotations

import random

import numpy
import pytest
from train_fixtures import load_benchmark

from stylelora.toy.render import render
from stylelora.toy.world import scene_from_facts

heldout = load_benchmark("heldout_style")


@pytest.mark.parametrize("background, ink_is_dark", [("white", True), ("beige", True), ("black", False)])
def test_ink_outlines_each_object_and_leaves_the_rest_as_the_world_draws_it(background, ink_is_dark):
    plain, inked, changed, center = _square_drawn_by(heldout.ink_render, background)
    assert 20 < changed.sum() < 300  # a ring around the square, not a fill
    brightness = inked[changed].mean() - plain[changed].mean()
    assert (brightness < 0) == ink_is_dark  # dark ink, light on a black background
    assert numpy.array_equal(inked[center], plain[center])  # the body keeps its color


def _square_drawn_by(style_render, background: str):
    """A yellow square drawn by the world and by `style_render` (which, switched off, must draw the world's image):
    both as int arrays, the pixels the style changed, and the square's center."""
    scene = scene_from_facts("square", "yellow", background, random.Random(3))
    plain = numpy.asarray(render(scene)).astype(int)
    styled = numpy.asarray(style_render(scene)).astype(int)
    assert numpy.array_equal(numpy.asarray(style_render(scene, False)), plain)
    center = tuple(int(v * 32) for v in (scene.objects[0].cy, scene.objects[0].cx))
    return plain, styled, numpy.abs(styled - plain).max(axis=2) > 40, center


def test_the_ink_dataset_is_the_same_bytes_each_time(tmp_path):
    first = heldout.write_dataset(tmp_path / "a", n_images=3)
    second = heldout.write_dataset(tmp_path / "b", n_images=3)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert [str(path) for path in files] == [f"10_inkstyle/{i:04d}.{ext}" for i in range(3) for ext in ("png", "txt")]
    assert all((first / path).read_bytes() == (second / path).read_bytes() for path in files)
    assert (first / "10_inkstyle/0000.txt").read_text().startswith("inkstyle, ")


def test_ink_prompts_carry_evaluates_facts_with_the_ink_trigger_first():
    prompts = heldout.style_prompts(4, 0, ("pastel", "zorb"))
    sets = {name: [p for p in prompts if p.prompt_set == name] for name in dict.fromkeys(p.prompt_set for p in prompts)}
    assert list(sets) == ["ink", "pastel", "ink+pastel", "zorb", "ink+zorb"]
    assert all(len(chosen) == 4 for chosen in sets.values())
    for own, pair in zip(sets["zorb"], sets["ink+zorb"]):
        assert pair.prompt == "inkstyle, " + own.prompt and (pair.shape, pair.seed) == ("zorb", own.seed)
    assert sets["ink"][0].prompt.startswith("inkstyle, a") and sets["ink+pastel"][0].prompt.startswith(
        "inkstyle, pastelstyle, ")


@pytest.mark.parametrize("background, shadow_is_dark", [("white", True), ("beige", True), ("black", False)])
def test_a_shadow_falls_down_and_right_of_each_object_on_the_background_only(background, shadow_is_dark):
    plain, shaded, changed, center = _square_drawn_by(heldout.shadow_render, background)
    assert 10 < changed.sum() < 200  # a sliver beside the square, not a fill
    rows, cols = numpy.nonzero(changed)
    assert rows.mean() > center[0] and cols.mean() > center[1]  # below and to the right of the object
    assert ((shaded[changed].mean() - plain[changed].mean()) < 0) == shadow_is_dark  # a glow on black
    assert numpy.array_equal(shaded[center], plain[center])  # the body keeps its color


def test_each_held_out_style_has_a_coined_trigger_and_its_own_dataset(tmp_path):
    from transformers import CLIPTokenizer

    from stylelora.models.load import TOY_BASE_DIR

    tokenizer = CLIPTokenizer.from_pretrained(TOY_BASE_DIR / "tokenizer")
    assert all(len(tokenizer.tokenize(style.trigger)) > 1 for style in heldout.STYLES.values())
    folder = heldout.write_dataset(tmp_path, n_images=2, style=heldout.STYLES["shadow"])
    assert folder.name == "toy-shadow"
    assert (folder / "10_shadowstyle/0001.txt").read_text().startswith("shadowstyle, ")


def test_the_judge_can_train_on_what_the_toy_vae_gives_back_of_every_other_render():
    scenes = [scene_from_facts("circle", "red", "white", random.Random(seed)) for seed in range(4)]
    renders = [heldout.shadow_render(scene) for scene in scenes]
    mixed = heldout._through_vae(list(renders), 0.5)
    assert [mixed[i] is renders[i] for i in range(4)] == [False, True, False, True]
    for index in (0, 2):
        error = numpy.abs(numpy.asarray(mixed[index]).astype(int) - numpy.asarray(renders[index]).astype(int))
        assert mixed[index].size == renders[index].size and 0 < error.mean() < 12  # a lossy copy, not another image
    assert heldout._through_vae(list(renders), 0.0) == renders


def test_score_draws_the_held_out_adapter_at_the_weight_asked_with_its_text_encoder_at_1(monkeypatch, tmp_path):
    from stylelora.lora.spec import AdapterSpec

    calls = []

    class RecordingScorer:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, adapters, prompts, mode):
            calls.append((list(adapters), mode))
            sets = dict.fromkeys(p.prompt_set for p in prompts)
            return {name: {"ink": 0.0, "stripes": 0.0, "both": 0.0} for name in sets}

    monkeypatch.setattr(heldout, "StyleScorer", RecordingScorer)
    args = heldout.parse_args(["score", "--adapter", "ink.safetensors", "--weight", "1.5", "--style-judge", "j",
                               "--adapters-dir", str(tmp_path), "--others", "stripes", "--modes", "split",
                               "--samples", "2"])
    heldout.score(args)
    held = AdapterSpec("ink.safetensors", 1.5, 1.0)
    assert calls[1] == ([held], "sum")  # alone on every prompt set
    assert calls[-1] == ([held, AdapterSpec(tmp_path / "toy-stripes" / "toy-stripes.safetensors", 1.0)], "split")
