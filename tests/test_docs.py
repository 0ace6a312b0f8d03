"""Every `sf` command in the README and docs/ is a valid command line of this `sf`, and the worked
examples the docs point to run."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest

from spatial_forcing.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = [w for w in shlex.split(line, comments=True) if w != "..."]
                if words[:1] == ["torchrun"] and "sf" in words:
                    words = words[words.index("sf"):]
                if words[:1] == ["sf"]:
                    found.append((f"{page.name}: {line.strip()}", words[1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15
    assert {argv[0] for _, argv in COMMANDS} >= {"train", "cache-teacher", "convert", "collect", "probe", "quickstart",
                                                 "eval", "serve"}


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: not a valid sf command line"


def test_own_vla_example_trains(capsys):
    result = runpy.run_path(str(ROOT / "examples" / "own_vla.py"))["main"](steps=25)
    first, last = result["first"], result["last"]
    assert last[0] < first[0] and last[1] < first[1]  # both the action and the align loss went down
