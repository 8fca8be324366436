"""Sample-prompt lines in kohya's syntax: parsed per prompt, refused with a fix when wrong, drawn as asked."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stylelora.config import ConfigError, load_config
from stylelora.train.sample_prompts import SamplePrompt, ignored_options_note, parse_sample_prompt
from train_fixtures import tiny_overrides


@pytest.mark.parametrize("line, expected", [
    ("a castle", SamplePrompt("a castle")),
    ("a cat --n low quality, blurry --w 512 --h 768 --d 42 --l 7.5 --s 28",
     SamplePrompt("a cat", "low quality, blurry", 512, 768, 42, 7.5, 28)),
    ("a cat --W 64 --D 3", SamplePrompt("a cat", width=64, seed=3)),  # kohya matches the letters in any case
    ("a cat --ss euler_a --d 1", SamplePrompt("a cat", seed=1, ignored=("--ss euler_a",))),
    ("a cat - a dog --s 4", SamplePrompt("a cat - a dog", steps=4)),  # one dash is part of the prompt
])
def test_a_line_gives_its_prompt_and_the_options_it_sets(line, expected):
    assert parse_sample_prompt(line) == expected


@pytest.mark.parametrize("line, message", [
    ("a cat --neg blurry", "--neg blurry is not a sample-prompt option; after the prompt write any of --n NEGATIVE"),
    ("a cat --w 500", "--w 500 is no image size; use a multiple of 8"),
    ("a cat --s 0", "--s (STEPS) must be 1 or more"),
    ("a cat --l nan", "--l (CFG scale) must be 1 or more, not 'nan'"),
    ("a cat --d x", "--d takes a whole number (SEED), not 'x'"),
    ("a cat --d 18446744073709551616", "--d (SEED) must be below 2**63"),  # would fail at the first grid
    ("a cat --h", "--h needs a value"),
])
def test_a_wrong_option_is_refused_with_how_to_write_it(line, message):
    with pytest.raises(ValueError, match="sample prompt 'a cat") as error:
        parse_sample_prompt(line)
    assert message in str(error.value)


def test_a_wrong_option_stops_the_run_before_training(tmp_path, tiny_base, stripes_dataset):
    overrides = tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base,
                               **{"train.sample_prompts": ("stripestyle, a star --neg blurry",)})
    with pytest.raises(ConfigError, match="train.sample_prompts: sample prompt .* --neg blurry is not a"):
        load_config(None, overrides)


def test_kohya_options_a_grid_does_not_use_are_named_once():
    note = ignored_options_note(("a --ss euler_a", "b --ss euler_a --cn pose.png", "c --d 1"))
    assert note.startswith("sample prompts: --cn pose.png, --ss euler_a ignored (kohya options")
    assert ignored_options_note(("a --d 1",)) == ""


def test_each_column_is_drawn_with_its_own_seed_size_and_negative(tmp_path, tiny_base, stripes_dataset):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from stylelora.train.samples import save_samples

    config = load_config(None, tiny_overrides(stripes_dataset, tmp_path / "run", tiny_base,
                                              **{"train.sample_steps": 2, "train.sample_guidance": 2.0}))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=32))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    prompts = ["stripestyle, a red circle", "stripestyle, a red circle --d 0", "a red circle --w 48 --n stripes",
               "stripestyle, a red circle --s 3 --l 1", "stripestyle, a red circle --d 0 --n stripestyle",
               "stripestyle, a red circle --d 0 --n a blue star"]
    grid_path = save_samples(pipe, prompts, config, tmp_path / "samples" / "step-000001.png")

    written = (tmp_path / "samples" / "prompts.txt").read_text().splitlines()
    assert written[1] == "column 2 (seed 0): stripestyle, a red circle --d 0" and written[2].startswith("column 3 (seed 2)")
    grid = np.asarray(Image.open(grid_path).convert("RGB")).astype(int)
    cell_width, cell_height, gap = 48 * 3, 32 * 3, 2  # the widest image sets the cells; 32 px tiles drawn 3x
    assert grid.shape == (cell_height + 2 * gap, 6 * (cell_width + gap) + gap, 3)
    column = [grid[gap:gap + cell_height, gap + c * (cell_width + gap):gap + c * (cell_width + gap) + cell_width]
              for c in range(6)]
    assert np.abs(column[0] - column[1]).max() <= 1  # --d 0 is the first column's seed: the same image
    assert np.abs(column[0] - column[3]).mean() > 1  # other steps and CFG draw another
    assert np.abs(column[4] - column[5]).max() > 0  # the same seed and batch: only the negative prompt differs
    assert (column[0][:, :24] == 255).all() and (column[2][:, :24] != 255).any()  # 32 px centred; 48 px fills
