"""Messy dataset folders as kohya users hand them over: dangling links, empty or date-named kohya folders,
images in subfolders, file and folder names unzipped from another system's encoding, `train .` / `train ..`."""

import os
from pathlib import Path

import pytest
from PIL import Image

from stylelora.config import ConfigError, load_config
from stylelora.data.checks import check_items, write_skip_report
from stylelora.data.errors import DataError
from stylelora.data.scan import TrainItem, scan_folder


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


def _undecodable(folder: Path, name: bytes) -> Path:
    """A path whose name holds bytes that are not UTF-8 (as `unzip` leaves a Shift-JIS or Latin-1 name)."""
    try:
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")


def test_a_dangling_link_is_skipped_as_a_broken_link(tmp_path):
    _image(tmp_path / "1_style" / "a.png")
    (tmp_path / "1_style" / "b.png").symlink_to(tmp_path / "elsewhere" / "gone.png")
    result = check_items(scan_folder(tmp_path)[0])
    [skipped] = result.skipped
    assert skipped.path.name == "b.png"
    assert skipped.reason.startswith("broken symbolic link") and "gone.png" in skipped.reason
    assert "deleted after the scan" not in skipped.reason


def test_empty_kohya_folders_are_named_instead_of_the_list_of_layouts(tmp_path):
    (tmp_path / "10_style").mkdir()
    _image(tmp_path / "5_other" / "pics" / "a.png")  # one level too deep
    with pytest.raises(DataError) as error:
        scan_folder(tmp_path)
    message = str(error.value)
    assert "folders (10_style, 5_other) hold no image files" in message and "Expected one of" not in message
    assert "pics: subfolder, not scanned" in message


def test_a_flat_folder_with_images_only_in_subfolders_says_to_rename_them(tmp_path):
    _image(tmp_path / "portraits" / "a.png")
    with pytest.raises(DataError, match=r"portraits: subfolder, not scanned: .*rename it .* e\.g\. 10_portraits"):
        scan_folder(tmp_path)


def test_a_date_named_kohya_folder_gets_a_warning_naming_how_it_was_read(tmp_path):
    _image(tmp_path / "2024_03_commissions" / "a.png")
    _image(tmp_path / "2024_03_commissions" / "b.png")
    items, report = scan_folder(tmp_path / "2024_03_commissions")
    assert items[0].repeats == 2024  # kohya's rule, kept; the report says so
    assert "2024_03_commissions is read as 2024 repeats per epoch with the trigger words '03_commissions'" \
        in report.summary()
    _, usual = scan_folder(_image(tmp_path / "data" / "100_style" / "a.png").parents[1])
    assert usual.warnings == []


def test_a_kohya_folder_whose_name_is_not_utf8_is_refused_before_training(tmp_path):
    folder = _undecodable(tmp_path / "data", b"10_caf\xe9")
    _image(folder / "a.png")
    with pytest.raises(DataError, match=r"folder name 10_caf\\xe9 .* is not UTF-8 text.*Rename it"):
        scan_folder(tmp_path / "data")


def test_the_skip_report_names_a_file_whose_name_is_not_utf8(tmp_path):
    bad = _undecodable(tmp_path / "1_style", b"bad\xe9.png")
    bad.write_bytes(b"not an image")
    _image(tmp_path / "1_style" / "ok.png")
    result = check_items(scan_folder(tmp_path)[0])
    report = write_skip_report(tmp_path / "run", result.skipped)
    assert "bad\\xe9.png\tnot an image" in report.read_text(encoding="utf-8")


def test_a_data_folder_that_is_not_utf8_is_refused_with_the_settings():
    with pytest.raises(ConfigError, match=r"data\.dir is not UTF-8 text \(my-art\\xe9\): rename"):
        load_config(None, {"data.dir": "my-art\udce9"})


@pytest.mark.parametrize("given, name", [(".", "10_style"), ("..", "my-art"), ("./", "10_style"), ("../", "my-art")])
def test_the_adapter_is_named_after_the_folder_given_as_dot_or_dotdot(tmp_path, monkeypatch, given, name):
    inside = tmp_path / "my-art" / "10_style"
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    config = load_config(None, {"data.dir": given})
    assert config.train.output_name == name
    assert config.adapter_path.name == f"{name}.safetensors"


@pytest.mark.parametrize("name", [".", ".."])
def test_an_output_name_of_dot_or_dotdot_is_refused(name):
    with pytest.raises(ConfigError, match=r"train\.output_name must be a plain file name \(not \. or \.\."):
        load_config(None, {"data.dir": "datasets/toy-stripes", "train.output_name": name})


def test_a_missing_file_that_is_not_a_link_keeps_its_reason(tmp_path):
    outcome = check_items([TrainItem(_image(tmp_path / "a.png"), "x"), TrainItem(tmp_path / "gone.png", "x")])
    assert [s.reason for s in outcome.skipped] == ["file not found (deleted after the scan?)"]


def test_a_metadata_file_beside_kohya_folders_says_which_images_it_leaves_out(tmp_path):
    _image(tmp_path / "listed.png")
    _image(tmp_path / "10_style" / "a.png")
    _image(tmp_path / "10_style" / "b.png")
    _image(tmp_path / "3_other" / "c.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "listed.png", "text": "a"}\n'
                                             '{"file_name": "3_other/c.png", "text": "c"}\n', encoding="utf-8")
    items, report = scan_folder(tmp_path)
    assert sorted(item.path.name for item in items) == ["c.png", "listed.png"]
    assert "images of 10_style (2 images) that it does not list are left out" in report.summary()
    assert "3_other" not in report.summary().split("left out")[0].split("images of")[1]  # all of it is listed


def test_a_macos_zip_folder_is_not_reported_as_a_folder_to_rename(tmp_path):
    _image(tmp_path / "kohya" / "10_style" / "a.png")
    (tmp_path / "kohya" / "__MACOSX" / "10_style").mkdir(parents=True)
    (tmp_path / "kohya" / "__MACOSX" / "10_style" / "._a.png").write_bytes(b"\0\5\26\7")
    _image(tmp_path / "flat" / "b.png")
    (tmp_path / "flat" / "__MACOSX").mkdir()
    for root in (tmp_path / "kohya", tmp_path / "flat"):
        _, report = scan_folder(root)
        assert report.ignored == [] and "MACOSX" not in report.summary()
