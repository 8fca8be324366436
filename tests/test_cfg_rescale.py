"""benchmarks/cfg_rescale.py's knob: EvalSettings.guidance_rescale reaches the pipeline, and 0 is plain guidance."""
from __future__ import annotations

from dataclasses import replace

from gen_fixtures import load_tiny_base, pixels
from train_fixtures import load_benchmark

cfg_rescale = load_benchmark("cfg_rescale")


def test_a_rescale_of_zero_draws_the_plain_guidance_images_and_one_changes_them(tiny_base):
    from stylelora.toy.evaluate import EvalSettings, build_prompts, generate_images

    pipe = load_tiny_base(tiny_base)
    plain = EvalSettings(samples=2, prompt_sets=("stripes",), steps=3)
    prompts = build_prompts(plain.samples, plain.seed, plain.prompt_sets)
    images = {phi: [pixels(image) for image in generate_images(pipe, prompts, replace(plain, guidance_rescale=phi))]
              for phi in (0.0, 1.0)}
    default = [pixels(image) for image in generate_images(pipe, prompts, plain)]
    assert [image.tolist() for image in images[0.0]] == [image.tolist() for image in default]
    assert any((a != b).any() for a, b in zip(images[1.0], default))


def test_the_benchmark_takes_several_factors_and_pairs():
    args = cfg_rescale.parse_args(["--phis", "0", "0.7", "--pairs", "pastel+zorb"])
    assert args.phis == [0.0, 0.7] and args.pairs == ["pastel+zorb"] and args.mode == "split"
