"""Image checks: every bad file is skipped with the right reason, odd-but-valid files become upright RGB."""

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylelora.data.checks import (CheckedImage, SkippedImage, check_image, check_items, load_rgb_image,
                                   skip_summary, to_rgb, write_skip_report)
from stylelora.data.errors import DataError
from stylelora.data.scan import TrainItem

NOISE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height (valid CRC) and carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(NOISE).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(NOISE).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


BAD_FILES = {  # file name -> (bytes, reason)
    "truncated.png": (_truncated_png, "truncated PNG"),
    "truncated.jpg": (_truncated_jpeg, "truncated JPEG"),
    "empty.png": (lambda: b"", "zero bytes"),
    "notes.png": (lambda: b"these are my notes, not a picture\n", "not an image"),
    "broken_header.png": (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt PNG (starts like one but cannot be read)"),
    "iphone.jpg": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64,
                   "a HEIC image (whatever its name says), which cannot be read here: convert it to PNG or JPEG"),
    "photo.png": (lambda: b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + b"\0" * 64,
                  "an AVIF image (whatever its name says), which cannot be read here: convert it to PNG or JPEG"),
    "dot.png": (lambda: _encoded(Image.new("RGB", (1, 1)), "PNG"), "too small (1×1 < 16 px)"),
    "thin.png": (lambda: _encoded(Image.new("RGB", (64, 8)), "PNG"), "too small (64×8 < 16 px)"),
    "bomb.png": (lambda: _png_with_header_size(60000, 60000), "header claims 60000×60000 px (over the 178 MP limit)"),
    "big.png": (lambda: _png_with_header_size(14000, 14000), "header claims 14000×14000 px (over the 178 MP limit)"),
}


def _item(path: Path) -> TrainItem:
    return TrainItem(path=path, caption="x", repeats=1, folder="1_x")


def _write(tmp_path: Path, name: str, data: bytes) -> TrainItem:
    (tmp_path / name).write_bytes(data)
    return _item(tmp_path / name)


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_skipped_with_its_reason(tmp_path, name):
    make, reason = BAD_FILES[name]
    outcome = check_image(_write(tmp_path, name, make()))
    assert outcome == SkippedImage(tmp_path / name, reason)


def test_missing_file_is_skipped(tmp_path):
    outcome = check_image(_item(tmp_path / "gone.png"))
    assert isinstance(outcome, SkippedImage) and outcome.reason.startswith("file not found")


@pytest.mark.parametrize("width, height", [(60000, 60000), (2**31 - 1, 2**31 - 1)])
def test_huge_header_is_refused_fast_without_allocating(tmp_path, width, height):
    item = _write(tmp_path, "bomb.png", _png_with_header_size(width, height))
    tracemalloc.start()
    outcome = check_image(item)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(outcome, SkippedImage) and outcome.reason.startswith(f"header claims {width}×{height} px")
    assert peak < 5_000_000  # bytes: nowhere near a decoded image


def test_a_smaller_pixel_limit_is_applied_before_decoding(tmp_path):
    item = _write(tmp_path, "ok.png", _encoded(Image.fromarray(NOISE), "PNG"))
    assert check_image(item, max_pixels=1000).reason == "header claims 32×32 px (over the 0 MP limit)"
    assert check_image(item, min_side=33).reason == "too small (32×32 < 33 px)"


def _rgb_of(tmp_path: Path, name: str, data: bytes) -> tuple[CheckedImage, np.ndarray]:
    item = _write(tmp_path, name, data)
    checked = check_image(item)
    assert isinstance(checked, CheckedImage), checked
    image = load_rgb_image(item.path)
    assert image.mode == "RGB" and image.size == (checked.width, checked.height)
    return checked, np.asarray(image).astype(int)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (24, 24), (0, 255, 255, 0))  # pure red in CMYK
    checked, rgb = _rgb_of(tmp_path, "cmyk.jpg", _encoded(cmyk, "JPEG", quality=95))
    assert checked.source_mode == "CMYK"
    assert np.abs(rgb[12, 12] - [255, 0, 0]).max() < 12


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    checked, rgb = _rgb_of(tmp_path, "deep.png", _encoded(Image.fromarray(ramp), "PNG"))
    assert checked.source_mode == "I;16"
    expected = np.round(ramp / 257).astype(int)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert rgb[0, 16, 0] == 132  # mid-grey stays mid-grey (clipping would give 255)


def test_32_bit_integer_and_float_images_are_scaled(tmp_path):
    wide = Image.fromarray(np.full((20, 20), 65535, dtype=np.int32), mode="I")
    _, rgb = _rgb_of(tmp_path, "int.tif", _encoded(wide, "TIFF"))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    unit = Image.fromarray(np.full((20, 20), 0.5, dtype=np.float32), mode="F")
    _, rgb = _rgb_of(tmp_path, "float.tif", _encoded(unit, "TIFF"))
    assert rgb[0, 0].tolist() == [128, 128, 128]


def _half_transparent() -> Image.Image:
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))  # left half opaque blue, right half transparent
    return rgba


def _palette_png(alpha_table: bool) -> bytes:
    image = Image.new("P", (20, 20), 1)
    image.putpalette([0, 0, 255, 0, 0, 0, 128, 128, 128])  # 0 blue, 1 black (transparent), 2 grey (unused)
    image.paste(0, (0, 0, 10, 20))  # left half blue, right half transparent
    if alpha_table:  # a tRNS chunk with one alpha per palette entry (what "palette + alpha" PNGs hold)
        return _encoded(image, "PNG", transparency=bytes([255, 0, 128]))
    return _encoded(image, "PNG", transparency=1)


@pytest.mark.parametrize("name, data", [
    ("palette_index.png", lambda: _palette_png(alpha_table=False)),
    ("palette_alpha.png", lambda: _palette_png(alpha_table=True)),
    ("rgba.png", lambda: _encoded(_half_transparent(), "PNG")),
    ("la.png", lambda: _encoded(_half_transparent().convert("LA"), "PNG")),
    # An RGB PNG whose tRNS chunk makes one colour transparent (what optipng/oxipng write for hard-edged alpha).
    ("rgb_key.png", lambda: _encoded(_half_transparent().convert("RGB"), "PNG", transparency=(0, 0, 0))),
])
def test_transparency_is_composited_on_white(tmp_path, name, data):
    checked, rgb = _rgb_of(tmp_path, name, data())
    assert checked.source_mode == {"palette_index.png": "P", "palette_alpha.png": "P", "rgba.png": "RGBA",
                                   "la.png": "LA", "rgb_key.png": "RGB"}[name]
    assert rgb[5, 15].tolist() == [255, 255, 255]
    if name == "la.png":
        assert rgb[5, 5].tolist() == [29, 29, 29]  # blue's luminance, opaque
    else:
        assert rgb[5, 5].tolist() == [0, 0, 255]


def test_palette_alpha_mode_in_memory_is_composited_on_white():
    rgb = np.asarray(to_rgb(_half_transparent().convert("PA")))
    assert rgb[5, 15].tolist() == [255, 255, 255] and rgb[5, 5].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied(tmp_path):
    landscape = Image.new("RGB", (40, 20), (255, 0, 0))
    landscape.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    checked, rgb = _rgb_of(tmp_path, "phone.jpg", _encoded(landscape, "JPEG", exif=exif, quality=95))
    assert (checked.width, checked.height) == (20, 40)
    assert rgb[5, 10, 0] > 200 and rgb[5, 10, 2] < 60  # top is the old left: red
    assert rgb[35, 10, 2] > 200 and rgb[35, 10, 0] < 60  # bottom is the old right: blue


def _mixed_folder(tmp_path: Path) -> list[TrainItem]:
    items = [_write(tmp_path, f"good{i}.png", _encoded(Image.fromarray(NOISE), "PNG")) for i in range(3)]
    items += [_write(tmp_path, name, BAD_FILES[name][0]()) for name in ("truncated.png", "notes.png", "dot.png")]
    return items


def test_check_items_keeps_good_images_and_reports_the_rest(tmp_path):
    result = check_items(_mixed_folder(tmp_path))
    assert [c.path.name for c in result.kept] == ["good0.png", "good1.png", "good2.png"]
    assert len({c.sha256 for c in result.kept}) == 1 and len(result.kept[0].sha256) == 64
    assert {s.path.name: s.reason for s in result.skipped} == {
        "truncated.png": "truncated PNG", "notes.png": "not an image", "dot.png": "too small (1×1 < 16 px)"}
    assert result.total == 6


def test_skip_report_file_and_summary_line(tmp_path):
    result = check_items(_mixed_folder(tmp_path))
    run_dir = tmp_path / "outputs" / "x"
    report = write_skip_report(run_dir, result.skipped)
    assert report == run_dir / "skipped.txt"
    lines = report.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#") and f"{tmp_path / 'notes.png'}\tnot an image" in lines
    assert len(lines) == 4 and not list(run_dir.glob("*.tmp"))
    assert skip_summary(result.skipped, result.total, report) == (
        f"3 of 6 images skipped (truncated PNG: truncated.png; not an image: notes.png; "
        f"too small (1×1 < 16 px): dot.png) — see {report}")


def test_summary_groups_reasons_and_caps_names():
    skipped = [SkippedImage(Path(f"t{i}.png"), "truncated PNG") for i in range(8)]
    skipped.append(SkippedImage(Path("n.txt"), "not an image"))
    line = skip_summary(skipped, 312, "outputs/x/skipped.txt", max_names=3)
    assert line == ("9 of 312 images skipped (truncated PNG: t0.png, t1.png, t2.png; +6 more) "
                    "— see outputs/x/skipped.txt")
    assert skip_summary([], 5) == "all 5 images passed the checks"


def test_all_bad_folder_raises_a_helpful_data_error(tmp_path):
    items = [_write(tmp_path, name, BAD_FILES[name][0]()) for name in ("empty.png", "notes.png", "bomb.png")]
    with pytest.raises(DataError) as error:
        check_items(items)
    message = str(error.value)
    assert "none of the 3 images can be used" in message
    assert "empty.png: zero bytes" in message and "notes.png: not an image" in message
    assert "at least 16 px" in message
    with pytest.raises(DataError, match="none of the 3 regularization images can be used"):
        check_items(items, role="regularization")


def test_load_rgb_image_refuses_a_file_changed_after_the_check(tmp_path):
    item = _write(tmp_path, "a.png", _encoded(Image.fromarray(NOISE), "PNG"))
    assert isinstance(check_image(item), CheckedImage)
    item.path.write_bytes(b"")
    with pytest.raises(DataError, match="zero bytes"):
        load_rgb_image(item.path)


def test_scanned_folder_end_to_end(tmp_path):
    from stylelora.data.scan import scan_folder

    folder = tmp_path / "data" / "5_zorb"
    folder.mkdir(parents=True)
    for name in ("truncated.png", "empty.png", "notes.png", "bomb.png"):
        (folder / name).write_bytes(BAD_FILES[name][0]())
    items, _ = scan_folder(tmp_path / "data")
    with pytest.raises(DataError, match="none of the 4 images can be used"):
        check_items(items)

    Image.fromarray(NOISE).save(folder / "good.png")
    items, _ = scan_folder(tmp_path / "data")
    result = check_items(items)
    assert [c.item.key for c in result.kept] == ["5_zorb/good.png"] and result.kept[0].item.repeats == 5
    assert sorted(s.reason.split(" (")[0] for s in result.skipped) == [
        "header claims 60000×60000 px", "not an image", "truncated PNG", "zero bytes"]
