"""CLI for generation: `stylelora generate | grid` parsers and handlers.

Handlers turn argparse results into the library's request dataclasses and print the written paths last.
Everything heavy (torch, diffusers) is imported inside handlers so `stylelora --help` stays instant.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from stylelora.atomic import check_file_target
from stylelora.generate.reading_dial import dial_help
from stylelora.lora.blend_modes import mode_help
from stylelora.user_errors import input_errors, report_user_errors

DEFAULT_ADAPTERS_DIR = "outputs"
DEFAULT_IMAGES_DIR = "outputs/images"
DEFAULT_GRIDS_DIR = "outputs/grids"
IMAGE_NUMBER = re.compile(r"^(\d{5})-")


def add_generate_parsers(subparsers) -> None:
    """Add generate and grid to the `stylelora` subcommands."""
    gen = subparsers.add_parser("generate", help="text-to-image with adapters fused at chosen weights")
    _add_generation_args(gen, prompt_nargs="?")
    gen.add_argument("--from-png", metavar="IMAGE.png",
                     help="draw again the image a PNG records (its A1111 parameters, as PNG Info shows them; ours or "
                          "A1111's): a prompt or flag given replaces the recorded one, --lora the recorded adapters")
    gen.add_argument("--batch", type=int, default=1, help="images per run, seeds SEED, SEED+1, ... (default 1)")
    gen.add_argument("--out", help=f"PNG file or folder (default {DEFAULT_IMAGES_DIR}/NNNNN-SEED.png)")
    gen.add_argument("--overwrite", action="store_true", help="replace the --out PNG file(s) if they exist")
    gen.set_defaults(handler=cmd_generate)

    grid = subparsers.add_parser("grid",
                                 help="X/Y(/Z) grid: adapters x weights, or two or three of "
                                      "weight/seed/cfg/steps/sampler/prompt/...")
    _add_generation_args(grid)
    grid.add_argument("--x", required=True, metavar="KIND=V1,V2",
                      help="columns; KIND: adapter|weight|unet_weight|te_weight|blocks|seed|cfg|steps|blend_mode|dial"
                           "|clip_skip|sampler|prompt in any case, or A1111's X/Y/Z plot label (Seed, Steps, "
                           "'CFG Scale', Sampler, 'Prompt S/R', 'Clip skip'), which the grid PNG records; numbers "
                           "take A1111's ranges: steps=10-30 (+10), weight=0-1 [5], seed=1-4; seed=-1 draws a random "
                           "seed, recorded; blocks: lbw= values separated by ';', e.g. blocks=none;OUTALL; prompt: "
                           "A1111's Prompt S/R, the first value the words each value replaces, e.g. "
                           "'prompt=red,blue,\"green, striped\"'")
    grid.add_argument("--y", metavar="KIND=V1,V2", help="second axis (rows)")
    grid.add_argument("--z", metavar="KIND=V1,V2",
                      help="third axis, as A1111's X/Y/Z plot: one X/Y grid per value, side by side under its value "
                           "(without --y, one row each; kinds as --x)")
    grid.add_argument("--out", help=f"grid PNG or folder (default {DEFAULT_GRIDS_DIR}/NNNNN-grid.png)")
    grid.add_argument("--overwrite", action="store_true", help="replace the --out PNG file if it exists")
    grid.set_defaults(handler=cmd_grid)


def _add_generation_args(parser: argparse.ArgumentParser, prompt_nargs: str | None = None) -> None:
    """The flags generate and grid share. Those a PNG records default to None, so that --from-png tells the flags
    given (which replace the recorded values) from those left out (request_from_args gives the defaults)."""
    parser.add_argument("prompt", nargs=prompt_nargs, help='prompt; may carry A1111 tags like "<lora:stripes:0.8>"')
    parser.add_argument("--lora", action="append", metavar="FILE[:W[:TE_W]][:lbw=BLOCKS]",
                        help="adapter and weights (UNet, then text encoder; default 1), and A1111 LoRA Block Weight "
                             "per-block weights (a preset such as OUTALL, or numbers BASE first); repeatable")
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 20, as in A1111)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the base's, 7 on SD "
                                                  "1.x/2.x and SDXL as in A1111, 5 on the toy base)")
    parser.add_argument("--seed", type=int, help="-1: random, the default (the one used is recorded)")
    parser.add_argument("--sampler", help="ddim, euler, euler_a, dpm++_2m, dpm++_2m_karras, unipc, ... "
                                           "(default: the base's own)")
    parser.add_argument("--size", help="WxH or N (default: the base's native size)")
    parser.add_argument("--add-triggers", action="store_true", help="put the adapters' trigger words the prompt lacks in front of it")
    parser.add_argument("--blend-mode", default=None, metavar="MODE",
                        help="how 2+ adapters combine where they share a layer: " + mode_help())
    parser.add_argument("--dial", default=None, metavar="DIAL", help=dial_help())
    parser.add_argument("--clip-skip", type=int, metavar="N",
                        help="read the prompt from the text encoder's N-th layer from the end, as A1111's Clip skip "
                             "(default 1, the last; 2 for models and LoRAs trained with kohya's --clip_skip 2; SD "
                             "1.x/2.x, ignored on SDXL as A1111 does)")
    parser.add_argument("--adapters-dir", default=DEFAULT_ADAPTERS_DIR, help="where <lora:NAME> tags are looked up")
    parser.add_argument("--base", default="toy",
                        help="toy (default) | hub id | diffusers folder | single .safetensors file (SD 1.x/2.x, SDXL)")
    parser.add_argument("--base-config", help="diffusers config folder (or cached hub id) for a single-file base")
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


def request_from_args(args: argparse.Namespace, recorded: str | None = None):
    """The GenerateRequest these command-line arguments describe; with `recorded` (the A1111 parameters of
    --from-png), the request those record, with the prompt and the flags given in place of the recorded ones."""
    from stylelora.generate.generate import GenerateRequest, request_from_parameters, with_overrides

    given = _given_settings(args)
    fixed = {"batch_size": getattr(args, "batch", 1), "adapters_dir": Path(args.adapters_dir),
             "add_triggers": args.add_triggers}
    if recorded is not None:
        # Drawn with the recorded adapters, are they the files it was drawn with? Read from the files, before the base
        # loads (minutes on a real one).
        keeps_adapters = args.prompt is None and args.lora is None
        request = request_from_parameters(recorded, args.adapters_dir, check_files=keeps_adapters)
        if args.prompt is not None:
            given["prompt"] = args.prompt
        elif "loras" in given:  # they replace the recorded adapters, which are the tags of the recorded prompt
            from stylelora.generate.prompt_tags import parse_prompt

            given["prompt"] = parse_prompt(request.prompt)[0]
        return with_overrides(request, **given, **fixed)
    if args.prompt is None:
        raise ValueError('Give a prompt (stylelora generate "a red star"), or --from-png IMAGE.png to draw again the '
                         "image a PNG records.")
    steps, cfg = sampling_settings(args)
    return GenerateRequest(prompt=args.prompt, **{**given, "steps": steps, "cfg": cfg}, **fixed)


def _given_settings(args: argparse.Namespace) -> dict:
    """The GenerateRequest fields of the flags given (flags left out are None: the request's default, or the
    value --from-png's image records)."""
    from stylelora.lora.spec import parse_lora_arg

    width, height = parse_size(args.size)
    settings = {
        "negative_prompt": args.negative, "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
        "seed": args.seed, "width": width, "height": height, "blend_mode": args.blend_mode, "dial": args.dial,
        "clip_skip": args.clip_skip,
        "loras": None if args.lora is None else tuple(parse_lora_arg(text) for text in args.lora),
    }
    return {field: value for field, value in settings.items() if value is not None}


def sampling_settings(args: argparse.Namespace) -> tuple[int, float]:
    """--steps and --cfg, each the base family's default where not given (read from its config files, no weights)."""
    if args.steps is not None and args.cfg is not None:
        return args.steps, args.cfg
    from stylelora.presets import base_sampling_defaults

    steps, cfg = base_sampling_defaults(args.base, config_dir=args.base_config, allow_pickle=args.allow_pickle)
    return args.steps if args.steps is not None else steps, args.cfg if args.cfg is not None else cfg


def _load_pipe(args: argparse.Namespace):
    from stylelora.models.load import load_base

    return load_base(args.base, precision=args.precision, device=args.device, allow_pickle=args.allow_pickle,
                     config_dir=args.base_config)


def _check_block_weights(args: argparse.Namespace, request, axes=()) -> None:
    """Block weights of a length the base does not take fail here, read from its config files, before its weights
    load (a single-file base without a config folder is checked when it loads)."""
    from stylelora.generate.prompt_tags import parse_prompt
    from stylelora.generate.xy_grid import NO_BLOCKS
    from stylelora.lora.block_weights import BlockLayout
    from stylelora.models.family import base_unet_config

    values = [spec.blocks for spec in request.loras] + [tag.blocks for tag in parse_prompt(request.prompt)[1]]
    values += [value for axis in axes if axis.kind == "blocks" for value in axis.values if value != NO_BLOCKS]
    values = [value for value in values if value is not None]
    if not values:
        return
    config = base_unet_config(args.base, config_dir=args.base_config, allow_pickle=args.allow_pickle)
    layout = BlockLayout.from_config(config) if config else None
    for value in values if layout else ():
        layout.multipliers(value)


def _next_number(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := IMAGE_NUMBER.match(p.name))]
    return max(numbers, default=-1) + 1


def check_output_target(out: str | None, overwrite: bool, count: int = 1) -> None:
    """Refuse an --out that cannot be written, or would replace images without --overwrite, before any image is
    drawn (on a real base that takes minutes). `count`: how many images go there (FILE-0.png, FILE-1.png, ...)."""
    if not out:
        return
    # The files this run writes, not --out itself, are what must not be replaced: with --batch 2, x-0.png, x-1.png.
    check_file_target("--out", out, ".png", example="", kind="a PNG, which carries the generation parameters",
                      overwrite=True, folders=True)
    taken = [path for path in output_paths(out, list(range(count)), "") if path.is_file()]
    if taken and not overwrite:
        more = " ..." if len(taken) > 3 else ""
        which = f"--out {out}" if taken == [Path(out)] else f"--out {out}: {', '.join(map(str, taken[:3]))}{more}"
        raise ValueError(f"{which} exists already: give another name, or a folder (images are numbered on in it), "
                         "or add --overwrite to replace it.")


def output_paths(out: str | None, seeds: list[int], default_dir: str, suffix: str = "") -> list[Path]:
    """Where each image goes: FILE.png (FILE-1.png, ... for more), or FOLDER/NNNNN-SEED.png numbered on."""
    target = Path(out) if out else Path(default_dir)
    if target.suffix.lower() == ".png":
        if len(seeds) == 1:
            return [target]
        return [target.with_name(f"{target.stem}-{i}.png") for i in range(len(seeds))]
    start = _next_number(target)
    return [target / f"{start + i:05d}-{suffix or seed}.png" for i, seed in enumerate(seeds)]


def _print_notes(notes: list[str]) -> None:
    for note in notes:  # beside the `error: ...` lines bad input gets
        print(f"warning: {note}", file=sys.stderr)


def read_from_png(path: str) -> str:
    """The A1111 parameters text --from-png's image records (checked to read back), or a refusal that says what to
    give instead: the file is missing, is not an image, or carries none."""
    from stylelora.generate.pngmeta import parse_parameters, read_png_parameters

    instead = "a PNG that stylelora or A1111 saved (its PNG Info shows the parameters)"
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"--from-png {path} {'is a folder' if target.is_dir() else 'does not exist'}: give "
                                f"the path of {instead}.")
    try:
        text = read_png_parameters(target)
    except OSError:  # PIL's "cannot identify image file" among them
        raise ValueError(f"--from-png {path} is not an image that can be read: give {instead}.") from None
    except ValueError:
        raise ValueError(f"--from-png {path} carries no A1111 parameters (an editor or an upload may have stripped "
                         f"them): give {instead}, or type the prompt and flags yourself.") from None
    try:
        parse_parameters(text)
    except ValueError as error:
        raise ValueError(f"--from-png {path}: {error} Type the prompt and flags yourself instead.") from None
    return text


def _recorded_base_notes(recorded: str, pipe, args: argparse.Namespace) -> list[str]:
    """A note where --from-png's image was drawn on another base than --base (by its recorded Model hash)."""
    from stylelora.generate.base_identity import base_identity
    from stylelora.generate.pngmeta import parse_parameters

    params, identity = parse_parameters(recorded), base_identity(pipe)
    if not params.model_hash or not identity.hash or params.model_hash == identity.hash:
        return []
    return [f"{args.from_png} was drawn on {params.model or 'another base'} (Model hash {params.model_hash}), not on "
            f"--base {args.base} ({identity.hash}): it will not come out the same; give --base that model to draw "
            "it again."]


@report_user_errors(input_errors)
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate (or, with --from-png, draw a recorded image again), save PNGs with A1111 parameters, print their
    paths."""
    from stylelora.generate.generate import generate, precheck_request

    recorded = read_from_png(args.from_png) if args.from_png else None
    request = request_from_args(args, recorded)
    notes = precheck_request(request)
    check_output_target(args.out, args.overwrite, args.batch)
    _check_block_weights(args, request)
    _print_notes(notes)
    pipe = _load_pipe(args)
    if recorded is not None:
        _print_notes(_recorded_base_notes(recorded, pipe, args))
    results = generate(pipe, None, request)
    paths = output_paths(args.out, [r.params.seed for r in results], DEFAULT_IMAGES_DIR)
    for result, path in zip(results, paths):
        result.save(path)
    print(results[0].parameters_text, file=sys.stderr)
    for path in paths:
        print(path)
    return 0


@report_user_errors(input_errors)
def cmd_grid(args: argparse.Namespace) -> int:
    """Generate an X/Y grid (with --z, one per Z value side by side) into one labelled PNG, print its path."""
    from stylelora.generate.xy_grid import parse_axis, precheck_grid, xy_grid

    request = request_from_args(args)
    axes = [parse_axis(args.x)] + [parse_axis(text) if text else None for text in (args.y, args.z)]
    notes = precheck_grid(request, *axes)
    check_output_target(args.out, args.overwrite)
    _check_block_weights(args, request, [axis for axis in axes if axis is not None])
    out = output_paths(args.out, [0], DEFAULT_GRIDS_DIR, suffix="grid")[0]
    _print_notes(notes)
    result = xy_grid(_load_pipe(args), None, request, *axes, out_path=out)
    print(result.path)
    return 0
