"""Owns checking every image before training and loading it as upright 8-bit RGB; bad files are skipped with a reason.

A file is kept only if it is non-empty, is an image, its header size is under the pixel limit (checked
BEFORE decoding, so a decompression bomb costs nothing), it decodes fully (truncated files fail here, not
mid-run), it converts to RGB and it is at least `min_side` pixels on its short side. `load_rgb_image` is
the one function that turns a file into training pixels, so the Dataset sees exactly what was checked.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stylelora.atomic import write_text_atomic
from stylelora.data.errors import DataError
from stylelora.data.scan import IgnoredFile, TrainItem, printable

DEFAULT_MIN_SIDE = 16  # toy scale; use ~256 for SD-scale data
# Pillow warns above MAX_IMAGE_PIXELS (≈ 89 MP) and refuses above twice that; kohya trains on whatever Pillow opens,
# and today's cameras take 100 MP photos, so the limit is Pillow's refusal (≈ 178 MP: 537 MB of RGB decoded).
PILLOW_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
DEFAULT_MAX_PIXELS = PILLOW_PIXEL_LIMIT
WHITE = (255, 255, 255)
# First bytes of formats, to tell "a broken PNG" from "not an image at all".
MAGIC_NUMBERS = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP",
                 b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
# The ISO media brands of HEIC/HEIF/AVIF files (bytes 8-12, after "ftyp"), which Pillow reads only with a plugin.
ISO_IMAGE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
                    b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


@dataclass(frozen=True)
class CheckedImage:
    """An item whose image passed every check; width/height are after EXIF orientation."""

    item: TrainItem
    width: int
    height: int
    sha256: str  # of the file bytes: the latent cache key, so an edited image is never served stale
    source_format: str
    source_mode: str

    @property
    def path(self) -> Path:
        return self.item.path


@dataclass(frozen=True)
class SkippedImage:
    path: Path
    reason: str  # short and specific: "truncated PNG", "too small (1×1 < 16 px)"


@dataclass
class CheckResult:
    kept: list[CheckedImage]
    skipped: list[SkippedImage]

    @property
    def total(self) -> int:
        return len(self.kept) + len(self.skipped)


class _Refused(Exception):
    """Internal: carries the skip reason out of the nested checks."""


def check_items(items: list[TrainItem], *, min_side: int = DEFAULT_MIN_SIDE,
                max_pixels: int = DEFAULT_MAX_PIXELS, role: str = "training") -> CheckResult:
    """Check every item's image; raise DataError if none is usable (before any model is loaded). `role`
    ("training" or "regularization") names the images in that error."""
    kept, skipped = [], []
    for item in items:
        outcome = check_image(item, min_side=min_side, max_pixels=max_pixels)
        (kept if isinstance(outcome, CheckedImage) else skipped).append(outcome)
    if not kept:
        raise DataError(_nothing_usable_message(skipped, min_side, role))
    return CheckResult(kept=kept, skipped=skipped)


def check_image(item: TrainItem, *, min_side: int = DEFAULT_MIN_SIDE,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedImage | SkippedImage:
    """Fully decode and convert one image; a SkippedImage says why it cannot be trained on."""
    try:
        data = _read_bytes(item.path)
        image = _open_checked(data, max_pixels)
        if min(image.size) < min_side:  # rotation keeps the short side, so the header suffices
            raise _Refused(f"too small ({image.width}×{image.height} < {min_side} px)")
        _decode_fully(image)
        rgb = to_rgb(_upright(image))
    except _Refused as refused:
        return SkippedImage(item.path, str(refused))
    return CheckedImage(item=item, width=rgb.width, height=rgb.height, sha256=hashlib.sha256(data).hexdigest(),
                        source_format=image.format or "?", source_mode=image.mode)


def load_rgb_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The training pixels of a file: decoded, EXIF-upright, 8-bit RGB (alpha on white).

    Raises DataError if the file no longer passes the checks (e.g. it was replaced mid-run).
    """
    try:
        image = _open_checked(_read_bytes(Path(path)), max_pixels)
        _decode_fully(image)
        return to_rgb(_upright(image))
    except _Refused as refused:
        raise DataError(f"{path}: {refused}; it passed the checks before training, so it changed since") from None


def load_alpha_mask(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The file's alpha channel as an 8-bit "L" image, EXIF-upright as its pixels are (255 where it is opaque, and
    everywhere in an image without transparency); raises DataError as load_rgb_image does."""
    try:
        image = _upright(_open_checked(_read_bytes(Path(path)), max_pixels))
        if has_transparency(image):
            return image.convert("RGBA").getchannel("A")
        return Image.new("L", image.size, 255)
    except _Refused as refused:
        raise DataError(f"{path}: {refused}; it passed the checks before training, so it changed since") from None


def has_transparency(image: Image.Image) -> bool:
    """Whether an image carries alpha (or a transparent colour key), which to_rgb composites on white."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def alpha_mask_note(images: Sequence[CheckedImage]) -> str:
    """What --alpha-mask will mask: how many images carry transparency, or a warning that none does."""
    with_alpha = sum(_file_has_transparency(image.path) for image in images)
    if not with_alpha:
        return (f"warning: --alpha-mask is on, but none of the {len(images)} images has transparency, so every "
                "pixel is learned: save cut-outs as PNG or WebP with an alpha channel")
    return (f"alpha mask: {with_alpha} of {len(images)} images have transparency, whose transparent pixels are not "
            "learned; the others count whole")


def _file_has_transparency(path: Path) -> bool:
    """Whether any pixel of the mask training reads (load_alpha_mask) is less than opaque: an alpha channel that is
    255 everywhere (a flattened export) masks nothing."""
    return load_alpha_mask(path).getextrema()[0] < 255


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as every viewer does, so the model trains on what the user saw."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost the image
        return image  # viewers that cannot parse the tag show it unrotated too


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: alpha composited on white, 16-bit and float scaled, not clipped."""
    if image.mode == "RGB" and "transparency" not in image.info:  # an RGB colour key (tRNS) is transparency too
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode), mode="L").convert("RGB")
    if has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as error:
        raise _Refused(f"unsupported color mode {image.mode} ({error})") from None


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth values onto 0..255 by their range; clipping would turn most of the image white."""
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        full_scale = 65535.0
    elif mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        full_scale = 1.0  # float images are usually stored in 0..1
    else:
        # 32-bit "I" (old 16-bit PNG/TIFF readers) and other floats: the smallest usual range that fits.
        peak = float(values.max()) if values.size else 0.0
        full_scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return np.clip(np.round(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():  # the scan lists a dangling link as an image; "deleted after the scan?" would mislead
            raise _Refused(f"broken symbolic link: its target {os.readlink(path)} does not exist") from None
        raise _Refused("file not found (deleted after the scan?)") from None
    except OSError as error:
        raise _Refused(f"unreadable ({error.strerror or error})") from None
    if not data:
        raise _Refused("zero bytes")
    return data


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open the header only and refuse a too-large claimed size before any pixel is allocated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        # Pillow refuses above 2 × its own limit before we see the size; report it the same way.
        raise _Refused(_too_many_pixels(_header_size(data), min(max_pixels, PILLOW_PIXEL_LIMIT))) from None
    except UnidentifiedImageError:
        raise _Refused(_unidentified_reason(data)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise _Refused(f"corrupt {_magic_format(data) or 'image'} header ({error})") from None
    if image.width * image.height > max_pixels:
        raise _Refused(_too_many_pixels(image.size, max_pixels))
    return image


def _decode_fully(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        kind = "truncated" if "truncated" in str(error).lower() else "corrupt"
        detail = "" if kind == "truncated" else f" ({error})"
        raise _Refused(f"{kind} {image.format or 'image'}{detail}") from None


def _too_many_pixels(size: tuple[int, int] | None, limit: int) -> str:
    claimed = f"{size[0]}×{size[1]} px" if size else "too many pixels"
    return f"header claims {claimed} (over the {limit // 1_000_000} MP limit)"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The size a header claims, read with Pillow's format parsers but without its bomb check."""
    Image.init()
    for format_id in Image.ID:
        factory, accept = Image.OPEN[format_id]
        accepted = accept(data[:16]) if accept else True
        if accepted is True or (accepted and not isinstance(accepted, str)):
            try:
                return factory(io.BytesIO(data), "").size  # parses the header, decodes nothing
            except Exception:  # noqa: BLE001 - any parser failure just means "not this format"
                continue
    return None


def _magic_format(data: bytes) -> str | None:
    return next((name for magic, name in MAGIC_NUMBERS.items() if data.startswith(magic)), None)


def _unidentified_reason(data: bytes) -> str:
    looks_like = _magic_format(data)
    if looks_like:
        return f"corrupt {looks_like} (starts like one but cannot be read)"
    brand = ISO_IMAGE_BRANDS.get(data[8:12]) if data[4:8] == b"ftyp" else None
    if brand:  # an iPhone photo renamed .jpg, say: the name says JPEG, the bytes HEIC
        article = "an" if brand[0] in "AEIOU" else "a"
        return f"{article} {brand} image (whatever its name says), which cannot be read here: convert it to PNG or JPEG"
    return "not an image"


def _nothing_usable_message(skipped: list[SkippedImage], min_side: int, role: str) -> str:
    images = "images" if role == "training" else f"{role} images"
    if not skipped:
        return f"no {images} to train on: the scan found none"
    reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped[:8])
    more = f" (+{len(skipped) - 8} more)" if len(skipped) > 8 else ""
    return (f"none of the {len(skipped)} {images} can be used for training ({reasons}{more}). Fix or replace "
            f"these files: they must be readable PNG/JPEG/WEBP images at least {min_side} px on each side.")


def write_skip_report(run_dir: str | Path, skipped: list[SkippedImage], file_name: str = "skipped.txt",
                      ignored: Sequence[IgnoredFile] = (), upscaled: Sequence[tuple[Path, str]] = ()) -> Path:
    """Write `run_dir/skipped.txt` (one `path<TAB>reason` line per skipped file) atomically; return its path.

    `ignored`: the files the scan left out (not images, captions without an image, unreadable formats), each with
    its reason: the console names only the first five, so this file is where a user finds the rest. `upscaled`:
    (path, note) of images trained blown up far beyond their size (kept, but listed for the user to replace)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "# images skipped before training: path<TAB>reason\n" + _report_lines(
        (s.path, s.reason) for s in skipped)
    if ignored:
        text += "# files the scan ignored: path<TAB>reason\n" + _report_lines((i.path, i.reason) for i in ignored)
    if upscaled:
        text += "# images trained, but upscaled a lot (blurry): path<TAB>how much\n" + _report_lines(upscaled)
    return write_text_atomic(run_dir / file_name, text)


def _report_lines(entries) -> str:
    lines = [printable(f"{path}\t{reason}") for path, reason in sorted(entries, key=lambda entry: str(entry[0]))]
    return "".join(line + "\n" for line in lines)


def skip_summary(skipped: list[SkippedImage], total: int, report_path: str | Path | None = None,
                 *, max_names: int = 6) -> str:
    """One line: '3 of 312 images skipped (truncated PNG: a.png; not an image: notes.txt) — see …/skipped.txt'."""
    if not skipped:
        return f"all {total} images passed the checks"
    by_reason: dict[str, list[str]] = defaultdict(list)
    for s in skipped:
        by_reason[s.reason].append(s.path.name)
    shown, groups = 0, []
    for reason, names in by_reason.items():
        if shown >= max_names:
            break
        take = names[: max_names - shown]
        shown += len(take)
        groups.append(f"{reason}: {', '.join(take)}")
    more = f"; +{len(skipped) - shown} more" if shown < len(skipped) else ""
    see = f" — see {report_path}" if report_path else ""
    return f"{len(skipped)} of {total} images skipped ({'; '.join(groups)}{more}){see}"


# An image blown up more than this to fill its bucket trains as a blur the adapter learns as part of the style: a
# 20 px thumbnail in a 512 px SD 1.5 run is upscaled ~25×. kohya trains them silently (or, with
# --bucket_no_upscale, at their own tiny size); a warning leaves the choice to the user.
MAX_UPSCALE = 4.0
UPSCALED_SHOWN = 5  # images named in the warning; skipped.txt lists them all


def upscaled_images(images: Sequence[CheckedImage], buckets, limit: float = MAX_UPSCALE
                    ) -> list[tuple[CheckedImage, tuple[int, int]]]:
    """(image, its bucket) for each image scaled up more than `limit` times to cover its bucket (`buckets`: the
    run's data.buckets.BucketConfig), as the training crops do; with no_upscale an image keeps about its size."""
    from stylelora.data.buckets import make_buckets, select_bucket

    sizes = make_buckets(buckets)
    found = []
    for image in images:
        bucket = select_bucket(image.width, image.height, buckets, sizes)
        if _upscale(image, bucket) > limit:
            found.append((image, bucket))
    return found


def _upscale(image: CheckedImage, bucket: tuple[int, int]) -> float:
    """How many times `image` is scaled up to cover `bucket` (the larger of the two sides' factors)."""
    return max(bucket[0] / image.width, bucket[1] / image.height)


def upscaled_notes(upscaled: list[tuple[CheckedImage, tuple[int, int]]]) -> list[tuple[CheckedImage, str]]:
    """'20×20 → 512×512 (25.6×)' for each image upscaled_images found, largest factor first."""
    ordered = sorted(upscaled, key=lambda entry: _upscale(*entry), reverse=True)
    return [(image, f"{image.width}×{image.height} → {bucket[0]}×{bucket[1]} ({_upscale(image, bucket):.1f}×)")
            for image, bucket in ordered]


def upscale_warning(upscaled: list[tuple[CheckedImage, tuple[int, int]]], resolution: int,
                    report_path: str | Path | None = None) -> str | None:
    """A warning naming the first few images upscaled more than MAX_UPSCALE times, or None when there are none."""
    if not upscaled:
        return None
    notes = upscaled_notes(upscaled)
    named = "; ".join(f"{image.item.key} {note}" for image, note in notes[:UPSCALED_SHOWN])
    more = f"; +{len(notes) - UPSCALED_SHOWN} more" if len(notes) > UPSCALED_SHOWN else ""
    listed = f" (all listed in {report_path})" if report_path and more else ""
    return (f"warning: {len(notes)} image{'s are' if len(notes) > 1 else ' is'} upscaled more than "
            f"{MAX_UPSCALE:g}× to fill {resolution} px buckets, so the adapter learns their blur as part of the look: "
            f"{printable(named)}{more}{listed}. Replace them with larger images or remove them (--no-upscale trains "
            "each at about its own size instead).")
