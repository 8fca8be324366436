"""The table of kohya sd-scripts flags: each names one of our options or says why there is none, and a kohya flag
typed to `stylelora train` or written in run.toml is answered with it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from stylelora.config import ConfigError, load_config
from stylelora.kohya_flags import KOHYA_FLAGS
from train_fixtures import REPO, subprocess_env


def train_flags() -> set[str]:
    from stylelora.cli import build_parser
    from stylelora.train.command import train_parser

    return {flag for action in train_parser(build_parser())._actions for flag in action.option_strings}


@pytest.mark.parametrize("kohya", sorted(KOHYA_FLAGS))
def test_each_advice_names_an_option_we_have_or_says_there_is_none(kohya):
    advice = KOHYA_FLAGS[kohya]
    named = [word.strip(",()") for word in advice.split() if word.startswith("--")]
    assert advice.startswith(("no option", "a flag each", "DATA_DIR")) or named[0] in train_flags(), advice
    assert all(flag in train_flags() for flag in named), advice


@pytest.mark.parametrize("typed, answer", [
    (["--xformers"], "--xformers: no option: diffusers runs PyTorch's scaled-dot-product attention"),
    (["--save_every_n_epochs", "1"], "--save_every_n_epochs: --save-every-n-epochs"),
    (["--network_dropout", "0.1"], "--network_dropout: --network-dropout"),
    (["--use_8bit_adam"], "--use_8bit_adam: --optimizer adamw8bit"),
    (["--metadata_author", "jane"], "--metadata_author: --author"),
    (["--masked_loss"], "--masked_loss: --alpha-mask"),
    (["--validation_split", "0.1"], "--validation_split: --validation-split"),
])
def test_a_kohya_flag_is_answered_with_ours(typed, answer):
    done = subprocess.run([sys.executable, "-m", "stylelora.cli", "train", "data", *typed], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and answer in done.stderr


def test_a_kohya_key_in_run_toml_is_answered_with_ours(tmp_path):
    (tmp_path / "run.toml").write_text("[network_arguments]\nnetwork_dropout = 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"network_dropout \(kohya sd-scripts' name; here: dropout under "
                                          r"\[network\]\)"):
        load_config(tmp_path / "run.toml", {"data.dir": "data"})
