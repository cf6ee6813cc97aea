"""The peers' own virtual environment, created and filled by the harness.

Peers pin versions that conflict with each other and with the project, so they never go
into the project's venv. They go into ``benchmarks/.venv-peers/shared``, constrained to the
exact SQLAlchemy, Starlette, uvicorn and driver versions of the project's venv so that the
comparison measures the libraries and nothing else. A peer that cannot be installed with
those versions gets a venv of its own (``.venv-peers/<peer>``, unconstrained, versions
reported); one that cannot be installed at all is reported as failed, never hidden. The
Flask peers run under gunicorn, so the venv also gets Flask, Werkzeug and gunicorn, pinned
like the rest to the project's versions.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from .variants import PEERS

__all__ = ["PeerStatus", "prepare_peers"]

ROOT = Path(__file__).resolve().parent / ".venv-peers"
PINNED = [
    "sqlalchemy",
    "greenlet",
    "starlette",
    "anyio",
    "uvicorn",
    "h11",
    "aiosqlite",
    "psycopg",
    "psycopg-binary",
    "asyncpg",
    "uvloop",
    "httptools",
    "typing-extensions",
    "flask",
    "werkzeug",
    "gunicorn",
    "blinker",
    "itsdangerous",
    "jinja2",
    "markupsafe",
    "click",
]
BASE = [
    "sqlalchemy[asyncio]",
    "starlette",
    "uvicorn",
    "aiosqlite",
    "psycopg[binary]",
    "asyncpg",
    "uvloop",
    "httptools",
    "flask",
    "gunicorn",
]
REPORTED = [
    "sqlalchemy",
    "starlette",
    "uvicorn",
    "fastapi",
    "flask",
    "werkzeug",
    "gunicorn",
    "asyncpg",
    "psycopg",
    "aiosqlite",
]


@dataclass
class PeerStatus:
    """How installing one peer went."""

    name: str
    installed: bool
    python: str | None = None
    pinned: bool = True
    version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form for the report."""
        return asdict(self)


def _constraints() -> str:
    lines = []
    for name in PINNED:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def _venv(path: Path) -> str:
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return str(python)


def _pip(python: str, *args: str) -> tuple[bool, str]:
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if not line.startswith("WARNING: Location")
    ]
    return done.returncode == 0, "\n".join(lines[-12:])


def _versions(python: str, names: list[str]) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        f"for n in {names!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def prepare_peers(names: list[str], log: bool = True) -> dict[str, PeerStatus]:
    """Install ``names`` (keys of ``PEERS``) and return how each went.

    Reuses what an earlier run installed when the pinned versions did not change.
    """
    ROOT.mkdir(exist_ok=True)
    constraints = _constraints()
    (ROOT / "constraints.txt").write_text(constraints)
    marker = ROOT / "status.json"
    key = hashlib.sha256((constraints + ",".join(sorted(names))).encode()).hexdigest()
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            return {name: PeerStatus(**status) for name, status in saved["peers"].items()}
    shared = _venv(ROOT / "shared")
    ok, output = _pip(shared, "-c", str(ROOT / "constraints.txt"), *BASE)
    if not ok:
        raise RuntimeError(f"Could not set up the peers' venv at {ROOT / 'shared'}:\n{output}")
    result: dict[str, PeerStatus] = {}
    for name in names:
        peer = PEERS[name]
        if log:
            print(f"  installing peer {name} ...", flush=True)
        ok, output = _pip(shared, "-c", str(ROOT / "constraints.txt"), peer.requirement)
        python, pinned = shared, True
        if not ok:
            # Not installable next to the project's pinned versions: give it its own venv.
            python, pinned = _venv(ROOT / name), False
            ok, output = _pip(python, peer.requirement, *BASE)
        versions = _versions(python, [*REPORTED, peer.requirement]) if ok else {}
        result[name] = PeerStatus(
            name=name,
            installed=ok,
            python=python if ok else None,
            pinned=pinned,
            version=versions.get(peer.requirement),
            versions=versions,
            error=None if ok else output,
        )
    marker.write_text(
        json.dumps({"key": key, "peers": {n: s.as_dict() for n, s in result.items()}}, indent=1)
    )
    return result
