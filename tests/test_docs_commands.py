"""Every command the README and docs/ show parses (`--help` level), so the docs cannot rot."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from stylelora.cli import build_parser

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
        build_parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code == 0 and args[-1] == "--help":
            return
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exit_.code})")
