"""`stylelora app` / `python app.py`: arguments, and serving the Blocks with the app's safety settings.

Importing this module is cheap (the parser is built on every `stylelora` call); gradio loads in `create_app`.
Served: 127.0.0.1 unless --host says otherwise, a public link only with --share, files only from the app's
images/ and grids/ folders (gradio's allowed_paths), uploads capped at --max-upload-mb by gradio and again by the
service, requests queued (--queue-size waiting, --concurrency running) and held to the limits below, gradio's file
cache emptied of files older than --cache-minutes. SIGTERM (`kill`, systemd, `docker stop`) stops the app as Ctrl+C
does, so gradio empties its file cache then too.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_ADAPTERS_DIR = "outputs"
DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_CACHE_MINUTES = 60


def add_app_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to serve on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    parser.add_argument("--adapters-dir", default=DEFAULT_ADAPTERS_DIR,
                        help=f"folder searched for *.safetensors adapters, where images, blends, uploads and "
                             f"training runs go (default {DEFAULT_ADAPTERS_DIR})")
    parser.add_argument("--datasets-dir", default=None,
                        help="folder whose subfolders the Train tab offers as training data, and where uploaded "
                             "training folders go (default: the project's datasets/)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest upload accepted, per file (default {DEFAULT_MAX_UPLOAD_MB} MiB)")
    from stylelora.app.service import NATIVE_SIDE_FACTOR, Limits

    defaults = Limits()
    limits = parser.add_argument_group("limits", "what one request may ask for (shown in the app)")
    for name, flag, help_text in (
            ("max_side", "--max-side", "largest image side in pixels"),
            ("max_steps", "--max-steps", "most sampling steps per image (also each value of a steps grid axis)"),
            ("max_batch", "--max-batch", "most images per Generate"),
            ("max_grid_cells", "--max-grid-cells", "most cells in a Compare grid"),
            ("queue_size", "--queue-size", "requests that may wait in the queue; more are refused"),
            ("concurrency", "--concurrency", "generations and grids running at once (they share the base)")):
        default = getattr(defaults, name)
        shown = default if default is not None else f"{NATIVE_SIDE_FACTOR}× the base's native size"
        limits.add_argument(flag, type=int, default=default, dest=name, help=f"{help_text} (default {shown})")
    parser.add_argument("--cache-minutes", type=int, default=DEFAULT_CACHE_MINUTES,
                        help="delete gradio's copies of served and uploaded files after this many minutes (default "
                             f"{DEFAULT_CACHE_MINUTES}; all are deleted when the app stops on Ctrl+C or SIGTERM)")
    return parser


def add_app_parser(subparsers) -> argparse.ArgumentParser:
    """Add `app` to the `stylelora` subcommands."""
    parser = subparsers.add_parser("app", help="the web app: generate with blends, compare, blend, inspect, train")
    add_app_arguments(parser)
    parser.set_defaults(handler=handle_app)
    return parser


def create_app(adapters_dir: str | os.PathLike = DEFAULT_ADAPTERS_DIR, *, bases=None,
               max_upload_bytes: int | None = None, device: str | None = None,
               datasets_dir: str | os.PathLike | None = None, limits=None,
               cache_minutes: int | None = DEFAULT_CACHE_MINUTES):
    """(Blocks, AppService) for an adapters folder; nothing is served yet."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no phoning home
    from stylelora.app.service import (
        DEFAULT_BASES,
        DEFAULT_MAX_UPLOAD_BYTES,
        PROJECT_DATASETS_DIR,
        AppService,
        Limits,
    )
    from stylelora.app.ui import build_ui

    service = AppService(Path(adapters_dir), bases=tuple(bases or DEFAULT_BASES),
                         max_upload_bytes=max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES, device=device,
                         datasets_dir=Path(datasets_dir) if datasets_dir else PROJECT_DATASETS_DIR,
                         limits=limits or Limits())
    return build_ui(service, cache_seconds=cache_minutes * 60 if cache_minutes else None), service


def serve(demo, service, *, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, share: bool = False,
          prevent_thread_lock: bool = False, quiet: bool = False):
    """Queue and launch `demo`; with prevent_thread_lock it returns at once (tests, notebooks)."""
    from stylelora.app.ui import CSS

    demo.queue(default_concurrency_limit=service.limits.concurrency, max_size=service.limits.queue_size)

    def launch() -> None:
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                    allowed_paths=[str(path) for path in service.served_dirs], max_file_size=service.max_upload_bytes,
                    quiet=quiet, css=CSS)

    if prevent_thread_lock:  # the caller runs on and closes the app itself
        launch()
        return demo
    with sigterm_as_ctrl_c():
        try:
            launch()  # returns once Ctrl+C or SIGTERM stops the server
        except KeyboardInterrupt:  # stopped while gradio was still starting: stop as it does once it waits
            demo.close()
    return demo


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """While the app serves, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl+C does: gradio then closes
    its server, whose shutdown deletes its cached copies of files. Python's default for SIGTERM ends the process at
    once, leaving them in its temp folder. Outside the main thread (where handlers cannot be set) it does nothing."""
    from stylelora.signals import handling

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    with handling(signal.SIGTERM, interrupt):
        yield


def handle_app(args: argparse.Namespace) -> int:
    from stylelora.app.errors import AppError
    from stylelora.app.service import Limits

    try:
        limits = Limits(**{name: getattr(args, name) for name in Limits.FLAGS})
    except AppError as error:
        print(f"stylelora app: {error}", file=sys.stderr)
        return 2
    demo, service = create_app(args.adapters_dir, max_upload_bytes=int(args.max_upload_mb * 2**20),
                               datasets_dir=args.datasets_dir, limits=limits, cache_minutes=args.cache_minutes)
    # Load the default base while the server starts, so the first Generate does not wait for it.
    threading.Thread(target=service.preload, args=(service.bases[0],), daemon=True).start()
    serve(demo, service, host=args.host, port=args.port, share=args.share)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python app.py [--host ...] [--port ...] [--share] [--adapters-dir ...]`."""
    parser = add_app_arguments(argparse.ArgumentParser(prog="app.py", description="The stylelora web app."))
    return handle_app(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
