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
