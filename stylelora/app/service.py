"""What the app does, without any UI: the same library calls as the CLI, plus the app's safety rules.

The UI (stylelora.app.ui) only turns widget values into these calls and their results into widget updates; tests
call the service directly. Safety by construction:
- adapters are named relative to the adapters folder and resolved only inside it (no `..`, absolute paths or
  symlinks leading out), by the same resolver `<lora:name>` prompt tags use;
- uploads are size-capped and must parse as a LoRA safetensors file before they are copied in;
- every file the app writes goes into the adapters folder (images/, grids/, uploads/, blends, training runs),
  atomically.
Generation is serialised where it must be: the adapter stack fuses a blend into the shared pipeline's weights and
holds its lock while sampling (`generate()` does this), so concurrent requests with different blends each get
exactly the image they would get alone.
"""
from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MAX_UPLOAD_BYTES = 512 * 2**20
DEFAULT_BASES = ("toy",)
IMAGES_FOLDER = "images"
GRIDS_FOLDER = "grids"
UPLOADS_FOLDER = "uploads"
BLENDS_FOLDER = "blends"
MAX_STEPS = 150
MAX_BATCH = 16
MAX_SIDE = 2048
WEIGHT_LIMIT = 2.0  # the sliders' range; the library itself accepts any finite weight
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")

Progress = Callable[[int, int], None]


class AppError(ValueError):
    """A request the app refuses; the message says why and what to do instead (shown to the user as is)."""


@dataclass(frozen=True)
class AdapterWeight:
    """One adapter of a blend, by name inside the adapters folder, with its UNet and text-encoder weights."""

    name: str
    unet: float = 1.0
    te: float | None = None  # None: the UNet weight


@dataclass(frozen=True)
class GenerateSettings:
    """Everything the Generate tab sends. size: "" (the base's native size), "N" or "WxH"; seed -1: random."""

    prompt: str
    negative_prompt: str = ""
    adapters: tuple[AdapterWeight, ...] = ()
    base: str = "toy"
    steps: int = 20
    cfg: float = 5.0
    sampler: str | None = None
    seed: int = -1
    size: str = ""
    batch_size: int = 1


@dataclass(frozen=True)
class SavedImage:
    """A generated image and the PNG it was written to (with its A1111 `parameters` text)."""

    result: Any  # GeneratedImage
    path: Path

    @property
    def parameters_text(self) -> str:
        return self.result.parameters_text

    @property
    def seed(self) -> int:
        return self.result.params.seed


@dataclass(frozen=True)
class BlendResult:
    name: str
    path: Path
    summary: str


def plain_name(text: str, what: str) -> str:
    """A file name the user typed, checked: no folders, no odd characters, and without `.safetensors`."""
    name = (text or "").strip().removesuffix(".safetensors")
    if not PLAIN_NAME.match(name):
        raise AppError(f"{what} {text!r} is not a plain name: use letters, digits, '.', '_', '-' or spaces "
                       "(no '/' or '..'), e.g. 'stripes-pastel'.")
    return name


@dataclass
class AppService:
    """The app's state (adapters folder, loaded base models) and every action its tabs offer."""

    adapters_dir: Path = Path("outputs")
    bases: Sequence[str] = DEFAULT_BASES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    device: str | None = None
    precision: str = "fp32"
    _pipes: dict = field(default_factory=dict, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _save_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _training: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.adapters_dir = Path(self.adapters_dir).absolute()
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.bases = tuple(self.bases)
        if not self.bases:
            raise AppError("The app needs at least one base model to offer (e.g. 'toy').")

    # ------------------------------------------------------------------ folders the app writes (and serves)

    @property
    def images_dir(self) -> Path:
        return self.adapters_dir / IMAGES_FOLDER

    @property
    def grids_dir(self) -> Path:
        return self.adapters_dir / GRIDS_FOLDER

    @property
    def served_dirs(self) -> list[Path]:
        """The only folders the web server may serve files from: generated images and grids."""
        for folder in (self.images_dir, self.grids_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return [self.images_dir, self.grids_dir]

    # ------------------------------------------------------------------ adapters

    def adapter_names(self) -> list[str]:
        """Every adapter under the adapters folder, by the name tags and the UI use (relative, no suffix)."""
        from stylelora.generate.prompt_tags import list_adapters

        return list(list_adapters(self.adapters_dir))

    def adapter_path(self, name: str) -> Path:
        """The file an adapter name means, inside the adapters folder only; AppError otherwise."""
        from stylelora.generate.prompt_tags import resolve_adapter_name

        if not isinstance(name, str) or not name.strip():
            raise AppError("Choose an adapter first.")
        return resolve_adapter_name(name.strip(), self.adapters_dir)

    def import_upload(self, upload: str | Path, original_name: str | None = None) -> str:
        """Check an uploaded file (size cap, LoRA safetensors) and copy it into uploads/; returns its name."""
        from stylelora.atomic import write_bytes_atomic
        from stylelora.lora.adapter_file import check_adapter_file

        source = Path(upload)
        label = Path(original_name or source.name).name
        if Path(label).suffix.lower() != ".safetensors":
            raise AppError(f"{label} is not a .safetensors file. Only safetensors adapters are accepted "
                           "(.ckpt/.pt/.bin files are pickles, which can run code when loaded).")
        size = source.stat().st_size
        if size > self.max_upload_bytes:
            raise AppError(f"{label} is {size / 2**20:.1f} MiB; uploads up to "
                           f"{self.max_upload_bytes / 2**20:g} MiB are accepted.")
        layout = check_adapter_file(source, self.max_upload_bytes)
        if layout == "peft":
            raise AppError(f"{label} is a plain peft adapter, whose strength lives in adapter_config.json beside "
                           "it; copy the folder into the adapters folder, or convert it to a kohya file first.")
        folder = self.adapters_dir / UPLOADS_FOLDER
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(label).stem).strip("._") or "adapter"
        with self._save_lock:
            target, number = folder / f"{stem}.safetensors", 1
            while target.exists():
                target, number = folder / f"{stem}-{number}.safetensors", number + 1
            write_bytes_atomic(target, source.read_bytes())
        return target.relative_to(self.adapters_dir).with_suffix("").as_posix()

    def inspect(self, name: str, as_json: bool = False) -> str:
        """What `stylelora inspect` prints for the adapter: layout, base family, ranks, triggers, training."""
        from stylelora.lora.inspect import format_inspect, inspect_adapter

        info = inspect_adapter(self.adapter_path(name))
        return json.dumps(info, indent=2) if as_json else format_inspect(info)

    def prompt_with_triggers(self, prompt: str, names: Sequence[str]) -> str:
        """The prompt with the chosen adapters' trigger words appended (those not in it already)."""
        from stylelora.lora.inspect import adapter_trigger_words

        words = [word for name in names for word in adapter_trigger_words(self.adapter_path(name))]
        missing = [w for w in dict.fromkeys(words) if w.lower() not in (prompt or "").lower()]
        return ", ".join(part for part in [(prompt or "").strip(), *missing] if part)

    def specs(self, adapters: Sequence[AdapterWeight]):
        """AdapterSpecs for the blend, every name resolved inside the adapters folder."""
        from stylelora.lora.spec import AdapterSpec

        specs = []
        for adapter in adapters:
            for label, weight in (("UNet", adapter.unet), ("text-encoder", adapter.te)):
                if weight is not None and not (math.isfinite(weight) and abs(weight) <= WEIGHT_LIMIT):
                    raise AppError(f"The {label} weight of {adapter.name} must be between -{WEIGHT_LIMIT:g} and "
                                   f"{WEIGHT_LIMIT:g} (got {weight}).")
            specs.append(AdapterSpec(self.adapter_path(adapter.name), float(adapter.unet),
                                     None if adapter.te is None else float(adapter.te)))
        return tuple(specs)

    # ------------------------------------------------------------------ base models

    def _check_base(self, base: str) -> None:
        if base not in self.bases:
            raise AppError(f"Base model {base!r} is not offered by this app (choose one of {', '.join(self.bases)}).")

    def preload(self, base: str, pipe=None):
        """Load a base now (or adopt an already loaded pipeline for it, e.g. in a notebook); returns it."""
        if pipe is None:
            return self.pipeline(base)
        self._check_base(base)
        pipe.set_progress_bar_config(disable=True)
        with self._load_lock:
            self._pipes[base] = pipe
        return pipe

    def pipeline(self, base: str):
        """The loaded base (one per name, loaded once, shared by every request: its adapter stack guards it)."""
        self._check_base(base)
        with self._load_lock:
            pipe = self._pipes.get(base)
            if pipe is None:
                from stylelora.models.load import load_base

                pipe = load_base(base, precision=self.precision, device=self.device)
                pipe.set_progress_bar_config(disable=True)
                self._pipes[base] = pipe
        return pipe

    # ------------------------------------------------------------------ generation

    def request(self, settings: GenerateSettings):
        """The library's GenerateRequest for these settings, checked against the app's limits."""
        from stylelora.generate.command import parse_size
        from stylelora.generate.generate import GenerateRequest

        if not 1 <= int(settings.steps) <= MAX_STEPS:
            raise AppError(f"Steps must be between 1 and {MAX_STEPS} (got {settings.steps}).")
        if not 1 <= int(settings.batch_size) <= MAX_BATCH:
            raise AppError(f"Batch size must be between 1 and {MAX_BATCH} (got {settings.batch_size}).")
        width, height = parse_size(settings.size.strip() if settings.size and settings.size != "native" else None)
        if max(width or 0, height or 0) > MAX_SIDE:
            raise AppError(f"Images up to {MAX_SIDE}x{MAX_SIDE} are offered (got {settings.size}).")
        return GenerateRequest(
            prompt=settings.prompt or "", negative_prompt=settings.negative_prompt or "", steps=int(settings.steps),
            cfg=float(settings.cfg), sampler=settings.sampler or None, seed=int(settings.seed), width=width,
            height=height, batch_size=int(settings.batch_size), loras=self.specs(settings.adapters),
            adapters_dir=self.adapters_dir,  # <lora:name> tags in the prompt resolve here, and only here
        )

    def generate(self, settings: GenerateSettings, progress: Progress | None = None) -> list[SavedImage]:
        """Generate and save each image as a PNG carrying its A1111 parameters (images/NNNNN-SEED.png)."""
        from stylelora.generate.generate import generate, precheck_request

        request = self.request(settings)
        precheck_request(request)  # bad tags or files fail before a base loads
        results = generate(self.pipeline(settings.base), None, request, progress=progress)
        return self._save(results, [r.params.seed for r in results], self.images_dir)

    def _save(self, items: list, labels: list, folder: Path) -> list[SavedImage]:
        from stylelora.generate.command import output_paths

        with self._save_lock:  # concurrent requests must not pick the same next number
            paths = output_paths(None, labels, str(folder))
            return [SavedImage(item, item.save(path)) for item, path in zip(items, paths)]

    def grid(self, settings: GenerateSettings, x: str, y: str | None = None,
             progress: Progress | None = None) -> Path:
        """An X/Y grid ("KIND=V1,V2,..." axes; adapter axes name adapters in the folder) saved in grids/."""
        from dataclasses import replace

        from stylelora.generate.command import output_paths
        from stylelora.generate.generate import precheck_request
        from stylelora.generate.xy_grid import NO_ADAPTER, parse_axis, xy_grid

        axes = []
        for text in (x, y):
            if not text or not text.strip():
                axes.append(None)
                continue
            axis = parse_axis(text)
            if axis.kind == "adapter":  # names -> files inside the folder, before the grid sees them
                values = tuple(v if v == NO_ADAPTER else str(self.adapter_path(v)) for v in axis.values)
                axis = replace(axis, values=values)
            axes.append(axis)
        if axes[0] is None:
            raise AppError("Give the X axis, e.g. weight=0,0.5,1 or seed=1,2,3.")
        kinds = {axis.kind for axis in axes if axis is not None}
        if kinds & {"weight", "unet_weight", "te_weight"} and not settings.adapters and "adapter" not in kinds:
            raise AppError("A weight axis sets the weights of the chosen adapters: choose adapters first "
                           "(or add an adapter axis, e.g. adapter=none,NAME).")
        request = self.request(settings)
        precheck_request(request)
        pipe = self.pipeline(settings.base)
        with self._save_lock:
            out = output_paths(None, [0], str(self.grids_dir), suffix="grid")[0]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.touch()  # reserve the number; the grid replaces it atomically
        try:
            return xy_grid(pipe, None, request, axes[0], axes[1], out_path=out, progress=progress).path
        except BaseException:
            out.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ blend

    def blend(self, adapters: Sequence[AdapterWeight], name: str, rank: int | None = None,
              fp16: bool = False, overwrite: bool = False) -> BlendResult:
        """Save the mix as blends/NAME.safetensors: exact (rank None) or truncated to `rank` by SVD."""
        from stylelora.lora.blend import blend

        specs = self.specs(adapters)
        if not specs:
            raise AppError("Choose at least one adapter to blend.")
        out = self.adapters_dir / BLENDS_FOLDER / f"{plain_name(name, 'Blend name')}.safetensors"
        if out.exists() and not overwrite:
            raise AppError(f"{out.relative_to(self.adapters_dir)} exists already: choose another name or tick "
                           "'overwrite'.")
        dtype = None
        if fp16:
            import torch

            dtype = torch.float16
        report = blend(specs, out, rank=int(rank) if rank else None, dtype=dtype)
        saved = out.relative_to(self.adapters_dir).with_suffix("").as_posix()
        return BlendResult(saved, out, report.summary())

    # ------------------------------------------------------------------ training

    def start_training(self, settings):
        """Start `stylelora train` on a folder (one run at a time); the adapter lands in the adapters folder."""
        from stylelora.app.training import TrainingJob

        self._check_base(settings.base)
        current = self._training
        if current is not None and current.running:
            raise AppError(f"A training run ({current.name}) is in progress; wait for it or stop it first.")
        self._training = TrainingJob.start(settings, self.adapters_dir)
        return self._training

    @property
    def training(self):
        """The current (or last) training run, or None."""
        return self._training
