"""CLI for adapter files: `stylelora blend | inspect` parsers and handlers.

Handlers print the written path (or the report) last. torch is imported inside handlers so `stylelora --help`
stays instant.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from stylelora.lora.blend_modes import mode_help
from stylelora.user_errors import input_errors, report_user_errors


def add_lora_parsers(subparsers) -> None:
    """Add blend and inspect to the `stylelora` subcommands."""
    blend = subparsers.add_parser("blend", help="save a weighted mix of adapters as one new adapter")
    blend.add_argument("adapters", nargs="+", metavar="FILE[:W[:TE_W]][:lbw=BLOCKS]",
                       help="adapters and weights; lbw= bakes A1111 LoRA Block Weight per-block weights into the file")
    blend.add_argument("--out", required=True, help="new .safetensors file (kohya format)")
    mode = blend.add_mutually_exclusive_group()
    mode.add_argument("--rank", type=int, help="re-factorise to this rank by SVD (reports the error per module)")
    mode.add_argument("--exact", action="store_true",
                      help="keep every rank: reproduces the blend exactly (a sum does by default; a ties merge is "
                           "otherwise stored by SVD at the inputs' total rank)")
    blend.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    blend.add_argument("--overwrite", action="store_true", help="replace --out if it exists (its sidecar and card "
                                                                "are rewritten with it)")
    blend.add_argument("--blend-mode", default=None, metavar="MODE",
                       help="how adapters combine where they share a layer: " + mode_help(saving=True))
    blend.add_argument("--preview", metavar="IMAGE",
                       help="an image made with the blend (e.g. by `stylelora generate`): saved as NAME.preview.png "
                            "and as the file's thumbnail")
    blend.add_argument("--license", help="license named in the file and the model card (default: the inputs' "
                                         "license when they share one, else unspecified)")
    blend.add_argument("--base", metavar="BASE",
                       help="with lbw= block weights: the base whose UNet blocks they number, read from its config "
                            "files (hub id, diffusers folder, single file, or toy; default: the published layout of "
                            "the adapters' family)")
    blend.add_argument("--base-config", metavar="DIR",
                       help="diffusers config folder (or cached hub id) for a single-file --base")
    blend.add_argument("--json", action="store_true", help="print the report as JSON")
    blend.set_defaults(handler=cmd_blend)

    inspect = subparsers.add_parser("inspect", help="show an adapter's format, base, rank, modules, triggers, training")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=cmd_inspect)


@report_user_errors(input_errors)
def cmd_blend(args: argparse.Namespace) -> int:
    """Write the blend, print the error report and the new file's path."""
    import torch

    from stylelora.lora.blend import blend
    from stylelora.lora.spec import parse_lora_arg
    from stylelora.share import thumbnail_data_uri, write_bundle

    specs = [parse_lora_arg(text) for text in args.adapters]
    preview = Path(args.preview) if args.preview else None
    if preview is not None and not preview.is_file():
        raise FileNotFoundError(f"--preview {preview}: no such image; make one with `stylelora generate ... --lora "
                                f"{args.out}`, then blend again with --preview")
    report = blend(specs, args.out, rank=args.rank, exact=args.exact, dtype=torch.float16 if args.fp16 else None,
                   blend_mode=args.blend_mode, license=args.license, overwrite=args.overwrite,
                   thumbnail=thumbnail_data_uri(preview) if preview else None, unet_config=_blocks_config(args, specs))
    bundle = write_bundle(report.path, preview=preview)
    if args.json:
        print(json.dumps({"path": str(report.path), "mode": report.mode, "rank": report.rank,
                          "blend_mode": report.blend_mode,
                          "max_error": report.max_error, "mean_error": report.mean_error,
                          "module_errors": report.module_errors, "module_ranks": report.module_ranks,
                          "bundle": [str(path) for path in bundle]}))
    else:
        print(report.summary())
        print("share bundle: " + ", ".join(path.name for path in bundle))
        print(report.path)
    return 0


def _blocks_config(args: argparse.Namespace, specs) -> dict | None:
    """The UNet config --base names, where block weights need one: from its config files, a single file's as loading
    finds them (--base-config, else the Hugging Face cache); a single file without any says so."""
    if args.base is None and args.base_config is not None:
        raise ValueError("--base-config is the config folder of a single-file --base: pass --base FILE too, "
                         "or drop it.")
    if args.base is None or all(spec.blocks is None for spec in specs):
        return None
    from stylelora.models.family import base_unet_config

    config = base_unet_config(args.base, config_dir=args.base_config, cached=True)
    if config is None:
        raise ValueError(f"--base {args.base}: a single file without a config folder, and none is in the local "
                         "Hugging Face cache; pass --base-config DIR (a diffusers folder of the same architecture), "
                         "or apply the block weights at generation (--lora FILE:W:lbw=...).")
    return config


@report_user_errors(input_errors)
def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what an adapter file is."""
    from stylelora.lora.inspect import format_inspect, inspect_adapter

    info = inspect_adapter(args.file)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0
