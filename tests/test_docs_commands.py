"""Every command the README and docs/ show parses (`--help` level), so the docs cannot rot."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from stylelora.cli import build_parser
from stylelora.train.command import parse_args

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:stylelora|python -m stylelora\.cli|\.venv/bin/stylelora) [^`]+)`")


def shown_commands() -> list[tuple[str, str]]:
    """(doc name, command) for each stylelora / benchmarks / scripts command in a code block or inline span."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        lines = [line for block in FENCE.findall(text) for line in _joined(block)]
        lines += INLINE.findall(text)
        for line in lines:
            for part in re.split(r"&&|;|\|", line.split("  #")[0]):
                part = part.strip()
                if part.startswith(("stylelora ", ".venv/bin/stylelora ", "python -m stylelora", "python benchmarks/",
                                    "bash scripts/", ".venv/bin/python -m pytest", "python app.py")):
                    found.append((doc.name, part))
    return found


def _joined(block: str) -> list[str]:
    return block.replace("\\\n", " ").splitlines()


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_command_parses(doc, command):
    words = shlex.split(command)
    if words[0] in ("stylelora", ".venv/bin/stylelora"):
        args = words[1:]
    elif words[:3] == ["python", "-m", "stylelora.cli"]:
        args = words[3:]
    elif words[:3] == ["python", "-m", "stylelora.options_doc"] or "pytest" in words[:3]:
        return
    else:  # scripts, benchmarks, the app and pytest: the file must exist
        target = next(w for w in words[1:] if not w.startswith("-"))
        assert (REPO / target).exists(), f"{doc}: {command}: {target} does not exist"
        return
    if len(args) == 1:  # the command named in running text ("`stylelora train`'s defaults")
        args = [*args, "--help"]
    try:
        parse_args(build_parser(), args)  # as `stylelora` parses: no abbreviated flags
    except SystemExit as exit_:
        if exit_.code == 0 and args[-1] == "--help":
            return
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exit_.code})")


LINK = re.compile(r"\]\((?![a-z]+://)([^)\s]*?\.md)?(#[^)\s]+)?\)")  # not web addresses


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but - and _ dropped, spaces as -, a
    repeated heading numbered -1, -2, ..."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, number = slug, 0
        while anchor in anchors:
            number += 1
            anchor = f"{slug}-{number}"
        anchors.add(anchor)
    return anchors


def links() -> list[tuple[str, str, str]]:
    """(doc name, linked file, anchor) for every link to a markdown file or a heading in the README and docs/."""
    found = []
    for doc in DOCS:
        for target, anchor in LINK.findall(doc.read_text(encoding="utf-8")):
            if target or anchor:
                found.append((doc.name, str((doc.parent / target).resolve()) if target else str(doc), anchor))
    return found


LINKS = links()


def test_links_to_web_pages_are_not_read_as_files():
    assert LINK.findall("[a](https://example.org/README.md) [b](training.md#x) [c](#y)") == [("training.md", "#x"),
                                                                                              ("", "#y")]


def test_heading_anchors_follow_githubs_rules():
    assert heading_anchors("## Stacked prompts and `--decoy-company`\n### The earlier recipe (0.1, no text)\n## A b\n## A b") \
        == {"stacked-prompts-and---decoy-company", "the-earlier-recipe-01-no-text", "a-b", "a-b-1"}


@pytest.mark.parametrize("doc, target, anchor", LINKS, ids=[f"{d}->{Path(t).name}{a}" for d, t, a in LINKS])
def test_links_reach_a_file_and_heading(doc, target, anchor):
    path = Path(target)
    assert path.is_file(), f"{doc} links to {path.name}, which does not exist"
    if anchor:
        assert anchor[1:] in heading_anchors(path.read_text(encoding="utf-8")), \
            f"{doc} links to {path.name}{anchor}, which has no such heading"
