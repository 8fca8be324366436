"""The `stylelora` command line: argument parsing and dispatch only; heavy libraries are imported inside handlers."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_base_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="toy", help="toy (default) | hub id | diffusers folder | single .safetensors file")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading a pickle .ckpt base (runs code: only for files you trust)")


def _blend_mode_help() -> str:
    from .lora.blend_modes import mode_help

    return mode_help()


def _dial_help() -> str:
    from .generate.reading_dial import dial_help

    return dial_help()


def _checked_evaluate_inputs(args: argparse.Namespace) -> tuple[tuple[str, ...], str, str, list]:
    """(prompt sets, blend mode, dial, adapter specs), each checked: a typo, a bad --lora or a missing file fails
    here, before the base model loads."""
    from .generate.reading_dial import check_dial
    from .lora.blend_modes import check_mode
    from .lora.spec import parse_lora_arg
    from .toy.evaluate import PROMPT_SETS, prompt_set_styles

    if args.samples < 1:
        raise ValueError(f"--samples {args.samples}: give at least 1 prompt per prompt set (e.g. --samples 32).")
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give at least 1 sampling step (e.g. --steps 25).")
    if args.save_grid:  # written after every image is drawn (minutes on a real base): checked first
        from .atomic import check_file_target

        check_file_target("--save-grid", args.save_grid, ".png", example="eval.png", kind="a PNG",
                          overwrite=args.overwrite)
    prompt_sets = tuple(args.prompt_set or PROMPT_SETS)
    for name in prompt_sets:
        prompt_set_styles(name)
    specs = [parse_lora_arg(text) for text in args.lora]
    for spec in specs:
        if not spec.path.exists():
            from .lora.io import missing_adapter_message

            raise FileNotFoundError(missing_adapter_message(spec.path))
    return prompt_sets, check_mode(args.blend_mode), check_dial(args.dial), specs


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .user_errors import input_errors, report_user_errors

    return report_user_errors(input_errors)(_evaluate)(args)


def _evaluate(args: argparse.Namespace) -> int:
    from .toy.evaluate import EvalSettings, evaluate_pipeline
    from .toy.judge import load_judge
    from .models.load import load_base

    prompt_sets, blend_mode, dial, specs = _checked_evaluate_inputs(args)
    pipe = load_base(args.base, precision=args.precision, allow_pickle=args.allow_pickle)
    if specs:
        from .generate.stack import apply_adapters

        apply_adapters(pipe, specs, blend_mode, dial)
    settings = EvalSettings(samples=args.samples, seed=args.seed, steps=args.steps, guidance_scale=args.cfg,
                            prompt_sets=prompt_sets)
    metrics, images = evaluate_pipeline(pipe, load_judge(), settings)
    metrics["settings"]["adapters"] = list(args.lora)
    # the mode only matters with two or more adapters: one adapter is the same in every mode
    metrics["settings"]["blend_mode"] = blend_mode if len(args.lora) > 1 else None
    metrics["settings"]["dial"] = dial if args.lora else None
    if args.save_grid:
        from .grid import save_grid

        save_grid(images, Path(args.save_grid), columns=args.samples)
    print(json.dumps(metrics) if args.json else _format_metrics(metrics))
    return 0


def _format_metrics(metrics: dict) -> str:
    def figure(key: str) -> str:
        return "n/a" if metrics[key] is None else f"{metrics[key]:.3f}"

    lines = [f"shape accuracy {figure('shape_accuracy')}   color accuracy {figure('color_accuracy')}",
             f"stripes rate {figure('stripes_rate')}   pastel rate {figure('pastel_rate')}   zorb rate {figure('zorb_rate')}"]
    for name, row in metrics["by_prompt_set"].items():
        lines.append(f"  {name:8s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None))
    settings = metrics["settings"]
    if settings.get("blend_mode"):
        lines.append(f"blend mode {settings['blend_mode']} ({len(settings['adapters'])} adapters)")
    if settings.get("dial") == "reading":
        lines.append("weight dial: reading (the weights moved the text encoder's readings)")
    return "\n".join(lines)


def _cmd_share(args: argparse.Namespace) -> int:
    from .share import default_out, pack

    source = Path(args.run_dir)
    try:
        print(pack(source, Path(args.out) if args.out else default_out(source), overwrite=args.overwrite,
                   preview=Path(args.preview) if args.preview else None, draw=not args.no_preview, base=args.base,
                   say=lambda line: print(line, file=sys.stderr)))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_toy(args: argparse.Namespace) -> int:
    if args.toy_command == "datasets":
        from .toy.datasets import write_all

        for path in write_all(Path(args.root)):
            print(path)
    elif args.toy_command == "build-base":
        from .toy.base_build import TOY_BASE_DIR, build_base

        out = build_base(Path(args.work_dir), Path(args.out) if args.out else TOY_BASE_DIR, seed=args.seed,
                         vae_steps=args.vae_steps, decoder_steps=args.decoder_steps, denoiser_steps=args.steps,
                         tune=_tune_steps(args))
        print(out)
    elif args.toy_command == "assemble":
        from .toy.base_build import TOY_BASE_DIR, assemble_from_snapshot

        print(assemble_from_snapshot(Path(args.work_dir), Path(args.snapshot), Path(args.out) if args.out else TOY_BASE_DIR,
                                     tune=_tune_steps(args)))
    elif args.toy_command == "tune-base":
        from .toy.base_build import TOY_BASE_DIR, tune_base

        base = Path(args.base) if args.base else TOY_BASE_DIR
        print(tune_base(base, Path(args.out) if args.out else base, **_tune_steps(args)))
    elif args.toy_command == "train-judge":
        from .toy.judge_train import train_judge

        print(train_judge(Path(args.out) if args.out else None, seed=args.seed))
    return 0


def _tune_steps(args: argparse.Namespace) -> dict:
    return {"texture_steps": args.texture_steps, "denoiser_steps": args.tune_steps, "word_steps": args.word_steps}


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--texture-steps", type=int, default=1500, help="decoder tuning, texture pass (default 1500)")
    parser.add_argument("--tune-steps", type=int, default=1000,
                        help="decoder tuning on the UNet's own latents (default 1000)")
    parser.add_argument("--word-steps", type=int, default=500,
                        help="UNet + text encoder taught to ignore words they never trained on (default 500)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylelora", description="Train and blend LoRA adapters for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    from .app.launch import add_app_parser
    from .generate.command import add_generate_parsers
    from .lora.command import add_lora_parsers
    from .train.command import add_train_parser

    add_train_parser(sub)
    add_generate_parsers(sub)
    add_lora_parsers(sub)
    add_app_parser(sub)
    ev = sub.add_parser("evaluate", help="score a base (+ adapters) with the toy-world judge")
    _add_base_args(ev)
    ev.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:TE_W]][:lbw=BLOCKS]")
    ev.add_argument("--blend-mode", default=None, metavar="MODE",
                    help="how 2+ adapters combine, as `generate --blend-mode`: " + _blend_mode_help())
    ev.add_argument("--dial", default=None, metavar="DIAL", help="as `generate --dial`: " + _dial_help())
    ev.add_argument("--samples", type=int, default=32, help="prompts per prompt set (plain, stripes, pastel, zorb)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--steps", type=int, default=25)
    ev.add_argument("--cfg", type=float, default=5.0)
    ev.add_argument("--prompt-set", action="append", metavar="NAME",
                    help="prompt sets to generate (repeatable; default plain, stripes, pastel, zorb); a blend set "
                         "such as stripes+pastel carries both triggers and reports all_styles_rate")
    ev.add_argument("--save-grid", metavar="PNG", help="also save every generated image in one grid")
    ev.add_argument("--overwrite", action="store_true", help="replace the --save-grid PNG if it exists")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(handler=_cmd_evaluate)

    share = sub.add_parser("share", help="pack a run's adapter, preview, A1111 sidecar and model card into a zip")
    share.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `stylelora train`, or an adapter "
                       "file (a blend's NAME.safetensors)")
    share.add_argument("--out", metavar="NAME.zip", help="the zip to write (default: NAME.zip beside RUN_DIR)")
    share.add_argument("--overwrite", action="store_true", help="replace an existing --out zip")
    shown = share.add_mutually_exclusive_group()
    shown.add_argument("--preview", metavar="IMAGE.png", help="use this image as NAME.preview.png (default: the "
                       "run's first sample; where it kept none, one drawn like `stylelora generate`: the card's "
                       "prompt on the adapter's base, seed 0)")
    shown.add_argument("--no-preview", action="store_true", help="draw no preview where the run kept none")
    share.add_argument("--base", metavar="BASE", help="the base to draw the preview on (default: the one the run's "
                       "config.toml or the adapter's metadata records): toy, hub id, diffusers folder or .safetensors")
    share.set_defaults(handler=_cmd_share)

    toy = sub.add_parser("toy", help="the toy world: datasets, judge, toy base")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    ds = toy_sub.add_parser("datasets", help="(re)write datasets/toy-* bit-identically")
    ds.add_argument("--root", default="datasets")
    bb = toy_sub.add_parser("build-base", help="train the embedded toy base (VAE, then UNet + text encoder)")
    bb.add_argument("--work-dir", default="outputs/toy-base-build")
    bb.add_argument("--out", help="where the diffusers folder goes (default: inside the package)")
    bb.add_argument("--seed", type=int, default=0)
    bb.add_argument("--vae-steps", type=int, default=4000, help="VAE steps (stops early at 29 dB on every style)")
    bb.add_argument("--decoder-steps", type=int, default=2000, help="decoder-only fine-tune steps")
    bb.add_argument("--steps", type=int, default=7000, help="UNet + text-encoder steps")
    _add_tune_arguments(bb)
    asm = toy_sub.add_parser("assemble", help="write the toy base from one saved UNet + text-encoder snapshot of a build")
    asm.add_argument("--work-dir", default="outputs/toy-base-build")
    asm.add_argument("--snapshot", required=True, help="e.g. outputs/toy-base-build/denoiser/step_002000")
    asm.add_argument("--out", help="where the diffusers folder goes (default: inside the package)")
    _add_tune_arguments(asm)
    td = toy_sub.add_parser("tune-base", help="the last build stage: match the decoder to the UNet, then teach "
                            "the UNet to ignore words it never trained on")
    td.add_argument("--base", help="toy base folder (default: the one inside the package)")
    td.add_argument("--out", help="where the tuned base goes (default: in place)")
    _add_tune_arguments(td)
    tj = toy_sub.add_parser("train-judge", help="train the judge classifier")
    tj.add_argument("--out")
    tj.add_argument("--seed", type=int, default=0)
    toy.set_defaults(handler=_cmd_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .train.command import parse_args

    args = parse_args(build_parser(), argv)  # argparse's, naming our flag for a kohya one
    try:
        return args.handler(args)
    except BrokenPipeError:
        # `stylelora inspect FILE | head` closed the pipe: stop quietly as `ls | head` does, not with a traceback.
        # stdout is pointed at /dev/null so the interpreter's final flush does not raise the same error again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the status a shell reports for a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
