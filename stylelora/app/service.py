"""What the app does, without any UI: the same library calls as the CLI, plus the app's safety rules.

The UI (stylelora.app.ui) only turns widget values into these calls and their results into widget updates; tests
call the service directly. Safety by construction:
- adapters are named relative to the adapters folder and resolved only inside it (no `..`, absolute paths or
  symlinks leading out), by the same resolver `<lora:name>` prompt tags use; deleting and renaming stay inside it;
- training data folders are named relative to the datasets folder and resolved only inside it;
- uploads are size-capped and must load on the base as generation would (layout, modules and shapes, finite
  values) before they are copied in;
- every request is held to the server's Limits (max side, steps, batch, grid cells), with the limit named; the
  max side is by default relative to the base's native size (a toy base asked for 1024 px would run for minutes);
- every file the app writes goes into the adapters or datasets folder, atomically.
Generation is serialised where it must be: the adapter stack fuses a blend into the shared pipeline's weights and
holds its lock while sampling (`generate()` does this), so concurrent requests with different blends each get
exactly the image they would get alone. A request can be stopped between sampling steps (`cancelled`).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stylelora.app.errors import PLAIN_NAME, AppError, plain_name

DEFAULT_MAX_UPLOAD_BYTES = 512 * 2**20
DEFAULT_BASES = ("toy",)
PROJECT_DATASETS_DIR = Path(__file__).resolve().parents[2] / "datasets"
IMAGES_FOLDER = "images"
GRIDS_FOLDER = "grids"
UPLOADS_FOLDER = "uploads"
BLENDS_FOLDER = "blends"
MAX_ADAPTERS = 4  # adapters in one blend (the Generate tab's rows)
WEIGHT_LIMIT = 2.0  # the sliders' range; the library itself accepts any finite weight
CFG_LIMIT = 30.0
CLIP_SKIP_LIMIT = 12  # SD 1.x's text encoder has 12 layers; the draw refuses a skip that leaves a base none
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
MAX_DATASET_FILES = 10_000
NATIVE_SIDE_FACTOR = 2  # the default max side: this many times the base's native size (--max-side sets one for all)
# The aspect ratios (W:H) whose sizes the Generate tab offers, each as the base's training bucket nearest it.
COMMON_ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9))

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for on this server (`stylelora app --max-side ...`); shown in the UI."""

    max_side: int | None = None  # None: NATIVE_SIDE_FACTOR × the base's native size (side_limit)
    max_steps: int = 150
    max_batch: int = 8
    max_grid_cells: int = 25
    queue_size: int = 32
    concurrency: int = 2

    FLAGS = {"max_side": "--max-side", "max_steps": "--max-steps", "max_batch": "--max-batch",
             "max_grid_cells": "--max-grid-cells", "queue_size": "--queue-size", "concurrency": "--concurrency"}

    def __post_init__(self) -> None:
        for name in self.FLAGS:
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise AppError(f"{self.FLAGS[name]} must be at least 1 (got {getattr(self, name)}).")

    def summary(self, sides: dict[str, int] | None = None) -> str:
        """The limits in a sentence; `sides`: each base's largest side, named where --max-side leaves it per base."""
        side = (f"{self.max_side} px a side" if self.max_side else
                ", ".join(f"{high} px a side on {base}" for base, high in sides.items()) +
                f" ({NATIVE_SIDE_FACTOR}× the native size)" if sides else
                f"{NATIVE_SIDE_FACTOR}× the base's native size a side")
        return (f"Server limits: images up to {side}, {self.max_steps} steps, batch "
                f"{self.max_batch}, grids of {self.max_grid_cells} cells; {self.concurrency} jobs run at a time and "
                f"{self.queue_size} can wait (each waiting request shows its place in the queue).")

    def side_limit(self, native: int) -> int:
        """The largest image side on a base of this native size: --max-side if given, else NATIVE_SIDE_FACTOR × it."""
        return self.max_side or NATIVE_SIDE_FACTOR * native

    def check_side(self, label: str, value: Any, base: str, native: int) -> int:
        """An image side held to side_limit; refused with the limit named and, by default, the base's native size."""
        if self.max_side:
            return self.check(label, value, 8, "max_side")
        high = self.side_limit(native)
        return self.check(label, value, 8, high, why=(
            f"{high} is this server's limit for {base}, {NATIVE_SIDE_FACTOR}× its native size of {native} px (start "
            "the app with --max-side N to allow up to N px on every base)"))

    def check(self, label: str, value: Any, low: float, limit: str | float, *, whole: bool = True,
              why: str | None = None) -> float:
        """`value` as a number in [low, limit] (limit: a field of these Limits, or a fixed bound); AppError naming
        the limit otherwise (`why`: what to say about a fixed bound)."""
        high = getattr(self, limit) if isinstance(limit, str) else limit
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise AppError(f"{label} must be a number (got {value!r}).") from None
        if not math.isfinite(number) or (whole and number != int(number)):
            raise AppError(f"{label} must be a {'whole ' if whole else ''}number (got {value!r}).")
        if not low <= number <= high:
            if isinstance(limit, str):
                why = f"{_plain_number(high)} is this server's limit ({self.FLAGS[limit]} when starting the app)"
            where = f"; {why}" if why else ""
            raise AppError(f"{label} must be between {_plain_number(low)} and {_plain_number(high)} (got {value!r})"
                           f"{where}.")
        return int(number) if whole else number


def _largest_side(geometry: dict[str, int], high: int) -> int:
    """The largest image side up to `high` that a base of this geometry draws (a multiple of its downsampling)."""
    step = geometry["downsample_factor"]
    return max(high // step * step, step)


def _plain_number(number: float) -> str:
    """A bound as a person reads it: 4294967295, not :g's 4.29497e+09 (a seed's); 0.5 as 0.5."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


@dataclass(frozen=True)
class AdapterWeight:
    """One adapter of a blend, by name inside the adapters folder, with its UNet and text-encoder weights and its
    block weights as A1111's LoRA Block Weight writes them (stylelora.lora.block_weights; None: every block at 1)."""

    name: str
    unet: float = 1.0
    te: float | None = None  # None: the UNet weight
    blocks: str | None = None


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
    blend_mode: str | None = None  # how 2+ adapters combine (stylelora.lora.blend_modes; None: its default)
    dial: str | None = None  # what the weights turn (stylelora.generate.reading_dial; None: A1111's LoRA weights)
    clip_skip: int = 1  # A1111's Clip skip: the text encoder's layer the prompt is read from, counted from the end


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
class AdapterCard:
    """One card of A1111's Lora cards (extra networks): what clicking it writes into the prompt, and what it shows.

    From NAME.json (A1111's sidecar, stylelora.share.a1111_sidecar) where there is one; else weight 1 and the
    trigger words the adapter's metadata records."""

    name: str  # as a <lora:NAME:W> tag writes it (AppService.adapter_names)
    preview: Path | None  # NAME.preview.png beside the adapter
    weight: float  # the sidecar's "preferred weight"
    activation_text: str  # the sidecar's "activation text": the trigger words clicking the card adds
    description: str = ""

    @property
    def tag(self) -> str:
        from stylelora.generate.prompt_tags import format_lora_tag

        return format_lora_tag(self.name, self.weight)


@dataclass(frozen=True)
class BlendResult:
    name: str
    path: Path
    summary: str


@dataclass(frozen=True)
class Upload:
    """An adapter copied in: its name, and what the check noted (modules the base lacks, skipped)."""

    name: str
    notes: tuple[str, ...] = ()


@dataclass
class AppService:
    """The app's state (adapters and datasets folders, loaded base models) and every action its tabs offer."""

    adapters_dir: Path = Path("outputs")
    bases: Sequence[str] = DEFAULT_BASES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    device: str | None = None
    precision: str = "fp32"
    datasets_dir: Path = PROJECT_DATASETS_DIR
    limits: Limits = field(default_factory=Limits)
    _pipes: dict = field(default_factory=dict, repr=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _save_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _training: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.adapters_dir = Path(self.adapters_dir).absolute()
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.datasets_dir = Path(self.datasets_dir).absolute()
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
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

    def shown(self, text: str) -> str:
        """A message with the server's absolute folders written as the adapters/datasets folder's own name."""
        roots = sorted({(str(root), root.name) for folder in (self.adapters_dir, self.datasets_dir)
                        for root in (folder, folder.resolve())}, key=lambda pair: -len(pair[0]))
        for root, name in roots:
            text = text.replace(root + os.sep, name + "/").replace(root, name)
        return text

    # ------------------------------------------------------------------ adapters

    def adapter_names(self, checkpoints: bool = False) -> list[str]:
        """The finished adapters under the adapters folder, by the name tags and the UI use (relative, no suffix);
        with `checkpoints`, also the adapters training runs save at each checkpoint (is_checkpoint)."""
        from stylelora.generate.prompt_tags import is_checkpoint, list_adapters

        return [name for name in list_adapters(self.adapters_dir) if checkpoints or not is_checkpoint(name)]

    def adapter_path(self, name: str) -> Path:
        """The file an adapter name means, inside the adapters folder only; AppError otherwise."""
        from stylelora.generate.prompt_tags import resolve_adapter_name

        if not isinstance(name, str) or not name.strip():
            raise AppError("Choose an adapter first.")
        return resolve_adapter_name(name.strip(), self.adapters_dir)

    def import_upload(self, upload: str | Path, original_name: str | None = None, base: str | None = None) -> Upload:
        """Check an uploaded file and copy it into uploads/; nothing is written unless every check passes.

        Checks: .safetensors, the size cap, a LoRA layout, and that it loads on `base` (the first offered by
        default) as generation would load it: modules and shapes of this base's family, finite values.
        """
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
                           f"{self.max_upload_bytes / 2**20:g} MiB are accepted (--max-upload-mb).")
        layout = check_adapter_file(source, self.max_upload_bytes)
        if layout == "peft":
            raise AppError(f"{label} is a plain peft adapter, whose strength lives in adapter_config.json beside "
                           "it; copy the folder into the adapters folder, or convert it to a kohya file first.")
        base = base or self.bases[0]
        data = source.read_bytes()
        notes = self.stack(base).check(source)  # raises when it does not fit this base or is not finite
        folder = self.adapters_dir / UPLOADS_FOLDER
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(label).stem).strip("._") or "adapter"
        with self._save_lock:
            target, number = folder / f"{stem}.safetensors", 1
            while target.exists():
                target, number = folder / f"{stem}-{number}.safetensors", number + 1
            write_bytes_atomic(target, data)
        return Upload(target.relative_to(self.adapters_dir).with_suffix("").as_posix(), tuple(notes))

    def own_adapter(self, name: str) -> Path:
        """The file of an adapter listed under exactly this name (for changes: no stem guessing, no links)."""
        from stylelora.generate.prompt_tags import list_adapters
        from stylelora.lora.adapter_file import PEFT_WEIGHTS_NAME

        path = self.adapter_path(name)  # refuses traversal, absolute paths and links out, with the tags' message
        found = list_adapters(self.adapters_dir).get(str(name).strip())
        if found is None or found != path:
            raise AppError(f"No adapter named {name!r} in the adapters folder: choose one from the list.")
        if path.is_symlink() or path.name == PEFT_WEIGHTS_NAME:
            raise AppError(f"{name} is a link or a peft folder; change it on the server itself.")
        return path

    def delete_adapter(self, name: str, confirm: bool = False) -> str:
        """Delete an adapter file of the adapters folder (with its .json / .preview.png beside it)."""
        path = self.own_adapter(name)
        if not confirm:
            raise AppError(f"Deleting {name} cannot be undone: confirm it first.")
        with self._save_lock:
            for sidecar in _sidecars(path):
                sidecar.unlink(missing_ok=True)
            path.unlink()
        self._forget(path)
        return f"Deleted {name}."

    def plan_rename(self, name: str, new_name: str) -> tuple[Path, str]:
        """(target file, its adapter name) for renaming `name` to `new_name`; AppError if that is not allowed."""
        self.own_adapter(name)
        parts = [part.strip() for part in str(new_name or "").strip().removesuffix(".safetensors").split("/")]
        # One message for the whole name, as typed: a part alone ('..' of '../../x') would not say where it is.
        if not all(PLAIN_NAME.match(part) for part in parts):
            raise AppError(f"New name {new_name!r} is not a plain name: use NAME or FOLDER/NAME, each part of "
                           "letters, digits, '.', '_', '-' or spaces (no '..' or leading '/'), e.g. 'stripes-pastel' "
                           "or 'styles/stripes-pastel'.")
        if len(parts) > 3 or parts[0] in (IMAGES_FOLDER, GRIDS_FOLDER):
            raise AppError(f"New name {new_name!r}: use NAME or FOLDER/NAME (at most 3 levels), outside the "
                           f"{IMAGES_FOLDER}/ and {GRIDS_FOLDER}/ folders.")
        target = self.adapters_dir.joinpath(*parts[:-1], parts[-1] + ".safetensors")
        relative = "/".join(parts)
        if target.exists() or target.is_symlink():
            raise AppError(f"{relative} exists already: choose another name.")
        for folder in target.parents:  # no existing link on the way may lead out
            if folder == self.adapters_dir:
                break
            if folder.exists() and not folder.resolve().is_relative_to(self.adapters_dir.resolve()):
                raise AppError(f"New name {new_name!r} leads outside the adapters folder.")
        return target, relative

    def rename_adapter(self, name: str, new_name: str, confirm: bool = False) -> str:
        """Rename (or move into a subfolder) an adapter, inside the adapters folder only; never over another file."""
        path = self.own_adapter(name)
        target, relative = self.plan_rename(name, new_name)
        if not confirm:
            raise AppError(f"Renaming {name} to {relative}: confirm it first.")
        with self._save_lock:
            if target.exists() or target.is_symlink():
                raise AppError(f"{relative} exists already: choose another name.")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
            for sidecar in _sidecars(path):
                os.rename(sidecar, target.with_name(target.stem + sidecar.name[len(path.stem):]))
        self._forget(path)
        return f"Renamed {name} to {relative}."

    def _forget(self, path: Path) -> None:
        with self._load_lock:
            pipes = list(self._pipes.values())
        for pipe in pipes:
            self.stack(pipe).forget(path)

    def read_parameters(self, path: str | Path):
        """The GenerateRequest that draws an image again from the A1111 `parameters` its PNG carries (ours or
        A1111's): its adapters as <lora:...> tags in the prompt, resolved in the adapters folder when it is drawn (a
        name two files share told apart by the recorded hash). AppError when the file holds none."""
        from stylelora.generate.generate import request_from_parameters
        from stylelora.generate.pngmeta import read_png_parameters

        try:
            return request_from_parameters(read_png_parameters(path), self.adapters_dir)
        except (ValueError, OSError) as error:  # no parameters, not A1111's, not an image
            name, text = Path(path).name, str(error)
            raise AppError(text if name in text else f"{name}: {text}") from None

    def inspect(self, name: str, as_json: bool = False) -> str:
        """What `stylelora inspect` prints for the adapter: layout, base family, ranks, triggers, training."""
        from stylelora.lora.inspect import format_inspect, inspect_adapter

        info = inspect_adapter(self.adapter_path(name))
        # The file's path as the adapters folder's, as in every message: the JSON held the server's absolute path.
        return self.shown(json.dumps(info, indent=2) if as_json else format_inspect(info))

    def prompt_with_triggers(self, prompt: str, names: Sequence[str]) -> str:
        """The prompt with the chosen adapters' trigger words in front (those not in it already), as `generate
        --add-triggers` puts them."""
        from stylelora.lora.inspect import adapter_trigger_words, with_trigger_words

        return with_trigger_words(prompt, [word for name in names for word in adapter_trigger_words(self.adapter_path(name))])

    def adapter_cards(self) -> list[AdapterCard]:
        """A1111's Lora cards of the finished adapters (adapter_names), in the order the adapter list has them."""
        return [self.adapter_card(name) for name in self.adapter_names()]

    def adapter_card(self, name: str) -> AdapterCard:
        """The card of one adapter: its sidecar's preferred weight and activation text, else weight 1 and its trigger
        words; its preview image where there is one. An unreadable file gets a card without trigger words: the page
        stays usable, and generating with it says what is wrong with the file."""
        from stylelora.lora.adapter_file import AdapterFileError
        from stylelora.lora.inspect import adapter_trigger_words
        from stylelora.share import preview_path

        path = self.adapter_path(name)
        sidecar = _read_card_sidecar(path)
        activation = sidecar.get("activation text")
        if not isinstance(activation, str):
            try:
                activation = ", ".join(adapter_trigger_words(path))
            except AdapterFileError:
                activation = ""
        description = sidecar.get("description")
        preview = preview_path(path)
        return AdapterCard(name.strip(), preview if preview.is_file() else None, _preferred_weight(sidecar),
                           activation.strip(), description.strip() if isinstance(description, str) else "")

    def with_card(self, prompt: str, name: str) -> str:
        """The prompt after a click on the adapter's card, as A1111 has it: its `<lora:NAME:W>` tag appended (after
        a space) with its activation text put in front where the prompt lacks it (as `--add-triggers` does); or,
        where a tag of that adapter is in the prompt already, the prompt without that tag (a second click undoes
        the first; the trigger words stay, as they may have been typed)."""
        from stylelora.generate.prompt_tags import TAG_PATTERN, tag_name
        from stylelora.lora.inspect import with_trigger_words

        card, prompt = self.adapter_card(name), prompt or ""
        own = [match.group(0) for match in TAG_PATTERN.finditer(prompt) if tag_name(match.group(1)) == card.name]
        if own:
            for tag in own:  # each with the blanks before it, so that no double space is left where it was
                prompt = re.sub(rf"[ \t]*{re.escape(tag)}", "", prompt, count=1)
            return prompt.strip()
        words = [word.strip() for word in card.activation_text.split(",") if word.strip()]
        return f"{with_trigger_words(prompt, words)} {card.tag}".strip()

    def specs(self, adapters: Sequence[AdapterWeight]):
        """AdapterSpecs for the blend, every name resolved inside the adapters folder."""
        from stylelora.lora.block_weights import BlockWeightError
        from stylelora.lora.spec import AdapterSpec

        if len(adapters) > MAX_ADAPTERS:
            raise AppError(f"At most {MAX_ADAPTERS} adapters can be blended at once (got {len(adapters)}): remove "
                           f"{len(adapters) - MAX_ADAPTERS}, or save a blend of some of them first (Blend tab).")
        specs = []
        for adapter in adapters:
            for label, weight in (("UNet", adapter.unet), ("text-encoder", adapter.te)):
                if weight is not None and not (math.isfinite(weight) and abs(weight) <= WEIGHT_LIMIT):
                    raise AppError(f"The {label} weight of {adapter.name} must be between -{WEIGHT_LIMIT:g} and "
                                   f"{WEIGHT_LIMIT:g} (got {weight}).")
            try:
                specs.append(AdapterSpec(self.adapter_path(adapter.name), float(adapter.unet),
                                         None if adapter.te is None else float(adapter.te), adapter.blocks))
            except BlockWeightError as error:
                raise AppError(f"Block weights of {adapter.name}: {error}") from None
        return tuple(specs)

    # ------------------------------------------------------------------ base models

    def _check_base(self, base: str) -> None:
        if base not in self.bases:
            raise AppError(f"Base model {base!r} is not offered by this app (choose one of {', '.join(self.bases)}).")

    def native_geometry(self, base: str) -> dict[str, int]:
        """The base's native image size and the factor its sides divide by, as training reads them: from its config
        files (no weights), else from the model, loaded if need be (a single file without a config folder)."""
        from stylelora.models.family import config_folder, folder_geometry

        self._check_base(base)  # a name from a client is never resolved unless the app offers it
        folder = config_folder(base)
        if folder is not None:
            return folder_geometry(folder)
        from stylelora.train.loop import model_geometry

        return model_geometry(self.pipeline(base))

    def max_side(self, base: str) -> int:
        """The largest image side a request may ask of this base (Limits.side_limit)."""
        return self.limits.side_limit(self.native_geometry(base)["native_resolution"])

    def sampling_defaults(self) -> tuple[int, float]:
        """(steps, CFG) the Generate tab starts with: the first base's family's, as `stylelora generate` takes them."""
        from stylelora.presets import base_sampling_defaults

        return base_sampling_defaults(self.bases[0])

    def limits_summary(self) -> str:
        """Limits.summary with each offered base's largest side in pixels, where its config files tell it (a base
        that must load to tell is left to the generic wording rather than loaded for a header)."""
        from stylelora.models.family import config_folder

        if self.limits.max_side or not all(config_folder(base) is not None for base in self.bases):
            return self.limits.summary()
        return self.limits.summary({base: self.max_side(base) for base in self.bases})

    def _check_native_side(self, base: str) -> None:
        """'native' is held to --max-side too: on a base whose native size is larger, it is refused, the largest
        size allowed named (it was drawn at the native size, over the limit the header states)."""
        if not self.limits.max_side:
            return  # the default limit is twice the native size
        geometry = self.native_geometry(base)
        native, high = geometry["native_resolution"], self.limits.max_side
        if native > high:
            side = _largest_side(geometry, high)
            raise AppError(f"The native size of {base} is {native} px a side, over this server's limit of {high} px "
                           f"(--max-side when starting the app): choose a size up to {high} px, e.g. {side}x{side}.")

    def size_choices(self, base: str) -> list[str]:
        """The sizes the Generate tab offers for a base: "native", then the base's training buckets (about its
        native area, sides a multiple of its downsampling factor) nearest the COMMON_ASPECTS, within its max side.
        Where --max-side is below the native size, neither "native" nor a bucket over it is offered (the largest
        square allowed, if no bucket fits)."""
        from stylelora.config import TrainConfig, with_model_defaults
        from stylelora.data.buckets import BucketConfig, make_buckets, select_bucket

        geometry = self.native_geometry(base)
        data = with_model_defaults(TrainConfig(), **geometry).data  # the bucket sides a run on this base trains at
        config = BucketConfig(data.resolution, data.bucket_step, data.min_side, data.max_side)
        buckets = make_buckets(config)
        sizes = dict.fromkeys(select_bucket(width, height, config, buckets) for width, height in COMMON_ASPECTS)
        high = self.limits.side_limit(geometry["native_resolution"])
        allowed = [f"{width}x{height}" for width, height in sizes if max(width, height) <= high]
        if geometry["native_resolution"] <= high:
            return ["native", *allowed]
        side = _largest_side(geometry, high)
        return allowed or [f"{side}x{side}"]

    def preload(self, base: str, pipe=None):
        """Load a base now (or adopt an already loaded pipeline for it, e.g. in a notebook); returns it."""
        if pipe is None:
            return self.pipeline(base)
        self._check_base(base)
        self._adopt(pipe)
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
                self._adopt(pipe)
                self._pipes[base] = pipe
        return pipe

    @staticmethod
    def _adopt(pipe) -> None:
        """The app's adapter stack (checks, pinned hashes) and step hook (Stop) on a pipeline."""
        from stylelora.app.adapters import AppAdapterStack
        from stylelora.app.jobs import install_step_hook

        pipe.set_progress_bar_config(disable=True)
        AppAdapterStack.install(pipe)
        install_step_hook(pipe)

    def stack(self, base_or_pipe):
        """The app's adapter stack of a base (by name) or of a loaded pipeline."""
        from stylelora.app.adapters import AppAdapterStack

        pipe = self.pipeline(base_or_pipe) if isinstance(base_or_pipe, str) else base_or_pipe
        return AppAdapterStack.install(pipe)

    # ------------------------------------------------------------------ generation

    def request(self, settings: GenerateSettings):
        """The library's GenerateRequest for these settings, checked against the app's limits."""
        from stylelora.generate.command import parse_size
        from stylelora.generate.generate import MAX_SEED, GenerateRequest

        limits = self.limits
        steps = limits.check("Steps", settings.steps, 1, "max_steps")
        batch = limits.check("Batch size", settings.batch_size, 1, "max_batch")
        cfg = limits.check("CFG scale", settings.cfg, 0, CFG_LIMIT, whole=False)
        seed = limits.check("Seed", settings.seed, -1, MAX_SEED)
        clip_skip = limits.check("Clip skip", settings.clip_skip, 1, CLIP_SKIP_LIMIT)
        size = (settings.size or "").strip()
        try:
            width, height = parse_size(size if size and size != "native" else None)
        except ValueError:  # the library's message names the CLI's --size, which the app has not
            raise AppError(f"Image size {size!r}: write WIDTHxHEIGHT or one number for a square, or choose one the "
                           "Size box lists for this base.") from None
        if width is not None:
            native = self.native_geometry(settings.base)["native_resolution"]
            for side in (width, height):
                limits.check_side(f"Image size {size}: each side", side, settings.base, native)
        else:
            self._check_native_side(settings.base)
        return GenerateRequest(
            prompt=settings.prompt or "", negative_prompt=settings.negative_prompt or "", steps=steps,
            cfg=cfg, sampler=settings.sampler or None, seed=seed, width=width,
            height=height, batch_size=batch, loras=self.specs(settings.adapters),
            adapters_dir=self.adapters_dir,  # <lora:name> tags in the prompt resolve here, and only here
            blend_mode=settings.blend_mode, dial=settings.dial, clip_skip=clip_skip,
        )

    def generate(self, settings: GenerateSettings, progress: Progress | None = None,
                 cancelled: Callable[[], bool] | None = None,
                 notify: Callable[[str], None] | None = None) -> list[SavedImage]:
        """Generate and save each image as a PNG carrying its A1111 parameters (images/NNNNN-SEED.png).

        `cancelled`: asked before every sampling step; once it says True the request stops there (Cancelled) and
        nothing is saved. `notify`: told each note on what the request does that the user may not mean (an
        adapter both chosen and tagged: the weights add up), before sampling starts.
        """
        from stylelora.app.jobs import Watch, watching
        from stylelora.generate.generate import generate, precheck_request

        request = self.request(settings)
        notes = precheck_request(request)  # bad tags or files fail before a base loads
        for note in notes if notify is not None else ():
            notify(note)
        pipe = self.pipeline(settings.base)
        watch = Watch(cancelled, None, request.steps, "generation")

        def on_step(done: int, total: int) -> None:
            watch.done = done
            watch.check()
            if progress is not None:
                progress(done, total)

        with self.stack(pipe).pinned(), watching(watch):
            results = generate(pipe, None, request, progress=on_step)
        return self._save(results, [r.params.seed for r in results], self.images_dir)

    def _save(self, items: list, labels: list, folder: Path) -> list[SavedImage]:
        from stylelora.generate.command import output_paths

        with self._save_lock:  # concurrent requests must not pick the same next number
            paths = output_paths(None, labels, str(folder))
            return [SavedImage(item, item.save(path)) for item, path in zip(items, paths)]

    def grid_axis(self, text: str | None, settings: GenerateSettings):
        """One grid axis ("KIND=V1,V2,..."), read as the CLI reads it (xy_grid.parse_axis: any case, A1111's labels,
        ranges) and each value held to the limits Generate applies; None when empty."""
        from stylelora.generate.xy_grid import parse_axis

        if not text or not text.strip():
            return None
        try:
            axis = parse_axis(text)
        except ValueError as error:
            raise AppError(f"{error} (e.g. weight=0,0.5,1 or Seed=1,2,3)") from None
        if axis.kind == "adapter" and len(settings.adapters) + 1 > MAX_ADAPTERS:
            raise AppError(f"An adapter axis adds one adapter to the {len(settings.adapters)} chosen: choose at most "
                           f"{MAX_ADAPTERS - 1} adapters for it.")
        held = self._axis_limit(axis.kind)
        return replace(axis, values=tuple(held(value) for value in axis.values))

    def _axis_limit(self, kind: str) -> Callable[[Any], Any]:
        """What one value of a grid axis of this kind is held to: Generate's limits for numbers, the adapters folder
        for adapter names (the path it resolves to); other kinds were checked by name when the axis was read."""
        from stylelora.generate.generate import MAX_SEED
        from stylelora.generate.xy_grid import NO_ADAPTER

        label = f"Grid axis {kind}: a value"
        held = {
            "steps": lambda v: self.limits.check(label, v, 1, "max_steps"),
            "seed": lambda v: self.limits.check(label, v, 0, MAX_SEED),
            "cfg": lambda v: self.limits.check(label, v, 0, CFG_LIMIT, whole=False),
            "clip_skip": lambda v: self.limits.check(label, v, 1, CLIP_SKIP_LIMIT),
            "adapter": lambda v: v if v == NO_ADAPTER else str(self.adapter_path(v)),
        }
        weights = ("weight", "unet_weight", "te_weight")
        if kind in weights:
            return lambda v: self.limits.check(f"Grid axis {kind}: a weight", v, -WEIGHT_LIMIT, WEIGHT_LIMIT,
                                               whole=False)
        return held.get(kind, lambda v: v)

    def grid(self, settings: GenerateSettings, x: str, y: str | None = None, z: str | None = None,
             progress: Progress | None = None, cancelled: Callable[[], bool] | None = None,
             notify: Callable[[str], None] | None = None) -> Path:
        """An X/Y grid ("KIND=V1,V2,..." axes; adapter axes name adapters in the folder) saved in grids/; with a Z
        axis, one X/Y grid per Z value side by side in the one PNG, as A1111's X/Y/Z plot.

        progress counts sampling steps over every cell of every X/Y grid; `cancelled` stops it between steps and
        `notify` is told the request's notes, as for generate.
        """
        from stylelora.app.jobs import Watch, watching
        from stylelora.generate.command import output_paths
        from stylelora.generate.xy_grid import grid_cells, precheck_grid, xy_grid

        axes = self._grid_axes(settings, x, y, z)
        request = self.request(settings)
        notes = precheck_grid(request, *axes)  # every cell, so a bad one fails before the first is drawn
        if settings.batch_size > 1:  # the Generate tab's Batch, which a grid does not use: said, not dropped unsaid
            notes = [*notes, f"A grid draws one image per cell: the Generate tab's Batch ({settings.batch_size}) is "
                             "not used here."]
        for note in notes if notify is not None else ():
            notify(note)
        # Sampling steps over every cell: a cell's steps are the steps axis's value where steps is an axis.
        total = sum(next((value for axis, value in cell if axis.kind == "steps"), request.steps)
                    for cell in grid_cells(*axes))
        pipe = self.pipeline(settings.base)
        with self._save_lock:
            out = output_paths(None, [0], str(self.grids_dir), suffix="grid")[0]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.touch()  # reserve the number; the grid replaces it atomically
        try:
            with self.stack(pipe).pinned(), watching(Watch(cancelled, progress, total, "grid")):
                path = xy_grid(pipe, None, request, *axes, out_path=out).path
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        if progress is not None:
            progress(total, total)
        return path

    def _grid_axes(self, settings: GenerateSettings, x: str, y: str | None, z: str | None) -> list:
        """The X, Y and Z axes (None where not given), refused where they cannot make one grid, or where it would be
        over this server's cell limit counting the cells of every X/Y grid."""
        from stylelora.generate.xy_grid import check_axis_kinds

        axes = [self.grid_axis(text, settings) for text in (x, y, z)]
        if axes[0] is None:
            raise AppError("Give the X axis, e.g. weight=0,0.5,1 or seed=1,2,3.")
        try:
            check_axis_kinds(*axes)
        except ValueError as error:
            raise AppError(str(error)) from None
        kinds = {axis.kind for axis in axes if axis is not None}
        adapter_axes = {"weight", "unet_weight", "te_weight", "blocks"}
        if kinds & adapter_axes and not settings.adapters and "adapter" not in kinds:
            raise AppError("A weight axis sets the weights of the chosen adapters: choose adapters first "
                           "(or add an adapter axis, e.g. adapter=none,NAME).")
        sizes = [len(axes[0].values), len(axes[1].values) if axes[1] else 1]  # "26x1 cells" with no Y axis
        sizes += [len(axes[2].values)] if axes[2] else []
        if math.prod(sizes) > self.limits.max_grid_cells:
            grids = f" ({sizes[2]} X/Y grids of {sizes[0]}x{sizes[1]})" if len(sizes) == 3 else ""
            raise AppError(f"A grid of {'x'.join(map(str, sizes))} = {math.prod(sizes)} cells{grids} is over this "
                           f"server's limit of {self.limits.max_grid_cells} cells (--max-grid-cells): use fewer "
                           "values.")
        return axes

    # ------------------------------------------------------------------ blend

    def blend(self, adapters: Sequence[AdapterWeight], name: str, rank: int | None = None, exact: bool = False,
              fp16: bool = False, overwrite: bool = False, blend_mode: str | None = None,
              dial: str | None = None, base: str | None = None) -> BlendResult:
        """Save the mix as blends/NAME.safetensors: as `stylelora blend` does, at the inputs' total rank (a sum
        exactly), every rank (`exact`) or truncated to `rank` by SVD. dial: the
        Generate tab's Weight dial, which a file cannot hold unless its weights draw the same either way. base: the
        Generate tab's base, whose UNet blocks the mix's block weights number (None: the files' family's)."""
        from stylelora.generate.reading_dial import check_savable
        from stylelora.lora.blend import blend
        from stylelora.share import write_bundle

        specs = self.specs(adapters)
        if not specs:
            raise AppError("Choose at least one adapter to blend.")
        check_savable(specs, dial)
        out = self.adapters_dir / BLENDS_FOLDER / f"{plain_name(name, 'Blend name')}.safetensors"
        if out.exists() and not overwrite:
            raise AppError(f"{out.relative_to(self.adapters_dir)} exists already: choose another name or tick "
                           "'overwrite'.")
        dtype = None
        if fp16:
            import torch

            dtype = torch.float16
        report = blend(specs, out, rank=int(rank) if rank else None, exact=exact, dtype=dtype,
                       blend_mode=blend_mode, unet_config=self._blocks_config(base, specs), overwrite=overwrite)
        # A1111's NAME.json sidecar and the model card, always NAME.md: blends/ holds many adapters, and delete and
        # rename carry NAME.md with the file (a README.md would outlive the blend it describes).
        write_bundle(out, preview=None, card=out.with_suffix(".md"))
        saved = out.relative_to(self.adapters_dir).with_suffix("").as_posix()
        return BlendResult(saved, out, report.summary())

    def _blocks_config(self, base: str | None, specs) -> dict | None:
        """The UNet config of the base a mix with block weights is drawn on: the loaded model's, else its files'."""
        if base is None or all(spec.blocks is None for spec in specs):
            return None
        self._check_base(base)
        with self._load_lock:
            loaded = self._pipes.get(base)
        if loaded is None:
            from stylelora.models.family import base_unet_config

            config = base_unet_config(base)
            if config is not None:
                return config
            loaded = self.pipeline(base)  # a single file: its blocks are known once it loads
        return dict(loaded.unet.config)

    # ------------------------------------------------------------------ training data

    def dataset_names(self) -> list[str]:
        """The training folders offered: the datasets folder's subfolders (hidden ones and links out excluded)."""
        root = self.datasets_dir.resolve()
        return sorted(path.name for path in self.datasets_dir.iterdir()
                      if path.is_dir() and not path.name.startswith(".") and path.resolve().is_relative_to(root))

    def dataset_path(self, name: str) -> Path:
        """The folder a dataset name means, inside the datasets folder only; AppError otherwise."""
        text = str(name or "").strip()
        if not text:
            raise AppError("Choose a training data folder first (or upload one below).")
        if text not in self.dataset_names():
            known = ", ".join(self.dataset_names()[:8]) or "none yet"
            raise AppError(f"No training data folder named {text!r} in {self.datasets_dir.name}/ (found: {known}). "
                           "Choose one from the list, or upload a folder of images and captions.")
        return self.datasets_dir / text

    def import_dataset(self, files: Sequence[str | Path], name: str, trigger: str = "", repeats: int = 10,
                       original_names: Sequence[str] | None = None) -> str:
        """Copy uploaded images (+ .txt captions) into DATASETS/NAME/REPEATS_TRIGGER/ (kohya layout), all or nothing.

        Other files are skipped and reported; images must open as images. Returns a one-paragraph report.
        """
        from PIL import Image, UnidentifiedImageError

        folder_name = plain_name(name, "Dataset name")
        word = (trigger or "").strip()
        if word and not re.fullmatch(r"[A-Za-z0-9_-]{1,50}", word):
            raise AppError(f"Trigger word {word!r}: use one word of letters, digits, '_' or '-' (e.g. 'zorbstyle').")
        count = int(self.limits.check("Repeats", repeats, 1, 100))
        target = self.datasets_dir / folder_name
        if target.exists():
            raise AppError(f"{self.datasets_dir.name}/{folder_name} exists already: choose another dataset name.")
        names = list(original_names or [Path(f).name for f in files])
        if not files:
            raise AppError("Choose a folder (or files) of images with their .txt captions to upload.")
        if len(files) > MAX_DATASET_FILES:
            raise AppError(f"{len(files)} files: upload at most {MAX_DATASET_FILES} at once.")
        images, captions, skipped = [], [], []
        for path, label in zip(files, names):
            path, label = Path(path), Path(label).name
            suffix = Path(label).suffix.lower()
            if path.stat().st_size > self.max_upload_bytes:
                skipped.append(f"{label} (over {self.max_upload_bytes / 2**20:g} MiB)")
            elif suffix in IMAGE_SUFFIXES:
                try:
                    with Image.open(path) as image:
                        image.verify()
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                    skipped.append(f"{label} (not a readable image)")
                    continue
                images.append((path, label))
            elif suffix in CAPTION_SUFFIXES:
                captions.append((path, label))
            else:
                skipped.append(f"{label} (not an image or caption)")
        if not images:
            raise AppError("None of the uploaded files is an image (png, jpg, webp, bmp); nothing was copied.")
        subfolder = f"{count}_{word}" if word else f"{count}_{folder_name.replace(' ', '_')}"
        staging = self.datasets_dir / f".{folder_name}.upload"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / subfolder).mkdir(parents=True)
            image_stems = {Path(label).stem for _, label in images}
            for path, label in images + [c for c in captions if Path(c[1]).stem in image_stems]:
                shutil.copyfile(path, staging / subfolder / label)
            os.rename(staging, target)  # the dataset appears whole, or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        captioned = sum(1 for _, label in captions if Path(label).stem in image_stems)
        report = (f"Added {self.datasets_dir.name}/{folder_name}/{subfolder}: {len(images)} images, {captioned} "
                  "captions.")
        if captioned < len(images):
            report += f" {len(images) - captioned} images have no caption (their file name is used)."
        if skipped:
            report += f" Skipped {len(skipped)}: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}."
        return report

    # ------------------------------------------------------------------ training

    def start_training(self, settings):
        """Start `stylelora train` on a dataset (one run at a time); the adapter lands in the adapters folder."""
        from stylelora.app.training import TrainingJob

        self._check_base(settings.base)
        self._check_idle()
        data = self.dataset_path(settings.data_dir)
        start = self.adapter_path(settings.start_from) if settings.start_from else None  # inside the folder only
        self._training = TrainingJob.start(settings, self.adapters_dir, data, start)
        return self._training

    def resume_training(self, name: str):
        """Continue a stopped app run from its last checkpoint (`stylelora train ... --resume latest`)."""
        from stylelora.app.training import TrainingJob

        self._check_idle()
        run_dir = self.adapters_dir / plain_name(name, "Adapter name")
        self._training = TrainingJob.resume(run_dir, self.datasets_dir)
        return self._training

    def _check_idle(self) -> None:
        current = self._training
        if current is not None and current.running:
            raise AppError(f"A training run ({current.name}) is in progress; wait for it or stop it first.")

    @property
    def training(self):
        """The current (or last) training run, or None."""
        return self._training


def _read_card_sidecar(adapter: Path) -> dict:
    """The adapter's NAME.json (A1111's card metadata), or {} where there is none or it cannot be read: a broken
    sidecar costs its card the sidecar's values, not the page its list of cards."""
    try:
        found = json.loads(adapter.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _preferred_weight(sidecar: dict) -> float:
    """The sidecar's "preferred weight"; 1 where it gives none, 0 (A1111: "use the default") or no finite number."""
    try:
        weight = float(sidecar.get("preferred weight") or 1.0)
    except (TypeError, ValueError):
        return 1.0
    return weight if math.isfinite(weight) else 1.0


def _sidecars(adapter: Path) -> list[Path]:
    """The files kept beside an adapter: NAME.json (A1111's card), NAME.preview.png and NAME.md (its model card)."""
    return [path for path in (adapter.with_suffix(".json"), adapter.with_name(adapter.stem + ".preview.png"),
                              adapter.with_suffix(".md")) if path.is_file()]
