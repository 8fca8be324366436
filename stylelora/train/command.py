"""Owns `stylelora train`: its arguments, turning them into config overrides, and running the trainer.

Importing this module is cheap (no torch): the parser is built on every `stylelora` call. Every flag defaults to
None, meaning "not given", so `--config run.toml` values stand unless a flag overrides them. Runs unchanged under
`accelerate launch` / `torchrun --nproc_per_node N -m stylelora.cli train ...` (or `-m stylelora.train.command`).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Any

from stylelora.config import OPTION_SPECS, OptionSpec, default_text
from stylelora.kohya_flags import KOHYA_FLAGS


def _argument(spec: OptionSpec) -> dict[str, Any]:
    """argparse keyword arguments for one declared option (stylelora.config holds its type, default and help)."""
    default = default_text(spec)
    kwargs: dict[str, Any] = {"dest": spec.dotted, "default": None,
                              "help": spec.option.help + (f" (default {default})" if default else "")}
    if spec.type is bool and spec.default is None:
        kwargs["action"] = argparse.BooleanOptionalAction  # a preset decides unless --x or --no-x is given
    elif spec.type is bool:
        # A flag switches its option away from the default: --flip sets True, --no-text-encoder sets False.
        kwargs.update(action="store_const", const=not spec.default, help=_flag_help(spec))
    elif spec.option.nargs:
        kwargs.update(nargs=spec.option.nargs, metavar="KEY=VALUE")
    elif spec.type is tuple or typing.get_origin(spec.type) is tuple:
        kwargs["metavar"] = "FILE"  # one prompt per line; read in overrides_from_args
    else:
        kwargs["type"] = _whole_number(spec) if spec.type is int else spec.type
        choices = spec.option.choices  # checked by the config, with its message, not by argparse
        kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else spec.key.upper()
    return kwargs


def _whole_number(spec: OptionSpec):
    """argparse type of an int option whose refusal says what was typed wrong: kohya's `--resolution 512,512` (width,
    height) is one number here, as buckets keep each image's aspect ratio at about that many pixels squared."""
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            pass
        sides = re.split(r"\s*[,x×]\s*", text.strip())
        if spec.key == "resolution" and len(sides) == 2 and all(side.isdigit() for side in sides):
            raise argparse.ArgumentTypeError(
                f"{text!r} is kohya's width,height; here it is one side, --resolution "
                f"{round(math.sqrt(int(sides[0]) * int(sides[1])))} for the same area: images train in buckets of "
                "their own aspect ratio with about that side squared in pixels")
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, e.g. {spec.flag} "
                                         f"{spec.option.example or 1}")
    parse.__name__ = "int"
    return parse


def _flag_help(spec: OptionSpec) -> str:
    """A --no-X flag's help says what the flag does, then the default it turns off. The option's own help describes
    the option ("aspect-ratio buckets (--no-bucketing: every image center-cropped square)"), which next to the flag
    would read as what the flag turns on."""
    match = re.fullmatch(rf"(.*) \({re.escape(spec.flag or '')}: (.*)\)", spec.option.help)
    if spec.default is not True or match is None:
        return spec.option.help
    return f"{match[2]} (default: {match[1]})"


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` to a `stylelora` subparsers object; the handler is set as `handler`."""
    parser = subparsers.add_parser("train", help="train a LoRA from a folder of images",
                                   description="Train a LoRA (UNet + text encoder) from a folder of images.")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="kohya <repeats>_<trigger>/ folders, a flat folder of "
                        "images + .txt captions, or a folder with metadata.jsonl")
    parser.add_argument("--config", metavar="run.toml", help="settings file; flags override its values")
    parser.add_argument("--dry-run", action="store_true", help="check the data, detect the base family and resolve "
                        "every setting without loading weights; writes OUTPUT/config.toml (with --resume: "
                        "OUTPUT/resume-plan.toml) and a summary, trains nothing")
    # Conflicting flags (--no-text-encoder with a text-encoder rate) are refused by the config's checks, with a
    # message that says which to drop, not by argparse groups: both text-encoder rates may be given together.
    for spec in OPTION_SPECS:
        if spec.flag is None or not spec.flag.startswith("--"):
            continue  # TOML-only options, and DATA_DIR above
        parser.add_argument(spec.flag, **_argument(spec))
    parser.set_defaults(handler=handle_train)
    return parser


def unrecognized_message(command: str | None, unknown: list[str], parser: argparse.ArgumentParser | None = None
                         ) -> str:
    """argparse's "unrecognized arguments" message, with what to use instead of each kohya flag or of our own flag
    spelled with '_' (`train`'s parser: `parser`, the options are looked up there)."""
    message = f"unrecognized arguments: {' '.join(unknown)}"
    if command != "train":
        return message
    ours = {option for action in (parser._actions if parser else ()) for option in action.option_strings}
    hints = []
    for token in unknown:
        name = token.split("=", 1)[0]
        key = name.lstrip("-").lower().replace("_", "-")
        if not name.startswith("--") or not key:
            continue
        hint = KOHYA_FLAGS.get(key) or (f"--{key}" if f"--{key}" in ours else None) or _near_flag(f"--{key}", ours)
        if hint:
            hints.append(f"  {name}: {hint}")
    return message + ("\ndid you mean (kohya sd-scripts names and typos → stylelora):\n" + "\n".join(hints)
                      if hints else "")


def _near_flag(flag: str, ours: set[str]) -> str | None:
    """Our flag closest to a mistyped one (--stesp → --steps), or None when none is close: argparse names only the
    unknown flag, and the list of 90 options in --help is a long way to find a swapped letter."""
    import difflib

    close = difflib.get_close_matches(flag, sorted(o for o in ours if o.startswith("--")), n=1, cutoff=0.8)
    return close[0] if close else None


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, but an unknown flag's error names the flag to use (unrecognized_message), and no
    flag is taken for a longer one it begins: argparse's abbreviations read `--lr 1e-4` as `--lr-scheduler 1e-4`."""
    _without_abbreviations(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unrecognized_message(getattr(args, "command", None), unknown, train_parser(parser)))
    return args


def _without_abbreviations(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _without_abbreviations(subparser)


def train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser | None:
    """The `train` subparser of a `stylelora` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get("train")
    return None


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides the command line gives ({"optim.unet_lr": 1e-4, ...}; flags not given are absent)."""
    overrides = {key: value for key, value in vars(args).items() if "." in key and value is not None}
    overrides["data.dir"] = args.data_dir
    if isinstance(overrides.get("train.sample_prompts"), str):
        overrides["train.sample_prompts"] = read_prompts(overrides["train.sample_prompts"])
    return overrides


class _RefusingParser(argparse.ArgumentParser):
    """A parser whose errors are raised, not printed with an exit: flag_overrides runs inside the app's server."""

    def error(self, message: str):
        raise ValueError(message)


def flag_overrides(text: str) -> tuple[dict[str, Any], list[str]]:
    """The config overrides a line of `stylelora train` flags gives (the app's "More options" box), read by the
    CLI's own parser so that each flag means what it means on the command line, and the flags given that are not
    options (--config, --dry-run, --help), which the caller refuses. A bad flag raises ValueError with the CLI's
    message, naming the flag to use for a kohya or mistyped one."""
    import shlex

    try:
        # A no-break space pasted from a web page separates words, as the shell's own spaces do.
        words = shlex.split((text or "").replace("\u00a0", " "))
    except ValueError as error:  # an unclosed quote
        raise ValueError(f"cannot read the flags: {error}") from None
    not_options = [word for word in words if word.split("=", 1)[0] in ("-h", "--help", "--config", "--dry-run")]
    if not_options:
        return {}, not_options
    parser = _RefusingParser(prog="stylelora")
    add_train_parser(parser.add_subparsers(dest="command", required=True, parser_class=_RefusingParser))
    args = parse_args(parser, ["train", "DATA_DIR", *words])
    overrides = overrides_from_args(args)
    overrides.pop("data.dir")
    return overrides, []


def read_prompts(path: str) -> tuple[str, ...]:
    """One prompt per non-empty line of a text file (--sample-prompts FILE); lines starting with '#' are comments,
    as in sd-scripts' prompt files."""
    from stylelora.config import ConfigError
    from stylelora.train.sample_prompts import is_comment

    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--sample-prompts {path}: cannot read it ({error}); give a UTF-8 text file with one "
                          "prompt per line") from None
    prompts = tuple(line.strip() for line in lines if line.strip() and not is_comment(line))
    if not prompts:
        raise ConfigError(f"--sample-prompts {path} holds no prompt; write one prompt per line ('#' starts a "
                          "comment)")
    return prompts


def handle_train(args: argparse.Namespace) -> int:
    from stylelora.config import ConfigError

    try:
        overrides = overrides_from_args(args)
    except ConfigError as error:
        _report(f"stylelora train: {error}")
        return 2
    return train_from_cli(args.config, overrides, dry_run=args.dry_run)


def train_from_cli(config_path: str | None, overrides: dict[str, Any], *, dry_run: bool = False) -> int:
    """Validate, train, print the adapter path last on stdout; input errors become one clear message and exit status 2
    (as in every subcommand), a diverged run exit status 1.

    With dry_run, resolve and check everything, write OUTPUT/config.toml (resume-plan.toml with --resume) and print
    its path instead of training.
    """
    from stylelora.config import ConfigError, load_config

    interruptible()

    try:
        config = load_config(config_path, overrides)
    except ConfigError as error:
        _report(f"stylelora train: {error}")
        return 2
    from stylelora.data.errors import DataError
    from stylelora.models.load import BaseModelError
    from stylelora.train.checkpoint import ResumeError
    from stylelora.optional import MissingPackage
    from stylelora.train.loop import TrainingDiverged, run_training

    try:
        if dry_run:
            from stylelora.train.dry_run import dry_run as plan

            result = plan(config)
        else:
            result = run_training(config)
    except (ConfigError, DataError, BaseModelError, ResumeError, MissingPackage) as error:
        _report(f"stylelora train: error: {error}")
        return 2  # input to fix, as every subcommand reports it (stylelora.user_errors)
    except TrainingDiverged as error:
        _report(f"stylelora train: error: {error}")
        return 1  # the input was fine; the run itself failed
    except KeyboardInterrupt:
        _report(interrupted_message(config.output_dir))
        return 130
    if _is_main_process():
        print(result, flush=True)
    return 0


INTERRUPTED = "stylelora train: interrupted"  # the app leaves this line out: its own message says how to resume


def interrupted_message(run_dir: Path) -> str:
    """What a stopped run keeps and the command that continues it, from the checkpoints on disk."""
    from stylelora.train.checkpoint import checkpoint_step, complete_checkpoints

    kept = complete_checkpoints(run_dir)
    if not kept:
        return (f"{INTERRUPTED} before its first checkpoint, so nothing is kept to continue from; run the command "
                "again to start over (--save-every N writes a checkpoint every N steps).")
    return (f"{INTERRUPTED}; its newest checkpoint is step {checkpoint_step(kept[-1])} ({kept[-1]}). Run the same "
            "command with --resume latest to continue from it.")


def interruptible() -> None:
    """Ctrl-C (SIGINT) stops a run cleanly even when this process inherited SIGINT as ignored.

    Why: a shell starts background jobs (`stylelora app &`, nohup, CI runners) with SIGINT ignored, Python then
    installs no KeyboardInterrupt handler, and the app's Stop button (which sends SIGINT) did nothing: the run
    went on to the end.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by torchrun / accelerate launch; absent in one process


def _report(message: str) -> None:
    # Under torchrun / accelerate launch every process fails the same way: one copy of the message is enough.
    if _is_main_process():
        print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylelora")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m stylelora.train.command train DATA_DIR ...` (the same as `stylelora train ...`)."""
    args = parse_args(build_parser(), argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
