"""Each training option is declared once (stylelora.config); the CLI, the docs table and the app's Train tab follow it."""
from __future__ import annotations

import dataclasses
import shlex
import typing

import pytest

from stylelora.config import OPTION_SPECS, OPTIONS_BY_NAME, load_config
from stylelora.options_doc import DOC, options_table, with_table
from stylelora.train.command import build_parser, overrides_from_args, parse_args

WIDGET_SPECS = [spec for spec in OPTION_SPECS if spec.option.widget is not None]


def test_docs_options_table_is_the_generated_one():
    text = DOC.read_text(encoding="utf-8")
    assert with_table(text) == text, "docs/training.md is stale: run `python -m stylelora.options_doc`"


def test_every_option_has_a_flag_or_is_toml_only_and_reads_back_from_the_command_line():
    parser = build_parser()
    for spec in OPTION_SPECS:
        if spec.flag is None or typing.get_origin(spec.type) is tuple:
            continue  # --sample-prompts FILE: tests/test_presets.py
        if spec.type is bool:
            args = [] if spec.flag == "DATA_DIR" else [spec.flag]
            expected = not spec.default
        else:
            example = spec.option.example or ("x" if spec.type is str else "3")
            args, expected = [spec.flag, example], spec.type(example)
        if spec.flag == "DATA_DIR":
            continue
        overrides = overrides_from_args(parser.parse_args(["train", "data", *args]))
        assert overrides[spec.dotted] == expected, spec.dotted


@pytest.mark.parametrize("spec", [s for s in OPTION_SPECS if s.flag and s.flag.startswith("--")],
                         ids=lambda s: s.dotted)
def test_cli_help_shows_the_declared_default(spec, capsys):
    from stylelora.config import default_text

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert spec.flag in help_text
    if default_text(spec):
        assert f"(default {default_text(spec)})" in help_text


@pytest.mark.parametrize("flag, says_first", [
    ("--no-bucketing", "every image center-cropped square (default: aspect-ratio buckets)"),
    ("--no-text-encoder", "the UNet only (default: a LoRA on the text encoder too)"),
    ("--no-samples", "no sample grids (default: sample grids"),
    ("--flip", "random horizontal flips"),  # a flag that turns an option on keeps the option's own help
])
def test_a_flag_that_turns_a_default_off_says_what_it_does_first(flag, says_first, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # argparse would break "aspect-ratio" at its hyphen
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{flag} {says_first}" in help_text


def test_a_changed_default_shows_in_cli_docs_and_app(monkeypatch):
    """One edit to a declaration is the whole change: parser, docs table and app widget all read it."""
    gr = pytest.importorskip("gradio")
    from stylelora.app import ui

    spec = OPTIONS_BY_NAME["train.steps"]
    changed = dataclasses.replace(spec, default=1234)
    specs = tuple(changed if s is spec else s for s in OPTION_SPECS)
    monkeypatch.setattr("stylelora.config.OPTION_SPECS", specs)
    monkeypatch.setattr("stylelora.train.command.OPTION_SPECS", specs)
    monkeypatch.setattr("stylelora.options_doc.OPTION_SPECS", specs)
    parser_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default 1234)" in " ".join(parser_help.split())
    assert "| `[train]` `steps` | `--steps` | `1234` |" in options_table()
    with gr.Blocks():
        assert ui._option_widget(changed).value == 1234


def test_app_defaults_are_the_cli_defaults(tmp_path):
    """The Train tab's widgets start at the declared defaults, and sending them unchanged trains what the CLI does."""
    gr = pytest.importorskip("gradio")
    from stylelora.app import ui

    with gr.Blocks():
        values = [ui._option_widget(spec).value for spec in WIDGET_SPECS]
    for spec, value in zip(WIDGET_SPECS, values):
        assert value == (spec.default if spec.default is not None else ""), spec.dotted  # empty: the family's
    settings = ui.train_settings(str(tmp_path), "style", "toy", False, [s.dotted for s in WIDGET_SPECS], values)
    from_app = load_config(None, settings.overrides(tmp_path / "adapters", tmp_path))
    from_cli = load_config(None, {"data.dir": str(tmp_path.absolute()), "train.output_name": "style",
                                  "train.output": str(tmp_path / "adapters" / "style")})
    assert from_app == from_cli


def test_the_train_tab_sets_kohyas_clip_skip_and_caption_length(tmp_path):
    """Both have widgets, so an app user training for an anime base or on long tag captions reaches them."""
    pytest.importorskip("gradio")
    from stylelora.app import ui

    keys = ["train.clip_skip", "data.max_token_length"]
    assert set(keys) <= {spec.dotted for spec in WIDGET_SPECS}
    settings = ui.train_settings(str(tmp_path), "style", "toy", False, keys, [2, 150])
    config = load_config(None, settings.overrides(tmp_path / "adapters", tmp_path))
    assert (config.train.clip_skip, config.data.max_token_length) == (2, 150)


@pytest.mark.parametrize("typed, expected", [
    ("", {}),
    ("--noise-offset 0.05 --lr-scheduler cosine", {"train.noise_offset": 0.05, "optim.lr_scheduler": "cosine"}),
    ("--optimizer-args weight_decay=0.1 'betas=0.9,0.99' --flip",
     {"optim.optimizer_args": ["weight_decay=0.1", "betas=0.9,0.99"], "data.flip": True}),
    ("--up-lr-weight cosine+0.5 --network-dropout 0.1", {"optim.up_lr_weight": "cosine+0.5",
                                                         "network.dropout": 0.1}),
])
def test_more_options_reads_any_train_flag_as_the_cli_does(tmp_path, typed, expected):
    """The Train tab's More options box reaches every option without a box of its own, with the CLI's meaning."""
    from stylelora.app.training import TrainSettings

    settings = TrainSettings(data_dir="d", name="style", more_options=typed)
    assert settings.more_overrides() == expected
    from_cli = overrides_from_args(parse_args(build_parser(), ["train", str(tmp_path), *shlex.split(typed)]))
    from_app = settings.overrides(tmp_path / "adapters", tmp_path)
    assert {key: from_app[key] for key in expected} == {key: from_cli[key] for key in expected}
    assert load_config(None, from_app).train.output_name == "style"


@pytest.mark.parametrize("typed, message", [
    ("--noise_offset 0.05", "--noise_offset: --noise-offset"),  # kohya's spelling: the flag to use
    ("--stesp 3", "--stesp: --steps"),
    ("--rank 4", r"--rank \(its box 'Rank'\)"),  # a box of its own would win without a word
    ("--base sd15 --output elsewhere", "--base \\(the Base model box\\); --output"),
    ("--network-weights a.safetensors", "Start from an adapter"),
    ("--resume latest", "the Resume button"),
    ("--config run.toml", "--config belongs to the command line"),
    ("--help", "--help belongs to the command line"),
    ("--lr-scheduler 'cosine", "cannot read the flags: No closing quotation"),
    ("--steps", "--steps: expected one argument"),
])
def test_more_options_refuses_what_it_cannot_take_and_says_what_to_use(typed, message):
    from stylelora.app.errors import AppError
    from stylelora.app.training import TrainSettings

    with pytest.raises(AppError, match=f"(?s)More options: .*{message}"):
        TrainSettings(data_dir="d", name="style", more_options=typed).more_overrides()
