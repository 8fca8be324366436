"""Owns the share bundle of an adapter: what people post beside NAME.safetensors, and `stylelora share`.

    NAME.preview.png   the preview image A1111's and ComfyUI's LoRA browsers and model sites look for
    NAME.json          A1111's extra-networks sidecar: activation text, preferred weight, SD version, description
    README.md          a model card: base and family, triggers, how to use it in A1111/ComfyUI/diffusers/stylelora,
                       training settings and dataset size (a blend: its inputs and weights), the sample grid, the
                       license; NAME.md where README.md would replace another adapter's card or the user's own

Everything is derived from the adapter file's own metadata (kohya ss_* and SAI modelspec.*), so a trained adapter
and a saved blend get the same bundle. Files are written atomically. Model sites want an image, so where training
kept none (`--no-samples`), `stylelora share` draws one as `stylelora generate` would, on the base the adapter
records, or takes the image given with --preview.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from stylelora.atomic import write_text_atomic
from stylelora.lora.inspect import BLEND_METADATA_KEY as BLEND_KEY

PREVIEW_NAME = "preview.png"  # the first sample of the newest grid, kept by train/samples.py
THUMBNAIL_SIDE = 256
# A1111's "sd version" choices in its LoRA metadata editor, by modelspec.architecture.
SD_VERSIONS = {"stable-diffusion-v1": "SD1", "stable-diffusion-v2-512": "SD2", "stable-diffusion-v2-768-v": "SD2",
               "stable-diffusion-xl-v1-base": "SDXL"}


def open_image(image_path: Path):
    """The image at `image_path`, loaded (a PIL image), or a ValueError that says what to give instead."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(image_path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{image_path} is not an image that can be read ({error}); give a PNG or JPEG, e.g. one "
                         "written by `stylelora generate`.") from None
    return image


def thumbnail_data_uri(image_path: Path, side: int = THUMBNAIL_SIDE) -> str:
    """A small JPEG of the image as a data URI (modelspec.thumbnail); tiny toy images are upscaled crisply."""
    from PIL import Image

    image = open_image(image_path)
    with image:
        image = image.convert("RGB")
        scale = side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        buffer = io.BytesIO()
        image.resize(size, resample).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sd_version(metadata: dict[str, str]) -> str:
    architecture = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    return SD_VERSIONS.get(architecture, "Unknown")


def trigger_words(metadata: dict[str, str]) -> list[str]:
    from stylelora.lora.inspect import trigger_words as from_metadata

    return from_metadata(metadata)


def card_prompt(metadata: dict[str, str]) -> str:
    """The prompt the card tells users to start from: every trigger word ("" for an adapter without one, which acts on
    every prompt). Every trigger, not the first alone: a blend of a style and a character draws only what its prompt
    names."""
    return ", ".join(trigger_words(metadata))


def a1111_sidecar(metadata: dict[str, str]) -> dict[str, object]:
    """NAME.json as A1111's extra-networks metadata editor writes it for a LoRA."""
    return {
        "description": metadata.get("modelspec.description", ""),
        "sd version": sd_version(metadata),
        "activation text": card_prompt(metadata),
        "preferred weight": 1.0,
        "negative text": "",
        "notes": f"{_origin(metadata)}{_clip_skip_note(metadata)} License: "
                 f"{metadata.get('modelspec.license', 'unspecified')}.",
    }


def _clip_skip(metadata: dict[str, str]) -> int:
    from stylelora.lora.inspect import trained_clip_skip

    return trained_clip_skip(metadata) or 1


def _clip_skip_note(metadata: dict[str, str]) -> str:
    """Where the text encoder was read from another layer in training, the setting that draws it as trained."""
    skip = _clip_skip(metadata)
    return f" Trained at clip skip {skip}: set Clip skip to {skip}." if skip > 1 else ""


def _origin(metadata: dict[str, str]) -> str:
    """How the file was made, for the sidecar's notes: a blend names its inputs, as its card does."""
    if BLEND_KEY not in metadata:
        return "Trained with stylelora."
    names = ", ".join(f"{_input_title(entry)} ({entry.get('unet_weight', '?')})"
                      for entry in _blend_record(metadata).get("inputs", []))
    return f"Blended with stylelora from {names}." if names else "Blended with stylelora."


def _blend_record(metadata: dict[str, str]) -> dict:
    """What `stylelora blend` recorded about a blend (its inputs, mode, rank); {} where it cannot be read."""
    try:
        return json.loads(metadata[BLEND_KEY])
    except ValueError:
        return {}


def _input_title(entry: dict) -> str:
    return entry.get("title") or entry.get("file", "?")


CARD_MARK = "<!-- stylelora model card -->"  # the last line of every card: a README.md without it is the user's


def model_card(name: str, metadata: dict[str, str], *, grid: str | None, preview: bool = True) -> str:
    """README.md for the bundle: what it is, how to use it everywhere, how it was trained or blended.

    preview: whether NAME.preview.png is written beside the adapter (the card names only files that exist)."""
    triggers = card_prompt(metadata)
    trigger_text = triggers or "(none: the adapter acts on every prompt)"
    prompt = f"{triggers}, " if triggers else ""
    beside = f" (with `{name}.preview.png` and `{name}.json`)" if preview else f" (with `{name}.json`)"
    lines = [
        f"# {metadata.get('modelspec.title', name)}",
        "",
        metadata.get("modelspec.description", ""),
        "",
        f"- Base model: `{metadata.get('ss_sd_model_name', 'unknown')}` (family "
        f"{metadata.get('ss_stylelora_base_family', sd_version(metadata))}, "
        f"`{metadata.get('modelspec.architecture', 'unknown')}`)",
        f"- Trigger words: {trigger_text}",
        f"- Resolution: {metadata.get('modelspec.resolution', 'unknown')}",
        f"- License: {metadata.get('modelspec.license', 'unspecified')}",
        *([f"- Clip skip: {_clip_skip(metadata)} (A1111's *Clip skip* setting, ComfyUI's *CLIP Set Last Layer* at "
           f"-{_clip_skip(metadata)}, `stylelora generate --clip-skip {_clip_skip(metadata)}`)"]
          if _clip_skip(metadata) > 1 else []),
        "",
        "## Use it",
        "",
        f"- A1111 / Forge: put `{name}.safetensors`{beside} in `models/Lora`, then "
        f"prompt `{prompt}... <lora:{name}:1>`.",
        f"- ComfyUI: put it in `models/loras` and use a *Load LoRA* node (strength 1.0); prompt `{prompt}...`.",
        f"- diffusers: `pipe.load_lora_weights(\".\", weight_name=\"{name}.safetensors\")`.",
        f"- stylelora: `stylelora generate \"{prompt}...\" --lora {name}.safetensors:1`.",
        "",
        *(_blend_lines(metadata) if BLEND_KEY in metadata else _training_lines(metadata)),
    ]
    if grid:
        lines += ["", "## Samples", "", f"![sample grid]({grid})"]
    return "\n".join(lines + ["", CARD_MARK]) + "\n"


def _training_lines(metadata: dict[str, str]) -> list[str]:
    """The card's training settings, from the run config the trainer stores (ss_training_args)."""
    try:
        args = json.loads(metadata.get("ss_training_args") or "{}")
    except ValueError:
        args = {}
    if not args:
        return ["## Training", "", "- Not recorded in the file (it was not trained by stylelora).",
                f"- LoRA rank {metadata.get('ss_network_dim', '?')}, alpha {metadata.get('ss_network_alpha', '?')}"]
    train, network, optim = args.get("train", {}), args.get("network", {}), args.get("optim", {})
    return [
        "## Training",
        "",
        f"- Dataset: {_image_count(metadata)} images ({metadata.get('ss_num_train_images', '?')} samples per epoch "
        f"with repeats), {metadata.get('ss_steps', '?')} steps, batch {train.get('batch_size', '?')}",
        f"- LoRA rank {metadata.get('ss_network_dim', '?')}, alpha {metadata.get('ss_network_alpha', '?')}; "
        f"UNet LR {optim.get('unet_lr', '?')}, text-encoder LR {optim.get('text_encoder_lr', 'not trained')}",
        f"- Seed {train.get('seed', '?')}, precision {train.get('precision', '?')}; "
        f"network {network.get('unet_targets', '?')}",
    ]


def _error_text(blend: dict) -> str:
    error = blend.get("max_relative_error")
    return f"{error:.2e}" if isinstance(error, (int, float)) else "?"  # as `stylelora inspect` writes it


def _blend_lines(metadata: dict[str, str]) -> list[str]:
    """The card's account of a saved blend: its inputs with their weights, the mode, and how exact the file is."""
    blend = _blend_record(metadata)
    inputs = blend.get("inputs", [])
    rank = blend.get("rank", "?")
    size = f"rank {rank}" if rank is not None else "the inputs' total rank"  # None: a ties merge kept compact
    how = ("exact (every input's rank kept)" if blend.get("mode") == "exact"
           else f"{size} by SVD, largest relative error {_error_text(blend)}")
    lines = ["## Blend", "", f"- Blend mode {blend.get('blend_mode', 'sum')}; {how}; LoRA rank "
             f"{metadata.get('ss_network_dim', '?')}, alpha {metadata.get('ss_network_alpha', '?')}",
             f"- Inputs ({len(inputs)}):"]
    for entry in inputs:
        blocks = f", lbw={entry['lbw']}" if "lbw" in entry else ""
        lines.append(f"  - {_input_title(entry)} (`{entry.get('file', '?')}`): UNet "
                     f"{entry.get('unet_weight', '?')}, text encoder {entry.get('te_weight', '?')}{blocks}")
    return lines


def _image_count(metadata: dict[str, str]) -> str:
    try:
        folders = json.loads(metadata.get("ss_dataset_dirs", "{}"))
        return str(sum(int(folder.get("img_count", 0)) for folder in folders.values())) if folders else "?"
    except (ValueError, AttributeError, TypeError):
        return "?"


def write_bundle(adapter: Path, *, preview: Path | None, grid: Path | None = None, card: Path | None = None,
                 metadata: dict[str, str] | None = None, keep_sidecar: bool = False) -> list[Path]:
    """Write NAME.preview.png (when there is a preview), NAME.json and the model card (`card`, default
    card_path(adapter)) beside the adapter. `metadata`: the adapter's, where the caller has read it already.
    `keep_sidecar`: leave a NAME.json that is there as it is (the adapter is unchanged, and users edit NAME.json in
    A1111's metadata editor)."""
    from stylelora.lora.adapter_file import read_header

    adapter = Path(adapter)
    name = adapter.stem
    metadata = read_header(adapter)[1] if metadata is None else metadata
    written = []
    if preview is not None and preview.is_file():
        target = preview_path(adapter)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(preview, tmp)
        os.replace(tmp, target)
        written.append(target)
    sidecar = adapter.with_name(f"{name}.json")
    if not (keep_sidecar and sidecar.is_file()):
        written.append(write_text_atomic(sidecar, json.dumps(a1111_sidecar(metadata), indent=4) + "\n"))
    grid_link = os.path.relpath(grid, adapter.parent) if grid is not None and grid.is_file() else None
    card_text = model_card(name, metadata, grid=grid_link, preview=preview is not None and preview.is_file())
    target = card or card_path(adapter)
    written.append(write_text_atomic(target, card_text))
    _drop_stale_card(adapter, keep=target)
    return written


def _drop_stale_card(adapter: Path, keep: Path) -> None:
    """Delete the card this adapter's previous version left at its other place: a file written over when its folder
    has since gained other adapters gets NAME.md, and README.md, which still described the old file, would
    contradict it. Only a card stylelora wrote for this very file goes; the user's own README stays."""
    for other in _cards_of(adapter):
        if other != keep:
            other.unlink()


def _cards_of(adapter: Path) -> list[Path]:
    """The cards stylelora wrote for this very file, at either place a card goes (README.md, NAME.md)."""
    return [path for path in (adapter.with_name("README.md"), adapter.with_name(f"{adapter.stem}.md"))
            if path.is_file() and _is_card(path) and _card_names(path, adapter.name)]


def _card_names(path: Path, file_name: str) -> bool:
    """Whether the card at `path` is the card of `file_name` (its diffusers line loads that file)."""
    return f'weight_name="{file_name}"' in path.read_text(encoding="utf-8", errors="replace")


def card_path(adapter: Path) -> Path:
    """README.md in a folder that holds only this adapter (a run folder, its checkpoints aside), unless a README.md
    that stylelora did not write is there; else NAME.md: a folder of several adapters, in it or in its subfolders
    (the app's blends/, an outputs folder of runs), keeps one card per adapter, and neither replaces another's card
    nor the user's own README."""
    from stylelora.generate.prompt_tags import CHECKPOINT_FOLDER, list_adapters

    others = [key for key, path in list_adapters(adapter.parent).items()
              if path.resolve() != adapter.resolve() and not key.startswith(f"{CHECKPOINT_FOLDER}/")]
    readme = adapter.with_name("README.md")
    if not others and (not readme.exists() or _is_card(readme)):
        return readme
    return adapter.with_name(f"{adapter.stem}.md")


def _is_card(path: Path) -> bool:
    """A card stylelora wrote: its mark, or (cards written before the mark) its stylelora usage line."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        return CARD_MARK in text or ("## Use it" in text and "- stylelora: `stylelora generate" in text)
    except OSError:
        return False


class ShareError(ValueError):
    """Input `stylelora share` cannot pack, said in one line with what to pass instead."""


def _shared_adapter(source: Path) -> Path:
    """The adapter a share packs: the .safetensors file given (a blend saved among other adapters), or the one
    adapter at the top of a run folder (its checkpoints/ hold optimizer state and are never shared)."""
    if not source.exists():
        raise ShareError(f"{source} does not exist; pass a run folder written by `stylelora train` or an adapter "
                         "file written by `stylelora blend` (NAME.safetensors)")
    if source.is_file():
        if source.suffix != ".safetensors":
            from stylelora.lora.io import adapter_beside

            raise ShareError(f"{source.name} is not an adapter; pass its run folder or the adapter's "
                             f"NAME.safetensors file{adapter_beside(source)}")
        return source
    adapters = sorted(source.glob("*.safetensors"))
    if len(adapters) != 1:
        found = f": {', '.join(p.name for p in adapters)}; pass the one to share as FILE.safetensors" if adapters \
            else "; pass a run folder written by `stylelora train` or the adapter file of a blend"
        raise ShareError(f"{source} must hold exactly one adapter .safetensors to share (found {len(adapters)}"
                         f"{found})")
    return adapters[0]


def _checked_out(out: Path, overwrite: bool) -> Path:
    """The zip to write: refused where it is not a .zip, or exists and `overwrite` is off, so a post's earlier
    bundle (or any other file) is never replaced without the user's say."""
    if out.suffix.lower() != ".zip":
        raise ShareError(f"--out {out}: the bundle is a zip archive; name it NAME.zip")
    if out.exists() and (not overwrite or not out.is_file()):
        raise ShareError(f"--out {out} already exists; pass --overwrite to replace it, or another --out NAME.zip")
    return out


def _written_card(adapter: Path) -> list[Path]:
    """The card stylelora wrote for this adapter, wherever it is: README.md when the adapter was alone in its folder,
    NAME.md when other adapters were there. card_path says where the next card would go, and an adapter written
    first into a folder that has gained others since still has its README.md."""
    preferred = card_path(adapter)
    return sorted(_cards_of(adapter), key=lambda path: path != preferred)[:1]


def default_out(source: Path) -> Path:
    """NAME.zip beside a run folder, or beside an adapter file (the file's name without .safetensors)."""
    source = Path(source)
    name = source.stem if source.suffix == ".safetensors" else source.resolve().name
    return source.parent / f"{name}.zip"


def pack(source: Path, out: Path, *, overwrite: bool = False, preview: Path | None = None, draw: bool = True,
         base: str | None = None, say: Callable[[str], None] = lambda line: None) -> Path:
    """Zip the bundle of an adapter (adapter, preview, sidecar, card, newest sample grid) into `out`.

    source: a run folder holding one adapter, or an adapter file (a blend beside other adapters). Members sit in a
    NAME/ folder, under their names relative to the adapter's folder: unzipped into models/Lora (A1111 and ComfyUI
    look in its subfolders), each bundle keeps its own README.md and samples/ instead of replacing another's.
    preview: an image to use as NAME.preview.png; else, where there is none and `draw` is on, one is drawn (on
    `base`, default the one the adapter records: add_preview). `say` gets a line for the user about the preview."""
    source = Path(source)
    adapter = _shared_adapter(source)
    out = _checked_out(Path(out), overwrite)
    given = _checked_preview(preview) if preview is not None else None
    if given is not None or (draw and not preview_path(adapter).is_file()):
        add_preview(adapter, given, base=base, say=say)
    folder = adapter.parent
    members = [adapter, preview_path(adapter), adapter.with_name(f"{adapter.stem}.json")] + _written_card(adapter)
    if source.is_dir():  # a run's sample grid; a blend file has none of its own
        members += sorted((folder / "samples").glob("step-*.png"))[-1:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            if member.is_file():
                archive.write(member, f"{adapter.stem}/{member.relative_to(folder).as_posix()}")
    os.replace(tmp, out)
    return out


def preview_path(adapter: Path) -> Path:
    """NAME.preview.png beside NAME.safetensors: where A1111's and ComfyUI's LoRA browsers look for its image."""
    return adapter.with_name(f"{adapter.stem}.preview.png")


def _checked_preview(image: Path) -> Path:
    """--preview's image, refused before any work where it is missing or no image."""
    image = Path(image)
    if not image.is_file():
        raise ShareError(f"--preview {image}: no such image; make one with `stylelora generate ... --lora "
                         "NAME.safetensors:1`, or leave --preview out to have one drawn")
    open_image(image).close()  # its ValueError says what to give instead
    return image


PREVIEW_SEED = 0  # the same adapter shared twice gets the same drawn preview


def add_preview(adapter: Path, image: Path | None, *, base: str | None = None,
                say: Callable[[str], None] = lambda line: None) -> Path | None:
    """Write NAME.preview.png beside the adapter, then its card again so that it names the image: `image` (a PNG
    copied as it is, with its parameters; another format converted), else one drawn on `base` (default: the base the
    adapter records, recorded_base). Where that base cannot be loaded, nothing is written and `say` is told why and
    how to add one; returns the preview written, or None."""
    from stylelora.lora.adapter_file import read_header

    target = preview_path(adapter)
    _, metadata = read_header(adapter)
    if image is not None:
        _copy_as_png(image, target)
    elif not _drawn(adapter, metadata, target, base, say):
        return None
    card = _written_card(adapter)
    write_bundle(adapter, preview=target, grid=_card_grid(card), card=card[0] if card else None, metadata=metadata,
                 keep_sidecar=True)
    return target


def _drawn(adapter: Path, metadata: dict[str, str], target: Path, base: str | None,
           say: Callable[[str], None]) -> bool:
    """Whether the preview was drawn into `target`; where it could not be, `say` gets why and what to pass."""
    from stylelora.models.load import resolve_base_source

    found, config_dir, origin = (base, None, "given with --base") if base else recorded_base(adapter, metadata)
    try:
        if found is None:
            raise ValueError("the adapter does not record the base it was trained on")
        resolve_base_source(found)  # a path not on this machine fails here, in a moment, before anything loads
        say(f"note: drawing {target.name} on the base {found} ({origin}), seed {PREVIEW_SEED}; pass --preview "
            "IMAGE.png to use your own image, or --no-preview to skip it")
        draw_preview(adapter, target, found, config_dir, metadata=metadata)
    except _base_errors() as error:
        say(_no_preview_warning(adapter, metadata, found, origin, error))
        return False
    return True


def _base_errors() -> tuple[type[Exception], ...]:
    """What a base that cannot be loaded or drawn with raises (not found, not cached, another family): the same
    bad input `stylelora generate` reports in one line."""
    from stylelora.user_errors import input_errors

    return input_errors() + (OSError,)


def _copy_as_png(image: Path, target: Path) -> None:
    """`image` as `target` (a PNG): a PNG's bytes as they are (its generation parameters kept), another format
    converted."""
    tmp = target.with_name(f".{target.name}.tmp")
    with open_image(image) as opened:
        if opened.format == "PNG":
            shutil.copyfile(image, tmp)
        else:
            opened.save(tmp, format="PNG")
    os.replace(tmp, target)


def recorded_base(adapter: Path, metadata: dict[str, str]) -> tuple[str | None, str | None, str]:
    """(base, its config folder, where they were read) of the adapter, to draw its preview on. The run's config.toml
    beside it keeps the paths as the run was given them (a run shared on the machine that trained it); the file's
    metadata names a local base by its name alone (ss_sd_model_name; toy and hub ids as given)."""
    import tomllib

    config = adapter.with_name("config.toml")
    try:
        train = tomllib.loads(config.read_text(encoding="utf-8")).get("train", {}) if config.is_file() else {}
    except (OSError, ValueError):
        train = {}
    if train.get("output_name") == adapter.stem and train.get("base"):
        return str(train["base"]), train.get("base_config") or None, f"recorded in {config.name}"
    return metadata.get("ss_sd_model_name") or None, None, "recorded in the adapter's metadata"


def draw_preview(adapter: Path, target: Path, base: str, config_dir: str | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Draw the adapter's preview as `stylelora generate` draws: the card's prompt with the adapter at weight 1 on
    `base`, one image at the base's default steps and CFG, seed PREVIEW_SEED, at the clip skip it was trained at.
    The PNG carries its A1111 parameters, as generate's images do. `metadata`: the adapter's, where read already."""
    from stylelora.generate.generate import GenerateRequest, generate
    from stylelora.lora.adapter_file import read_header
    from stylelora.lora.spec import AdapterSpec
    from stylelora.models.load import load_base
    from stylelora.presets import base_sampling_defaults

    metadata = read_header(adapter)[1] if metadata is None else metadata
    steps, cfg = base_sampling_defaults(base, config_dir=config_dir)
    request = GenerateRequest(prompt=card_prompt(metadata), steps=steps, cfg=cfg, seed=PREVIEW_SEED,
                              loras=(AdapterSpec(adapter),), clip_skip=_clip_skip(metadata))
    return generate(load_base(base, config_dir=config_dir), None, request)[0].save(target)


def _no_preview_warning(adapter: Path, metadata: dict[str, str], base: str | None, origin: str,
                        error: Exception) -> str:
    prompt = card_prompt(metadata) or "a prompt"
    where = f"its base {base} ({origin}) cannot be drawn on: " if base else ""
    return (f"warning: the bundle has no preview image ({preview_path(adapter).name}), which model sites want: "
            f"{where}{str(error).rstrip('.')}. Add one with --preview IMAGE.png (e.g. made by `stylelora generate "
            f"\"{prompt}\" --lora {adapter}:1 --base BASE --seed {PREVIEW_SEED}`), or pass --base PATH, the base "
            "it was trained on as it lies on this machine, to have it drawn.")


CARD_GRID = re.compile(r"!\[sample grid\]\(([^)]+)\)")


def _card_grid(card: list[Path]) -> Path | None:
    """The sample grid the adapter's card shows, to keep it when the card is written again."""
    found = CARD_GRID.search(card[0].read_text(encoding="utf-8", errors="replace")) if card else None
    return card[0].parent / found.group(1) if found else None
