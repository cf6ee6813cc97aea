"""What the fault soak does to a server while a round runs, and what it sees meanwhile.

A ``Watch`` follows one round from the harness's side, in two threads of its own:

- it reads the load generator's progress lines (``P <time> <complete responses>``);
- every ``KILL_EVERY`` s it terminates one PostgreSQL backend of the server's pool
  (``pg_terminate_backend``), chosen at random among the backends of the soak's database
  whose ``client_port`` is a local port of the server process;
- every ``SAMPLE_EVERY`` s it samples the server: ``GET /_stats`` (pool, registry, requests in
  flight), the states of its backends, its thread count;
- when no response has completed for ``STALL_FLAG`` s while the load runs, it snapshots the
  stall (every backend of the server with its transaction's age and last query,
  ``GET /_stats``, ``GET /_holders``: the requests in flight by the step they reached and
  whether their session holds a connection, and, if ``py-spy`` is there, a dump of every
  thread of the server, kept as a file next to the round's load records) and again every
  ``SNAPSHOT_EVERY`` s it lasts.
"""

from __future__ import annotations

import collections
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, create_engine, text

from .database import Backend
from .servers import ServerProcess, get_json

__all__ = ["KILL_EVERY", "STALL_FLAG", "Watch", "thread_kinds"]

KILL_EVERY = 3.0
SAMPLE_EVERY = 0.5
STALL_FLAG = 3.0
"""Seconds with no completed response that count as a stall (the slowest request is 2 s)."""
SNAPSHOT_EVERY = 8.0
BACKENDS = text(
    "SELECT pid, state, client_port, wait_event_type, wait_event, left(query, 70) AS query,"
    " round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_s,"
    " round(extract(epoch FROM now() - state_change)::numeric, 1) AS state_s"
    " FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"
)


class Watch:
    """Kills, samples and stall snapshots for one round (see the module's docstring)."""

    def __init__(
        self,
        server: ServerProcess,
        backend: Backend,
        progress: IO[str],
        deadline: float,
        snapshots: Path,
        py_spy: str | None,
    ) -> None:
        self.server = server
        self.backend = backend
        self.deadline = deadline
        self.snapshots = snapshots
        self.py_spy = py_spy
        self.kills: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.stalls: list[dict[str, Any]] = []
        self.completed = 0
        self.last_change = time.monotonic()
        self._progress = progress
        self._stop = threading.Event()
        self._engine: Engine | None = None
        if backend.name == "postgresql":
            self._engine = create_engine(
                backend.sync_url, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT"
            )
        self._threads = [
            threading.Thread(target=self._read_progress, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop killing and sampling; wait for both threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        if self._engine is not None:
            self._engine.dispose()

    def _read_progress(self) -> None:
        for line in self._progress:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "P" and int(parts[2]) != self.completed:
                self.completed = int(parts[2])
                self.last_change = time.monotonic()

    def _watch(self) -> None:
        rng = random.Random(12)
        next_kill = time.monotonic() + KILL_EVERY
        next_sample = time.monotonic()
        stall_since: float | None = None
        next_snapshot = 0.0
        while not self._stop.wait(0.1):
            now = time.monotonic()
            if self._engine is not None and now >= next_kill:
                next_kill += KILL_EVERY
                self._kill(rng, now)
            if now >= next_sample:
                next_sample += SAMPLE_EVERY
                self.samples.append(self._sample(now))
            stalled = now - self.last_change >= STALL_FLAG and now < self.deadline
            if not stalled:
                stall_since = None
                continue
            if stall_since != self.last_change:
                stall_since, next_snapshot = self.last_change, now
            if now >= next_snapshot:
                next_snapshot = now + SNAPSHOT_EVERY
                self.stalls.append(self._snapshot(now, now - self.last_change))

    def _backends(self) -> list[dict[str, Any]]:
        """The server's PostgreSQL backends (empty on SQLite)."""
        if self._engine is None:
            return []
        ports = self.server.tcp_ports()
        with self._engine.connect() as connection:
            rows = connection.execute(BACKENDS, {"name": self.backend.database}).mappings()
            return [
                {key: _plain(value) for key, value in row.items()}
                for row in rows
                if row["client_port"] in ports
            ]

    def _kill(self, rng: random.Random, now: float) -> None:
        try:
            backends = self._backends()
            if not backends:
                return
            victim = rng.choice(backends)
            assert self._engine is not None
            with self._engine.connect() as connection:
                connection.execute(
                    text("SELECT pg_terminate_backend(:pid)"), {"pid": victim["pid"]}
                )
        except Exception as error:
            self.kills.append({"t": now, "error": repr(error)})
            return
        self.kills.append({"t": now, **{k: victim[k] for k in ("pid", "state", "query")}})

    def _sample(self, now: float) -> dict[str, Any]:
        sample: dict[str, Any] = {"t": round(now, 3), "completed": self.completed}
        try:
            sample["stats"] = get_json(self.server.port, "/_stats", timeout=1.0)
        except (OSError, ValueError) as error:
            sample["stats"] = {"error": type(error).__name__}
        try:
            states = collections.Counter(row["state"] for row in self._backends())
            sample["backends"] = dict(states)
        except Exception as error:
            sample["backends"] = {"error": type(error).__name__}
        sample["threads"] = _thread_count(self.server.pid)
        return sample

    def _snapshot(self, now: float, quiet: float) -> dict[str, Any]:
        snapshot: dict[str, Any] = {"t": round(now, 3), "quiet_s": round(quiet, 1)}
        for name in ("stats", "holders"):
            try:
                snapshot[name] = get_json(self.server.port, f"/_{name}", timeout=2.0)
            except (OSError, ValueError) as error:
                snapshot[name] = {"error": type(error).__name__}
        try:
            snapshot["backends"] = self._backends()
        except Exception as error:
            snapshot["backends"] = [{"error": repr(error)}]
        snapshot["threads"] = _thread_count(self.server.pid)
        if self.py_spy:
            dump = _dump(self.py_spy, self.server.pid)
            path = self.snapshots.with_name(f"{self.snapshots.name}-stall-{now:.0f}.txt")
            path.write_text(dump)
            snapshot["py_spy_file"] = str(path.relative_to(path.parents[3]))
            snapshot["thread_kinds"] = thread_kinds(dump)
        return snapshot


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, int | str) else float(value)


def _thread_count(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _dump(py_spy: str, pid: int) -> str:
    try:
        done = subprocess.run(
            [py_spy, "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"py-spy failed: {error!r}"
    return done.stdout + done.stderr


# Frames that say what a thread is for, innermost first.
_LANDMARKS = (
    ("commit_session (", "a unit's commit"),
    ("rollback_session (", "a unit's rollback"),
    ("close_session (", "a unit's close"),
    ("_next (starlette/concurrency.py", "a stream's next chunk"),
    ("faults_app.py", "an endpoint"),
)


def thread_kinds(dump: str) -> dict[str, int]:
    """Count the threads of a ``py-spy dump`` by what they wait on and what they are for.

    ``checkout`` is a thread inside the pool's ``_do_get`` (waiting for a connection), other
    threads are named by their innermost frame; the part after ``for`` is the first of
    ``_LANDMARKS`` found in the stack.
    """
    kinds: collections.Counter[str] = collections.Counter()
    threads: list[list[str]] = []
    for line in dump.splitlines():
        if line.startswith("Thread "):
            threads.append([line])
        elif line.startswith("    ") and threads:
            threads[-1].append(line.strip())
    for _header, *frames in threads:
        if not frames:
            kinds["(no frames)"] += 1
            continue
        waiting = "checkout" if any("._do_get (" in f for f in frames) else frames[0]
        purpose = next((label for mark, label in _LANDMARKS for f in frames if mark in f), "other")
        kinds[f"{waiting} for {purpose}"] += 1
    return dict(kinds.most_common())
