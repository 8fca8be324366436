"""Owns `stylelora train`: its arguments, turning them into config overrides, and running the trainer.

Importing this module is cheap (no torch): the parser is built on every `stylelora` call. Every flag defaults to
None, meaning "not given", so `--config run.toml` values stand unless a flag overrides them. Runs unchanged under
`accelerate launch` / `torchrun --nproc_per_node N -m stylelora.cli train ...` (or `-m stylelora.train.command`).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from stylelora.config import CLI_FLAGS, DATA_CACHES, FORMATS, LR_SCHEDULERS, OPTIMIZERS, PRECISIONS, UNET_TARGETS

# (config field, argparse keyword arguments). The flag itself comes from config.CLI_FLAGS, so errors name it too.
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("train.base", {"help": "base model: toy (default) | diffusers folder | .safetensors file | cached hub id"}),
    ("train.output", {"help": "run folder (default outputs/NAME); gets NAME.safetensors, config.toml, samples, logs"}),
    ("train.output_name", {"help": "adapter file name without .safetensors (default: the data folder's name)"}),
    ("train.steps", {"type": int, "help": "optimizer steps (default 1000)"}),
    ("train.batch_size", {"type": int, "help": "images per batch per process (default 16)"}),
    ("train.seed", {"type": int, "help": "seed for LoRA init, batch order, noise (default 0)"}),
    ("train.precision", {"metavar": "{" + ",".join(PRECISIONS) + "}",
                         "help": "base weights / autocast; LoRA stays fp32"}),
    ("train.resume", {"metavar": "PATH|latest", "help": "continue a run exactly from a checkpoint folder, or latest"}),
    ("train.format", {"metavar": "{" + ",".join(FORMATS) + "}", "help": "adapter key layout (default kohya)"}),
    ("train.save_every", {"type": int, "help": "checkpoint every N steps (0 = none; default 250)"}),
    ("train.keep_checkpoints", {"type": int, "help": "keep the last K checkpoints (default 3)"}),
    ("train.sample_every", {"type": int, "help": "sample grid every N steps (0 = only at the end; default 250)"}),
    ("train.min_snr_gamma", {"type": float, "help": "min-SNR loss weighting gamma (0 = off; default 5)"}),
    ("train.noise_offset", {"type": float, "help": "noise offset (default 0)"}),
    ("train.preserve_base", {"type": float, "help": "weight of the loss that keeps the base model's output on "
                                                    "captions with the trigger words removed, so the adapter acts "
                                                    "only when its trigger is in the prompt (0 = off; default 1)"}),
    ("train.preserve_decoys", {"type": float, "help": "share of those trigger-free captions that get a random "
                                                      "other word in the trigger's place, so the adapter answers "
                                                      "its own trigger, not any new word (default 0.5)"}),
    ("train.decoy_company", {"type": float, "help": "share of the captions with the trigger that also get a "
                                                    "random other word beside it, so the adapter still acts when "
                                                    "a prompt names other adapters' triggers too (default 0; 0.5 "
                                                    "for a style to stack; it weakens a character)"}),
    ("train.gradient_checkpointing", {"action": "store_true", "help": "trade compute for memory"}),
    ("train.overwrite", {"action": "store_true", "help": "start a new run in a folder that holds one"}),
    ("network.rank", {"type": int, "help": "LoRA rank (default 16)"}),
    ("network.alpha", {"type": float, "help": "LoRA alpha; scale = alpha/rank (default 16)"}),
    ("network.unet_targets", {"metavar": "{" + ",".join(UNET_TARGETS) + "}", "help": "UNet layers (default kohya)"}),
    ("network.conv_rank", {"type": int, "help": "rank of the conv layers with --unet-targets locon"}),
    ("optim.optimizer", {"metavar": "{" + ",".join(OPTIMIZERS) + "}", "help": "default adamw"}),
    ("optim.unet_lr", {"type": float, "help": "UNet learning rate (default 1e-3 at toy scale; ~1e-4 for SD 1.5)"}),
    ("optim.lr_scheduler", {"metavar": "{" + ",".join(LR_SCHEDULERS) + "}", "help": "default cosine"}),
    ("optim.warmup_steps", {"type": int, "help": "LR warmup steps (default: steps/10, at most 50)"}),
    ("optim.grad_accum", {"type": int, "help": "gradient accumulation steps (default 1)"}),
    ("optim.max_grad_norm", {"type": float, "help": "gradient clipping norm (0 = off; default 1)"}),
    ("data.trigger", {"help": "trigger word(s) added in front of every caption"}),
    ("data.reg_dir", {"help": "regularization images (kohya reg folder, same layouts): as many reg samples per "
                              "epoch as training samples, so prompts without the trigger keep the base's look"}),
    ("data.resolution", {"type": int, "help": "training size (default: the base's native size)"}),
    ("data.cache", {"metavar": "{" + ",".join(DATA_CACHES) + "}", "help": "latent cache (default ram)"}),
    ("data.cache_dir", {"help": "folder of the disk cache (default OUTPUT/cache)"}),
    ("data.flip", {"action": "store_true", "help": "random horizontal flips"}),
    ("data.shuffle_tags", {"action": "store_true", "help": "shuffle comma-separated caption tags"}),
    ("data.keep_tokens", {"type": int, "help": "leading tags kept in place when shuffling (default 1)"}),
    ("data.caption_dropout", {"type": float, "help": "probability of training a sample with an empty caption "
                                                     "(default 0.1: guidance then does not exaggerate the style)"}),
]


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train` to a `stylelora` subparsers object; the handler is set as `handler`."""
    parser = subparsers.add_parser("train", help="train a LoRA from a folder of images",
                                   description="Train a LoRA (UNet + text encoder) from a folder of images.")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="kohya <repeats>_<trigger>/ folders, a flat folder of "
                        "images + .txt captions, or a folder with metadata.jsonl")
    parser.add_argument("--config", metavar="run.toml", help="settings file; flags override its values")
    for dotted, kwargs in OPTIONS:
        flag = CLI_FLAGS.get(dotted) or "--" + dotted.partition(".")[2].replace("_", "-")
        parser.add_argument(flag, dest=dotted, default=None, **kwargs)
    parser.add_argument("--base-config", dest="train.base_config", default=None,
                        help="diffusers config folder for a single-file base")
    parser.add_argument("--allow-pickle", dest="train.allow_pickle", action="store_true", default=None,
                        help="allow a pickle .ckpt base (only for files you trust)")
    text_encoder = parser.add_mutually_exclusive_group()
    text_encoder.add_argument("--text-encoder-lr", dest="optim.text_encoder_lr", type=float, default=None,
                              help="text-encoder learning rate (default 2e-4 at toy scale; ~5e-5 for SD 1.5)")
    text_encoder.add_argument("--no-text-encoder", dest="network.train_text_encoder", action="store_const",
                              const=False, default=None, help="train the UNet only")
    parser.set_defaults(handler=handle_train)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides the command line gives ({"optim.unet_lr": 1e-4, ...}; flags not given are absent)."""
    overrides = {key: value for key, value in vars(args).items() if "." in key and value is not None}
    overrides["data.dir"] = args.data_dir
    return overrides


def handle_train(args: argparse.Namespace) -> int:
    return train_from_cli(args.config, overrides_from_args(args))


def train_from_cli(config_path: str | None, overrides: dict[str, Any]) -> int:
    """Validate, train, print the adapter path last on stdout; user errors become one clear message and exit 1."""
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
    from stylelora.train.loop import TrainingDiverged, run_training
    from stylelora.train.optim import OptimizerUnavailable

    try:
        adapter = run_training(config)
    except (ConfigError, DataError, BaseModelError, ResumeError, OptimizerUnavailable, TrainingDiverged) as error:
        _report(f"stylelora train: error: {error}")
        return 1
    except KeyboardInterrupt:
        _report(f"stylelora train: interrupted. Run the same command with --resume latest to continue from the last "
                f"checkpoint in {config.output_dir / 'checkpoints'} (one is written every --save-every steps).")
        return 130
    if _is_main_process():
        print(adapter, flush=True)
    return 0


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
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
