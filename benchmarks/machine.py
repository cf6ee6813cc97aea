"""What the numbers were measured on: machine, load, versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from sqlalchemy import text

from .database import Backend

__all__ = ["describe"]

PACKAGES = [
    "sessionscope",
    "sqlalchemy",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "anyio",
    "flask",
    "werkzeug",
    "gunicorn",
    "psycopg",
    "asyncpg",
    "aiosqlite",
    "matplotlib",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command_output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (
        (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode in (0, 1) else None
    )


def describe(backends: list[Backend]) -> dict[str, Any]:
    """Cores, CPU model, kernel, load average and the versions of everything measured."""
    versions: dict[str, str] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    wrk = _command_output(["wrk", "--version"])
    if wrk:
        versions["wrk"] = wrk.split(" [")[0]
    for chosen in backends:
        if chosen.name == "postgresql":
            engine = chosen.engine()
            with engine.connect() as connection:
                versions["postgresql"] = str(connection.scalar(text("SHOW server_version")))
            engine.dispose()
        else:
            import sqlite3

            versions["sqlite"] = sqlite3.sqlite_version
    commit = _command_output(
        ["git", "-C", os.path.dirname(__file__), "rev-parse", "--short", "HEAD"]
    )
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "load_average": os.getloadavg(),
        "git_commit": commit,
        "versions": versions,
    }
