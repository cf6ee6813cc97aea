"""Server processes: start one variant pinned to a core, read its /proc, stop it.

ASGI variants run under uvicorn (``benchmarks.serve``), in the very process started here.
WSGI variants run under gunicorn (``benchmarks.serve_wsgi``): the process started here is
gunicorn's master, which forks one ``gthread`` worker with ``GUNICORN_THREADS`` threads;
the worker inherits the pinning. For those, CPU time is read over the whole process tree
(master, worker and any worker already gone, through the parent's ``cutime``/``cstime``),
so that CPU per request includes the worker that serves; RSS is the worker's, since the
master only supervises and summing both would count the pages they share since the fork
twice.

Every process is started with its own session and stopped by its pid (SIGINT for uvicorn,
SIGTERM for gunicorn's graceful stop, then SIGKILL after a grace period, for gunicorn also
to the worker by its pid); the harness calls ``stop`` for each in a ``finally``.
"""

from __future__ import annotations

import contextlib
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

__all__ = [
    "GUNICORN_THREADS",
    "ServerProcess",
    "cpu_seconds",
    "descendants",
    "get_json",
    "rss_bytes",
    "start",
    "stop",
    "tree_cpu_seconds",
]

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GUNICORN_THREADS = 16
"""Threads of gunicorn's one gthread worker: one more than the default pool's 5 + 10
connections, so that the pool can be kept busy while a thread parses or serialises, without
a large crowd of threads contending for the GIL on one core."""
SERVE_MODULES = {"uvicorn": "benchmarks.serve", "gunicorn": "benchmarks.serve_wsgi"}


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
        """The server's pid (``taskset`` execs the server, so it is the Python process).

        Under gunicorn this is the master; the worker is its child.
        """
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU time the server has used: uvicorn's process, or gunicorn's whole tree."""
        if self.variant.server == "gunicorn":
            return tree_cpu_seconds(self.pid)
        return cpu_seconds(self.pid)

    def tcp_ports(self) -> set[int]:
        """Local ports of the server's TCP sockets (its database connections among them)."""
        return local_tcp_ports([self.pid, *descendants(self.pid)])

    def rss_bytes(self) -> int:
        """Resident memory of the serving process: uvicorn's, or gunicorn's worker(s)."""
        if self.variant.server == "gunicorn":
            workers = descendants(self.pid)
            if workers:
                return sum(rss_bytes(pid) for pid in workers)
        return rss_bytes(self.pid)

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
    gunicorn_threads: int = GUNICORN_THREADS,
    wrapper: list[str] | None = None,
) -> ServerProcess:
    """Start ``variant``'s server on ``port`` with ``python``, pinned to ``core``.

    ``gunicorn_threads`` is the thread count of the gunicorn worker (WSGI variants only);
    ``wrapper`` is a command that runs the Python process (``valgrind ...``), which must
    keep the same pid (exec, not fork).
    """
    if variant.server not in SERVE_MODULES:
        raise ValueError(f"Variant {variant.name!r} names an unknown server {variant.server!r}.")
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{variant.name}-{port}.log"
    log = log_path.open("w")
    env = {
        **os.environ,
        # This tree's package first: with an editable install elsewhere, a copy of the
        # repository would otherwise benchmark that install's sources.
        "PYTHONPATH": os.pathsep.join((str(REPO / "src"), str(REPO))),
        "PYTHONDONTWRITEBYTECODE": "1",
        **(extra_env or {}),
    }
    command = [
        "taskset",
        "-c",
        str(core),
        *(wrapper or []),
        python,
        "-m",
        SERVE_MODULES[variant.server],
        variant.name,
        url,
        str(port),
    ]
    if variant.server == "gunicorn":
        command += ["--threads", str(gunicorn_threads)]
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
    """Stop the server by pid, then SIGKILL what is left after ``grace`` seconds.

    uvicorn gets SIGINT, gunicorn's master SIGTERM (its graceful stop, which stops the
    worker too). The gunicorn worker's pid is recorded first and the worker killed by that
    pid if it outlived its master.
    """
    children = _identities(descendants(server.pid)) if server.alive() else []
    try:
        if server.alive():
            graceful = signal.SIGTERM if server.variant.server == "gunicorn" else signal.SIGINT
            os.kill(server.pid, graceful)
            try:
                server.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.process.wait(timeout=grace)
    except ProcessLookupError:
        pass
    finally:
        server.log.close()
    deadline = time.monotonic() + grace
    for pid, started in children:
        while _started(pid) == started and time.monotonic() < deadline:
            time.sleep(0.05)
        if _started(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (``fields[0]`` is state)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()


def _started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; ``None`` once it is gone."""
    try:
        return int(_stat(pid)[19])
    except (OSError, IndexError, ValueError):
        return None


def _identities(pids: list[int]) -> list[tuple[int, int]]:
    """``(pid, start time)`` pairs, so that a pid reused later is never taken for ours."""
    pairs = [(pid, _started(pid)) for pid in pids]
    return [(pid, started) for pid, started in pairs if started is not None]


def descendants(pid: int) -> list[int]:
    """The pids of every live process below ``pid`` (children, their children...)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found += children
        queue += children
    return found


def local_tcp_ports(pids: list[int]) -> set[int]:
    """Local ports of the TCP sockets the processes ``pids`` hold open (IPv4 and IPv6).

    A socket's inode, seen in ``/proc/<pid>/fd``, is matched with its line in
    ``/proc/net/tcp``; on the client side of a database connection the local port is what
    PostgreSQL reports as ``client_port``.
    """
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(entry.path)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)  # the header
            for line in lines:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process (all its threads), from ``/proc/<pid>/stat``."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and all its descendants, live or reaped.

    Each live process counts its own time (``utime``, ``stime``, all threads) plus that of
    its children that have exited and been waited for (``cutime``, ``cstime``), so a
    gunicorn worker that was replaced mid-run still counts, and nothing counts twice.
    """
    ticks = 0
    for member in [pid, *descendants(pid)]:
        try:
            fields = _stat(member)
        except OSError:
            continue  # gone between the scan and the read
        ticks += sum(int(fields[index]) for index in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of the process, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
