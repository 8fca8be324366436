"""CLI for generation: `stylelora generate | grid | blend | inspect` parsers and handlers.

Handlers turn argparse results into the library's request dataclasses and print the written paths last.
Everything heavy (torch, diffusers) is imported inside handlers so `stylelora --help` stays instant.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DEFAULT_ADAPTERS_DIR = "outputs"
DEFAULT_IMAGES_DIR = "outputs/images"
DEFAULT_GRIDS_DIR = "outputs/grids"
IMAGE_NUMBER = re.compile(r"^(\d{5})-")


def add_generate_parsers(subparsers) -> None:
    """Add generate, grid, blend and inspect to the `stylelora` subcommands."""
    gen = subparsers.add_parser("generate", help="text-to-image with adapters fused at chosen weights")
    _add_generation_args(gen)
    gen.add_argument("--batch", type=int, default=1, help="images per run, seeds SEED, SEED+1, ... (default 1)")
    gen.add_argument("--out", help=f"PNG file or folder (default {DEFAULT_IMAGES_DIR}/NNNNN-SEED.png)")
    gen.set_defaults(handler=cmd_generate)

    grid = subparsers.add_parser("grid", help="X/Y grid: adapters x weights, or two of weight/seed/cfg/steps")
    _add_generation_args(grid)
    grid.add_argument("--x", required=True, metavar="KIND=V1,V2",
                      help="columns; KIND: adapter|weight|unet_weight|te_weight|seed|cfg|steps")
    grid.add_argument("--y", metavar="KIND=V1,V2", help="second axis (rows)")
    grid.add_argument("--out", help=f"grid PNG (default {DEFAULT_GRIDS_DIR}/NNNNN-grid.png)")
    grid.set_defaults(handler=cmd_grid)

    blend = subparsers.add_parser("blend", help="save a weighted mix of adapters as one new adapter")
    blend.add_argument("adapters", nargs="+", metavar="FILE[:W[:TE_W]]")
    blend.add_argument("--out", required=True, help="new .safetensors file (kohya format)")
    mode = blend.add_mutually_exclusive_group()
    mode.add_argument("--rank", type=int, help="re-factorise to this rank by SVD (reports the error per module)")
    mode.add_argument("--exact", action="store_true", help="concatenate ranks: reproduces the blend exactly (default)")
    blend.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    blend.add_argument("--json", action="store_true", help="print the report as JSON")
    blend.set_defaults(handler=cmd_blend)

    inspect = subparsers.add_parser("inspect", help="show an adapter's format, base, rank, modules, triggers, training")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=cmd_inspect)


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help='prompt; may carry A1111 tags like "<lora:stripes:0.8>"')
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:TE_W]]",
                        help="adapter and weights (UNet, then text encoder; default 1); repeatable")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=-1, help="-1: random (the one used is recorded)")
    parser.add_argument("--sampler", help="ddim, euler, euler_a, dpm++_2m, dpm++_2m_karras, unipc, ... "
                                           "(default: the base's own)")
    parser.add_argument("--size", help="WxH or N (default: the base's native size)")
    parser.add_argument("--add-triggers", action="store_true", help="append the adapters' trigger words to the prompt")
    parser.add_argument("--adapters-dir", default=DEFAULT_ADAPTERS_DIR, help="where <lora:NAME> tags are looked up")
    parser.add_argument("--base", default="toy",
                        help="toy (default) | hub id | diffusers folder | single .safetensors file")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a pickle .ckpt base (only files you trust)")


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """"512", "512x768" -> (width, height); None -> (None, None)."""
    if not text:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise ValueError(f"--size {text!r}: write WIDTHxHEIGHT (e.g. 512x768) or one number for a square.")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def request_from_args(args: argparse.Namespace):
    """The GenerateRequest these command-line arguments describe."""
    from stylelora.generate.generate import GenerateRequest
    from stylelora.generate.stack import parse_lora_arg

    width, height = parse_size(args.size)
    return GenerateRequest(
        prompt=args.prompt, negative_prompt=args.negative, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
        seed=args.seed, width=width, height=height, batch_size=getattr(args, "batch", 1),
        loras=tuple(parse_lora_arg(text) for text in args.lora), adapters_dir=Path(args.adapters_dir),
        add_triggers=args.add_triggers,
    )


def _load_pipe(args: argparse.Namespace):
    from stylelora.models.load import load_base

    return load_base(args.base, precision=args.precision, device=args.device, allow_pickle=args.allow_pickle)


def _next_number(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := IMAGE_NUMBER.match(p.name))]
    return max(numbers, default=-1) + 1


def output_paths(out: str | None, seeds: list[int], default_dir: str, suffix: str = "") -> list[Path]:
    """Where each image goes: FILE.png (FILE-1.png, ... for more), or FOLDER/NNNNN-SEED.png numbered on."""
    target = Path(out) if out else Path(default_dir)
    if target.suffix.lower() == ".png":
        if len(seeds) == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{i}.png") for i in range(len(seeds))]
    start = _next_number(target)
    return [target / f"{start + i:05d}-{suffix or seed}.png" for i, seed in enumerate(seeds)]


def _fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input (reported in one line), not a bug (which keeps its traceback)."""
    from stylelora.models.load import BaseModelError

    return (ValueError, FileNotFoundError, BaseModelError)


def _guarded(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except user_errors() as error:
            return _fail(error)

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


@_guarded
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate, save PNGs with A1111 parameters, print their paths."""
    from stylelora.generate.generate import generate, precheck_request

    request = request_from_args(args)
    precheck_request(request)
    results = generate(_load_pipe(args), None, request)
    paths = output_paths(args.out, [r.params.seed for r in results], DEFAULT_IMAGES_DIR)
    for result, path in zip(results, paths):
        result.save(path)
    print(results[0].parameters_text, file=sys.stderr)
    for path in paths:
        print(path)
    return 0


@_guarded
def cmd_grid(args: argparse.Namespace) -> int:
    """Generate an X/Y grid into one labelled PNG, print its path."""
    from stylelora.generate.generate import precheck_request
    from stylelora.generate.xy_grid import parse_axis, xy_grid

    request = request_from_args(args)
    precheck_request(request)
    x_axis, y_axis = parse_axis(args.x), parse_axis(args.y) if args.y else None
    out = output_paths(args.out, [0], DEFAULT_GRIDS_DIR, suffix="grid")[0]
    result = xy_grid(_load_pipe(args), None, request, x_axis, y_axis, out_path=out)
    print(result.path)
    return 0


@_guarded
def cmd_blend(args: argparse.Namespace) -> int:
    """Write the blend, print the error report and the new file's path."""
    import torch

    from stylelora.generate.blend import blend
    from stylelora.generate.stack import parse_lora_arg

    specs = [parse_lora_arg(text) for text in args.adapters]
    report = blend(specs, args.out, rank=args.rank, exact=args.exact, dtype=torch.float16 if args.fp16 else None)
    if args.json:
        print(json.dumps({"path": str(report.path), "mode": report.mode, "rank": report.rank,
                          "max_error": report.max_error, "mean_error": report.mean_error,
                          "module_errors": report.module_errors, "module_ranks": report.module_ranks}))
    else:
        print(report.summary())
        print(report.path)
    return 0


@_guarded
def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what an adapter file is."""
    from stylelora.generate.inspect import format_inspect, inspect_adapter

    info = inspect_adapter(args.file)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0
