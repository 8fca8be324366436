"""Atomic writes and the check that a path can be written, which generate and train run before their work."""
from __future__ import annotations

import pytest

from stylelora.atomic import file_in_the_way, write_text_atomic


@pytest.mark.parametrize("path, include_self, blocking", [
    ("new/run", True, None),  # nothing there yet: the folders can be made
    ("folder/run", True, None),
    ("afile", True, "afile"),  # the path itself is a file: no folder can be made there
    ("afile", False, None),  # ...but a file may be written there (generate's --out x.png)
    ("afile/run/deeper", True, "afile"),  # a file above the path
    ("afile/x.png", False, "afile"),
])
def test_file_in_the_way(tmp_path, path, include_self, blocking):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    found = file_in_the_way(tmp_path / path, include_self=include_self)
    assert found == (tmp_path / blocking if blocking else None)


def test_an_atomic_write_leaves_no_temp_file(tmp_path):
    target = write_text_atomic(tmp_path / "sub" / "a.txt", "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("value, folders, error", [
    ("new.png", False, None),
    ("folder", False, "--flag {tmp}/folder is a folder: give the new file's name in it, e.g. {tmp}/folder/e.png."),
    ("folder", True, None),  # generate numbers its images inside a folder
    ("run.v2", True, None),  # a folder's name may hold a dot...
    ("x.jpg", True, "this is written as a PNG; give a name ending in .png or a folder, e.g. {tmp}/x.png."),
    ("afile", True, "give a name ending in .png or a folder"),  # ...but an existing file is not a folder
    ("x", False, "give a name ending in .png, e.g. {tmp}/x.png."),
    ("afile/x.png", False, "{tmp}/afile is a file, so nothing can be written inside it"),
    ("old.png", False, "--flag {tmp}/old.png exists already: give another name, or add --overwrite"),
])
def test_a_file_target_is_checked_before_the_work(tmp_path, value, folders, error):
    from stylelora.atomic import check_file_target

    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "old.png").write_text("x")

    def check(overwrite):
        check_file_target("--flag", str(tmp_path / value), ".png", example="e.png", kind="a PNG",
                          overwrite=overwrite, folders=folders)

    if error is None:
        check(overwrite=False)
        return
    with pytest.raises(ValueError) as raised:
        check(overwrite=False)
    assert error.format(tmp=tmp_path) in str(raised.value)
    if "exists already" in error:
        check(overwrite=True)
