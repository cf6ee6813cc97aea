"""Every Python block of README.md and docs/ runs as written, so a snippet that stops
working fails the suite.

A block runs as ``snippet.py`` in a fresh directory (its working directory, so the default
database is ``./sessionscope.sqlite3`` there), in a process of its own with warnings as
errors and no ``DATABASE_URL``; it must exit 0. An HTML comment on the line before the
opening fence changes that:

- ``<!-- snippet: continue -->``: appended to the page's previous Python block, the two
  run together (a "then try it" block with a test client and its asserts);
- ``<!-- snippet: file NAME -->``: written as NAME into the page's directory, not run by
  itself; the page's later blocks see it;
- ``<!-- snippet: pytest -->``: a test module, run by pytest (with sessionscope's plugin);
- ``<!-- snippet: postgresql -->`` / ``mariadb``: needs that server; ``DATABASE_URL`` names
  an empty database on it (skipped when the server is unreachable, failed under CI=true).

Blocks in other languages (console, toml, text) are not run here; the README's commands
are run by ``tests/test_front_door.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import empty_server_database

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<words>.+?)\s*-->\s*$")
_SERVERS = ("postgresql", "mariadb")


@dataclass
class Block:
    """One Python block of a page, with what its marker asks."""

    page: Path
    line: int
    code: str
    words: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The page's fenced Python blocks, in order, each with the marker just before it."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"]
        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(indent) :] if lines[index].strip() else "")
            index += 1
        index += 1
        if info not in ("python", "py"):
            continue
        previous = start - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        marker = _MARKER.match(lines[previous]) if previous >= 0 else None
        words = marker["words"].split() if marker else []
        blocks.append(Block(page, start + 1, "\n".join(body) + "\n", words))
    return blocks


def runnable() -> list[Any]:
    params = []
    for page in PAGES:
        for block in python_blocks(page):
            if block.words[:1] != ["file"]:
                params.append(pytest.param(block, id=block.id))
    return params


def _setup(block: Block, directory: Path) -> tuple[str, str]:
    """Write the page's files that come before ``block``; return its code and its mode."""
    code = block.code
    earlier = [b for b in python_blocks(block.page) if b.line < block.line]
    for other in earlier:
        if other.words[:1] == ["file"]:
            (directory / other.words[1]).write_text(other.code)
    if "continue" in block.words:
        runs = [b for b in earlier if b.words[:1] != ["file"]]
        assert runs, f"{block.id}: 'continue' but no Python block before it"
        chain = [block]
        for other in reversed(runs):
            chain.insert(0, other)
            if "continue" not in other.words:
                break
        code = "".join(b.code for b in chain)
    return code, "pytest" if "pytest" in block.words else "run"


@pytest.mark.parametrize("block", runnable())
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    """The block (with the page's files, and the blocks it continues) exits 0."""
    code, mode = _setup(block, tmp_path)
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith(("PYTEST_", "COV_CORE_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    for server in _SERVERS:
        if server in block.words:
            env["DATABASE_URL"] = empty_server_database(server)
    if mode == "pytest":
        (tmp_path / "test_snippet.py").write_text(code)
        command = [sys.executable, "-m", "pytest", "-W", "error", "-q", "-p", "no:cacheprovider"]
        command.append("test_snippet.py")
    else:
        (tmp_path / "snippet.py").write_text(code)
        command = [sys.executable, "-W", "error", "snippet.py"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"


def test_every_page_is_collected() -> None:
    """The README and the docs hold Python blocks that this file runs (a moved page or a
    misspelled fence would otherwise pass silently)."""
    counted = {page.name: len(python_blocks(page)) for page in PAGES}
    assert counted["README.md"] >= 1, counted
    assert sum(counted.values()) >= 20, counted
    for page in PAGES:
        for block in python_blocks(page):
            known = {"continue", "file", "pytest", *_SERVERS}
            assert block.words[:1] == [] or block.words[0] in known, block.id
