"""The two example apps, tried one after the other on the same embedded SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each runs in a process of its own, from the working directory the file is made in, with
# no DATABASE_URL: as a user runs the examples by hand.
FLASK = """
from examples.flask_app import app
client = app.test_client()
print(client.post("/items", data={"name": "apple"}).status_code)
print(client.post("/items", data={"name": "apple"}).status_code)
"""
STARLETTE = """
import warnings
warnings.simplefilter("ignore", DeprecationWarning)  # the test client's own notice
from starlette.testclient import TestClient
from examples.starlette_app import app
with TestClient(app) as client:
    print(client.post("/items?name=apple").status_code)
    print(client.post("/items?name=apple").status_code)
    print(client.get("/items").json())
"""


def _run(code: str, cwd: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_examples_keep_their_items_apart(tmp_path: Path) -> None:
    """After trying the Flask example, the Starlette example's first apple is still a 201:
    the two share the embedded file, not a table."""
    assert _run(FLASK, tmp_path) == ["201", "409"]
    assert _run(STARLETTE, tmp_path) == ["201", "409", "['apple']"]
    assert (tmp_path / "sessionscope.sqlite3").exists()
