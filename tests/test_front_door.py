"""The way in, as a new user takes it: the built package, a fresh virtual environment, and
the README's example served and asked with the README's own commands.

``python -m build`` makes an sdist and a wheel that ``twine check --strict`` accepts; the
wheel installs into a venv of its own with nothing else, and ``import sessionscope`` there
loads no web framework. Then the README's extras go in, its ``app.py`` is written as the
README shows it, its ``uvicorn`` command serves it, and each of its ``curl`` commands must
print what the README says it prints.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_docs_snippets import python_blocks

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

pytestmark = pytest.mark.timeout(600)

FRAMEWORKS = ("starlette", "fastapi", "flask", "werkzeug", "uvicorn")


def _run(*command: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV")
        and not key.startswith(("PYTEST_", "COV_CORE_"))
    }
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """Each ``$ command`` of the page's console blocks, with the lines it shows printed."""
    commands: list[tuple[str, list[str]]] = []
    for block in re.findall(r"^```console\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                commands.append((line[2:].split("  #")[0].strip(), []))
            elif commands and line.strip():
                commands[-1][1].append(line)
    return commands


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=ROOT)
    return out


def test_the_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    """What would be uploaded is well-formed: metadata, README rendering, both files."""
    names = sorted(path.name for path in dist.iterdir())
    version = _version()
    assert names == [f"sessionscope-{version}-py3-none-any.whl", f"sessionscope-{version}.tar.gz"]
    output = _run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()))
    assert output.count("PASSED") == 2, output


def _version() -> str:
    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match is not None
    return match[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_new_user_gets_from_the_wheel_to_the_served_example(dist: Path, tmp_path: Path) -> None:
    """From a fresh venv: the bare wheel imports with no web framework; with the README's
    extras, the README's ``app.py`` serves and answers each ``curl`` as the README says."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    [wheel] = dist.glob("*.whl")
    _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    probe = (
        "import sys, importlib.metadata, sessionscope;"
        f" loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules];"
        " print(importlib.metadata.version('sessionscope'), loaded)"
    )
    assert _run(python, "-c", probe).split() == [_version(), "[]"]

    # The README's install commands, in its order, with the built wheel where it names one
    # (the editable install from a checkout and the build itself are what this test skips).
    text = README.read_text()
    commands = console_commands(text)
    installs = [c for c, _ in commands if c.startswith("python -m pip install ")]
    assert any(".whl[" in c for c in installs), "the README installs the built wheel"
    for install in installs:
        words = shlex.split(install)
        if "-e" in words or words[-1] == "build":
            continue
        words = [re.sub(r"^dist/[^\[]+\.whl", str(wheel), word) for word in words]
        _run(python, *words[1:3], "-q", "--disable-pip-version-check", *words[3:])

    # The README's example: its first Python block, named 'app.py' by its first line.
    app = python_blocks(README)[0]
    assert app.code.startswith("# app.py\n"), app.code[:40]
    work = tmp_path / "work"
    work.mkdir()
    (work / "app.py").write_text(app.code)
    [serve] = [c for c, _ in commands if c.startswith("uvicorn ")]
    port = _free_port()
    argv = [str(venv / "bin" / "uvicorn"), *shlex.split(serve)[1:], "--port", str(port)]
    server = subprocess.Popen(
        argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(port, server)
        curls = [(c, shown) for c, shown in commands if c.startswith("curl ")]
        assert len(curls) >= 3, curls
        for command, shown in curls:
            command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            command = command.replace("localhost:8000", f"127.0.0.1:{port}")
            printed = _run("sh", "-c", command, cwd=work).strip().splitlines()
            assert printed == shown, (command, printed, shown)
    finally:
        server.terminate()
        log, _ = server.communicate(timeout=30)
    assert "Traceback" not in log, log


def _wait_for(port: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[0]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("uvicorn did not start")
