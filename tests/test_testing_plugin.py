"""The pytest plugin and the docs' testing examples, run as a user runs them.

Each example of ``docs/testing.md`` ("### ..." under "## With pytest") is written to a
directory as the docs give it, and ``pytest`` runs there in a process of its own, on every
backend, in both test orders, and under ``-n 2`` on the servers. Afterwards the database
holds no row and, inside that process, no unit is open and the pool has every connection
back (a small plugin of this file checks at the end of the session).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ._units import Rows
from .conftest import Backend, backend_params, idle_in_transaction

DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"

# Ends the session with a failure if anything of the app's database was left behind.
LEAK_CHECK = """
import pytest

import app


def pytest_sessionfinish(session: pytest.Session) -> None:
    db = app.db
    problems = []
    if db.live_units or db.live_sessions:
        problems.append(f"{db.live_units} unit(s), {db.live_sessions} session(s) left")
    if db.units.isolation is not None:
        problems.append("the database is still isolated")
    try:
        checked_out = db.sync_engine.pool.checkedout()
    except RuntimeError:
        checked_out = 0  # a Database of each Flask app's own: outside any app, no engine
    if checked_out:
        problems.append(f"{checked_out} connection(s) checked out")
    if problems:
        print("LEAK: " + "; ".join(problems))
        session.exitstatus = 1
"""

# Starlette 1.x prefers 'httpx2' for its TestClient; httpx still works.
PYTEST_INI = """[pytest]
filterwarnings =
    error
    ignore:Using `httpx` with `starlette.testclient` is deprecated
"""


def examples() -> dict[str, dict[str, str]]:
    """The files of each example in the docs' "With pytest" section, by its heading."""
    text = DOCS.read_text()
    section = text.split("## With pytest", 1)[1].split("\n## ", 1)[0]
    found: dict[str, dict[str, str]] = {}
    for part in section.split("\n### ")[1:]:
        heading = part.splitlines()[0].strip()
        files: dict[str, str] = {}
        for block in re.findall(r"```python\n(.*?)```", part, flags=re.S):
            first = block.splitlines()[0]
            match = re.fullmatch(r"# (\w+\.py)", first)
            assert match, f"a block of {heading!r} does not start with '# <file>.py'"
            files[match.group(1)] = block
        found[heading] = files
    return found


EXAMPLES = examples()
ASYNC = [name for name in EXAMPLES if "async driver" in name]


def test_the_docs_have_an_example_per_framework() -> None:
    """FastAPI/Starlette (sync and async drivers), Flask and plain WSGI each have one, with an
    app, a conftest.py and tests."""
    assert len(EXAMPLES) == 4
    for files in EXAMPLES.values():
        assert set(files) == {"app.py", "conftest.py", "test_items.py"}
    assert len(ASYNC) == 1


def _tests_in(source: str) -> list[str]:
    return re.findall(r"^(?:async )?def (test_\w+)", source, flags=re.M)


PLUGINS = ("-p", "leakcheck", "-p", "no:randomly")


def _run(directory: Path, backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": backend.url, "PYTHONPATH": str(directory)}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PLUGINS, *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _example_params() -> list[object]:
    params: list[object] = []
    for example in sorted(EXAMPLES):
        mode = "async" if example in ASYNC else "sync"
        short = example.split(" ", 1)[0].lower().strip("(")
        for param in backend_params(modes=[mode]):
            (value,) = param.values
            params.append(pytest.param(example, value, id=f"{short}-{param.id}", marks=param.marks))
    return params


@pytest.mark.parametrize(("example", "backend"), _example_params(), indirect=["backend"])
def test_docs_example_runs_as_written(
    example: str, backend: Backend, tmp_path: Path, rows: Rows
) -> None:
    """The example passes as written, in its order and reversed (and with ``-n 2`` on the
    servers); the database holds no row afterwards and nothing was left open."""
    files = EXAMPLES[example]
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    (tmp_path / "leakcheck.py").write_text(LEAK_CHECK)
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    tests = _tests_in(files["test_items.py"])
    ids = [f"test_items.py::{name}" for name in tests]
    runs = [ids, list(reversed(ids))]
    if backend.name != "sqlite":
        runs.append(["-n", "2", "test_items.py"])
    for args in runs:
        result = _run(tmp_path, backend, *args)
        assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
        assert f"{len(tests)} passed" in result.stdout, result.stdout
        assert "LEAK" not in result.stdout
        assert rows() == [], f"rows left after {args}"
    assert idle_in_transaction(backend) == 0
