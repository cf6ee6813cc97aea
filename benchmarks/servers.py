"""Server processes: start one variant under uvicorn pinned to a core, read its /proc, stop it.

Every process is started with its own session and stopped by its pid (SIGINT, then SIGKILL
after a grace period); the harness calls ``stop`` for each in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .variants import Variant

__all__ = ["ServerProcess", "cpu_seconds", "get_json", "rss_bytes", "start", "stop"]

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ServerProcess:
    """A running server: its variant, port, process and log."""

    variant: Variant
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log: TextIO
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The server's pid (``taskset`` execs the server, so it is the Python process)."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the server wrote, for error reports."""
        if not self.log.closed:
            self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def start(
    variant: Variant,
    url: str,
    port: int,
    python: str,
    core: int,
    logs: Path,
    extra_env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``variant``'s server on ``port`` with ``python``, pinned to ``core``."""
    if variant.server != "uvicorn":
        raise NotImplementedError(
            f"Variant {variant.name!r} needs a {variant.server!r} server, which the harness"
            " does not start yet (the WSGI variants are planned)."
        )
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{variant.name}-{port}.log"
    log = log_path.open("w")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        **(extra_env or {}),
    }
    command = [
        "taskset",
        "-c",
        str(core),
        python,
        "-m",
        "benchmarks.serve",
        variant.name,
        url,
        str(port),
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return ServerProcess(variant, port, process, log_path, log)


def wait_ready(server: ServerProcess, timeout: float = 30.0) -> bool:
    """Wait until ``GET /_stats`` answers; record why not in ``server.error``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            server.error = f"exited with code {server.process.returncode}"
            return False
        try:
            get_json(server.port, "/_stats", timeout=1.0)
            return True
        except (OSError, ValueError):
            time.sleep(0.1)
    server.error = f"did not answer GET /_stats within {timeout:.0f} s"
    return False


def stop(server: ServerProcess, grace: float = 10.0) -> None:
    """Stop the server by pid: SIGINT for a graceful uvicorn shutdown, then SIGKILL."""
    try:
        if server.alive():
            os.kill(server.pid, signal.SIGINT)
            try:
                server.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.process.wait(timeout=grace)
    except ProcessLookupError:
        pass
    finally:
        server.log.close()


def get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    """``GET http://127.0.0.1:port/path`` and decode the JSON answer."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return json.loads(response.read())


def get_status(port: int, path: str, timeout: float = 10.0) -> int:
    """``GET`` and return only the status code (errors included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process (all its threads), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of the process, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
