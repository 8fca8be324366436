"""Folder scan: kohya layout, flat folder, metadata.jsonl, missing captions, extra trigger word."""

import json
from pathlib import Path

import pytest
from PIL import Image

from stylelora.data.errors import DataError
from stylelora.data.scan import TrainItem, add_trigger, dataset_dirs, scan_folder


def _image(path: Path, caption: str | None = None, caption_ext: str = ".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(caption_ext).write_text(caption, encoding="utf-8")
    return path


def _by_name(items: list[TrainItem]) -> dict[str, TrainItem]:
    return {item.path.name: item for item in items}


def test_kohya_layout_repeats_triggers_and_missing_captions(tmp_path):
    _image(tmp_path / "10_zorb creature" / "a.png", "zorb, red, on a yellow background")
    _image(tmp_path / "10_zorb creature" / "b.png")  # no caption: trigger words stand in
    _image(tmp_path / "10_zorb creature" / "c.jpg", "blue zorb", caption_ext=".caption")
    _image(tmp_path / "2_pastel" / "d.png", "a pastel circle")
    _image(tmp_path / "notes" / "x.png", "not a kohya folder")
    _image(tmp_path / "stray.png")

    items, report = scan_folder(tmp_path)

    found = _by_name(items)
    assert sorted(found) == ["a.png", "b.png", "c.jpg", "d.png"]
    assert found["a.png"] == TrainItem(tmp_path / "10_zorb creature" / "a.png", "zorb, red, on a yellow background",
                                       10, "10_zorb creature")
    assert found["b.png"].caption == "zorb creature"
    assert found["c.jpg"].caption == "blue zorb"
    assert (found["d.png"].repeats, found["d.png"].folder) == (2, "2_pastel")
    assert report.layout == "kohya"
    assert [(f.name, f.repeats, f.trigger, f.image_count) for f in report.folders] == [
        ("10_zorb creature", 10, "zorb creature", 3), ("2_pastel", 2, "pastel", 1)]
    assert report.uncaptioned == [(tmp_path / "10_zorb creature" / "b.png", "zorb creature")]
    ignored = {i.path.name: i.reason for i in report.ignored}
    assert "notes" in ignored and "10_notes" in ignored["notes"]  # tells how to rename it
    assert "stray.png" in ignored
    summary = report.summary()
    assert "Found 4 images" in summary and "kohya layout" in summary
    assert "b.png → 'zorb creature'" in summary and "Ignored 2 files" in summary
    assert dataset_dirs(items) == {"10_zorb creature": {"n_repeats": 10, "img_count": 3},
                                   "2_pastel": {"n_repeats": 2, "img_count": 1}}


def test_txt_caption_wins_over_caption_file_with_a_warning(tmp_path):
    image = _image(tmp_path / "1_style" / "a.png", "from txt")
    image.with_suffix(".caption").write_text("from caption", encoding="utf-8")
    items, report = scan_folder(tmp_path)
    assert items[0].caption == "from txt"
    assert any("a.caption" in w and "a.txt" in w for w in report.warnings)


def test_caption_file_details_bom_multiline_and_orphans(tmp_path):
    folder = tmp_path / "3_ink"
    _image(folder / "a.png")
    (folder / "a.txt").write_bytes("\ufeffink style\n\n  red circle  \n".encode("utf-8"))
    (folder / "orphan.txt").write_text("no image", encoding="utf-8")
    _image(folder / "empty.png", "")  # empty caption file counts as missing
    items, report = scan_folder(tmp_path)
    found = _by_name(items)
    assert found["a.png"].caption == "ink style, red circle"
    assert found["a.png"].variants == ("ink style", "red circle")  # alternatives with --caption-variants
    assert found["empty.png"].caption == "ink" and found["empty.png"].variants == ()
    assert [i.path.name for i in report.ignored] == ["orphan.txt"]


def test_data_folder_may_itself_be_a_kohya_folder(tmp_path):
    _image(tmp_path / "5_toy stripes" / "a.png")
    items, report = scan_folder(tmp_path / "5_toy stripes")
    assert (items[0].repeats, items[0].caption, report.layout) == (5, "toy stripes", "kohya")


def test_flat_folder(tmp_path):
    _image(tmp_path / "a.png", "a red circle")
    _image(tmp_path / "b.webp")
    (tmp_path / "readme.md").write_text("hi", encoding="utf-8")
    (tmp_path / "c.heic").write_bytes(b"\0" * 10)
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    items, report = scan_folder(tmp_path)
    found = _by_name(items)
    assert report.layout == "flat"
    assert (found["a.png"].caption, found["a.png"].repeats, found["a.png"].folder) == ("a red circle", 1, tmp_path.name)
    assert found["b.webp"].caption == ""  # no trigger words in a flat folder: reported, not invented
    assert report.uncaptioned == [(tmp_path / "b.webp", "")]
    reasons = {i.path.name: i.reason for i in report.ignored}
    assert set(reasons) == {"readme.md", "c.heic"}
    assert "convert them to PNG" in reasons["c.heic"]


def test_metadata_jsonl(tmp_path):
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "b.png")
    _image(tmp_path / "unlisted.png")
    lines = [{"file_name": "img/a.png", "text": "a zorb"}, {"file_name": "b.png", "caption": "b zorb"},
             {"file_name": "gone.png", "text": "deleted"}, {"file_name": "b.png", "text": "dup"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    items, report = scan_folder(tmp_path)
    found = _by_name(items)
    assert report.layout == "metadata.jsonl"
    assert (found["a.png"].caption, found["a.png"].folder) == ("a zorb", "img")
    assert (found["b.png"].caption, found["b.png"].folder) == ("b zorb", tmp_path.name)
    reasons = {i.path.name: i.reason for i in report.ignored}
    assert "line 3 but missing" in reasons["gone.png"]
    assert reasons["unlisted.png"] == "not listed in metadata.jsonl"
    assert any("listed twice" in w for w in report.warnings)


@pytest.mark.parametrize("line, message", [
    ('{"file_name": "a.png", "text": "x"', "line 1 is not valid JSON"),
    ('{"text": "x"}', 'line 1 has no "file_name"'),
])
def test_malformed_metadata_is_refused_with_the_line(tmp_path, line, message):
    (tmp_path / "metadata.jsonl").write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        scan_folder(tmp_path)


def test_extra_trigger_is_added_once_in_front(tmp_path):
    _image(tmp_path / "1_style" / "a.png", "red circle")
    _image(tmp_path / "1_style" / "b.png", "a Zorb, blue")
    _image(tmp_path / "1_style" / "c.png")
    items, _ = scan_folder(tmp_path, extra_trigger="zorb")
    assert [item.caption for item in items] == ["zorb, red circle", "a Zorb, blue", "zorb, style"]


@pytest.mark.parametrize("layout, trigger, expected, unexpected", [
    ("flat", None, "1 images have no caption and no trigger words, so they train with an empty caption: b.png. "
                   "Write NAME.txt beside each, or pass --trigger WORD.", "trigger words alone"),
    ("flat", "inkstyle", "1 images have no caption and train with the trigger words alone: b.png → 'inkstyle'",
     "empty caption"),
    ("flat", "inkstyle", "flat (2 images × 1 repeats, trigger 'inkstyle')", "empty caption"),
    ("kohya", None, "1 images have no caption and train with the trigger words alone: b.png → 'style'",
     "empty caption"),
    ("kohya", "inkstyle", "b.png → 'inkstyle, style'", "b.png → 'style'"),
])
def test_the_summary_says_what_an_uncaptioned_image_trains_with(tmp_path, layout, trigger, expected, unexpected):
    folder = tmp_path / ("2_style" if layout == "kohya" else "flat")
    _image(folder / "a.png", "a red circle")
    _image(folder / "b.png")
    _, report = scan_folder(folder.parent if layout == "kohya" else folder, extra_trigger=trigger)
    assert expected in report.summary() and unexpected not in report.summary()


def test_the_summary_leaves_out_images_the_checks_skip(tmp_path):
    _image(tmp_path / "1_style" / "a.png")
    (tmp_path / "1_style" / "zero.png").write_bytes(b"")
    _, report = scan_folder(tmp_path)
    assert "zero.png" in report.summary()
    summary = report.summary(left_out=frozenset({tmp_path / "1_style" / "zero.png"}))
    assert "1 images have no caption" in summary and "zero.png" not in summary


@pytest.mark.parametrize("caption, trigger, expected", [
    ("red circle", "zorb", "zorb, red circle"),
    ("zorb, red", "zorb", "zorb, red"),
    ("ZORB red", "zorb", "ZORB red"),
    ("zorbish red", "zorb", "zorb, zorbish red"),  # whole words only
    ("", "zorb", "zorb"),
    ("red", "", "red"),
    ("a sks style image", "sks style", "a sks style image"),
])
def test_add_trigger(caption, trigger, expected):
    assert add_trigger(caption, trigger) == expected


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no training images found"),
    (lambda root: (root / "notes.txt").write_text("x"), "Ignored: notes.txt"),
    (lambda root: (root / "0_never").mkdir() or _image(root / "0_never" / "a.png"), "0 repeats"),
])
def test_no_images_is_a_data_error_that_explains_the_layouts(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message) as error:
        scan_folder(tmp_path)
    assert "metadata.jsonl" in str(error.value)


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")


def test_a_regularization_folder_is_named_as_one_in_errors(tmp_path):
    with pytest.raises(DataError, match=r"^regularization folder \(--reg-dir\) .*nope does not exist"):
        scan_folder(tmp_path / "nope", role="regularization")
    with pytest.raises(DataError, match="^no regularization images found in"):
        scan_folder(tmp_path, role="regularization")


def test_caption_extension_is_matched_in_any_case(tmp_path):
    """As image extensions are: datasets made on Windows or macOS often have IMG.TXT beside IMG.PNG."""
    _image(tmp_path / "b.png", "upper txt", caption_ext=".TXT")
    _image(tmp_path / "c.PNG", "mixed caption", caption_ext=".Caption")
    (tmp_path / "d.TXT").write_text("no image", encoding="utf-8")
    _image(tmp_path / "photo.png")
    (tmp_path / "Photo.txt").write_text("name in another case", encoding="utf-8")  # as Windows and macOS find it
    items, report = scan_folder(tmp_path)
    assert {name: item.caption for name, item in _by_name(items).items()} == {"b.png": "upper txt",
                                                                             "c.PNG": "mixed caption",
                                                                             "photo.png": "name in another case"}
    assert report.uncaptioned == []
    assert [(i.path.name, i.reason) for i in report.ignored] == [("d.TXT", "caption without an image of the same name")]


def test_a_kohya_ss_project_folder_is_answered_with_its_image_folder(tmp_path):
    _image(tmp_path / "img" / "10_mystyle" / "a.png", "mystyle, a cat")
    (tmp_path / "reg" / "1_person").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    with pytest.raises(DataError, match=r"looks like a kohya_ss project folder: pass its image folder, .*img \(and "
                                         r"--reg-dir .*reg\)"):
        scan_folder(tmp_path)


def test_utf16_captions_are_read_and_other_encodings_named(tmp_path):
    _image(tmp_path / "notepad.png")
    (tmp_path / "notepad.txt").write_bytes("zorb, naïve café".encode("utf-16"))  # Notepad's "Unicode", with a BOM
    _image(tmp_path / "old.png")
    (tmp_path / "old.txt").write_bytes("zorb, naïve".encode("cp1252"))
    items, report = scan_folder(tmp_path)
    assert _by_name(items)["notepad.png"].caption == "zorb, naïve café"
    assert _by_name(items)["old.png"].caption == "zorb, na\ufffdve"
    assert "old.txt is not UTF-8 text" in report.summary() and "notepad.txt" not in report.summary()


def test_metadata_text_as_a_list_of_tags_is_joined_like_kohya_tags(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    lines = [{"file_name": "a.png", "text": ["zorb", " red ", ""]}, {"file_name": "b.png", "text": {"tags": "x"}}]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(lines[0]) + "\n", encoding="utf-8")
    items, _ = scan_folder(tmp_path)
    assert _by_name(items)["a.png"].caption == "zorb, red"
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(DataError, match='metadata.jsonl line 2: "text" must be a caption string or a list of tag'):
        scan_folder(tmp_path)


def test_nested_subfolders_are_reported_not_silently_dropped(tmp_path):
    _image(tmp_path / "4_ink" / "a.png", "ink")
    _image(tmp_path / "4_ink" / "more" / "b.png", "ink")
    items, report = scan_folder(tmp_path)
    assert [item.path.name for item in items] == ["a.png"]
    assert [(i.path.name, i.reason.split(",")[0]) for i in report.ignored] == [("more", "subfolder")]


def test_extra_trigger_goes_in_front_of_every_caption_line(tmp_path):
    _image(tmp_path / "a.png", "a red circle\nink, a blue square\n")
    items, _ = scan_folder(tmp_path, extra_trigger="ink")
    assert items[0].caption == "a red circle, ink, a blue square"  # the trigger is in the caption already
    assert items[0].variants == ("ink, a red circle", "ink, a blue square")


def test_metadata_text_with_several_lines_reads_like_a_caption_file(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "ink, a\nink, b"}) + "\n",
                                             encoding="utf-8")
    items, _ = scan_folder(tmp_path)
    assert (items[0].caption, items[0].variants) == ("ink, a, ink, b", ("ink, a", "ink, b"))
