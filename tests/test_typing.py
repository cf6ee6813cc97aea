"""What ``mypy --strict`` sees in the code a user writes first: the default database's
session is a typed ``Session`` (not ``Any``), and so is the plain dependency's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = """
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from sessionscope import db
from sessionscope.adapters.starlette import session_dependency

reveal_type(db.session)
reveal_type(db.session())
SessionDep = Annotated[Session, Depends(session_dependency)]
reveal_type(session_dependency())
db.session.comit()
"""


def mypy_strict(directory: Path, source: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``source``, written as ``snippet.py`` in ``directory``."""
    (directory / "snippet.py").write_text(source)
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "snippet.py"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )


@pytest.mark.timeout(300)
def test_the_default_database_is_typed_for_a_sync_session(tmp_path: Path) -> None:
    """``from sessionscope import db`` gives ``db.session`` as ``scoped_session[Session]``
    under ``mypy --strict``, so a typo'd method or a wrong argument is caught (it was
    ``Any``, which hides both)."""
    done = mypy_strict(tmp_path, SNIPPET)
    lines = done.stdout.splitlines()
    scoped = "sqlalchemy.orm.scoping.scoped_session[sqlalchemy.orm.session.Session]"
    assert f'Revealed type is "{scoped}"' in lines[0], done.stdout
    assert 'Revealed type is "sqlalchemy.orm.session.Session"' in lines[1]
    assert 'Revealed type is "sqlalchemy.orm.session.Session"' in lines[2]
    # The typed session catches a typo (Any would accept it silently).
    assert 'snippet.py:14: error: "scoped_session[Session]" has no attribute "comit"' in lines[3]


@pytest.mark.timeout(300)
def test_the_readme_example_passes_mypy_strict(tmp_path: Path) -> None:
    """The README's opening app, as a user copies it, type-checks under ``mypy --strict``."""
    from .test_docs_snippets import python_blocks

    done = mypy_strict(tmp_path, python_blocks(ROOT / "README.md")[0].code)
    assert done.returncode == 0, done.stdout
