"""A throwaway PostgreSQL primary with a streaming replica, for the read-replica tests.

Both servers run from temporary data directories on free loopback ports; the machine's own
cluster is never touched. As root the server programs run as the ``postgres`` OS user, since
PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
# runuser lives in sbin, outside the PATH of some environments.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_OS_USER = "postgres"
_DATABASE = "test"
_SLOT = "sessionscope_replica"
_START_ATTEMPTS = 3

_HBA = """\
local   all             all                     trust
host    all             all     127.0.0.1/32    trust
local   replication     all                     trust
host    replication     all     127.0.0.1/32    trust
"""

_SETTINGS = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 8
max_replication_slots = 8
wal_keep_size = '64MB'
hot_standby = on
fsync = off
synchronous_commit = on
full_page_writes = off
shared_buffers = '16MB'
max_connections = 100
log_min_messages = warning
"""


def _version_key(bindir: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", Path(bindir).parent.name))


def _complete(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in _PROGRAMS)


def postgres_bindir() -> Path | None:
    """The directory of the PostgreSQL server programs, or None when they are not installed.

    ``pg_config --bindir`` first, then the newest ``/usr/lib/postgresql/<version>/bin``.
    """
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(done.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if candidate and _complete(candidate):
            return Path(candidate)
    return None


def _runuser() -> str | None:
    return shutil.which("runuser", path=_SEARCH_PATH)


def replica_missing() -> str | None:
    """Why a primary with a replica cannot run here, or None when it can."""
    if postgres_bindir() is None:
        return (
            "the PostgreSQL server programs (initdb, pg_ctl, postgres, pg_basebackup) are not "
            "installed (Debian: 'apt-get install postgresql')"
        )
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_OS_USER)
        except KeyError:
            return f"running as root and there is no '{_OS_USER}' OS user to run PostgreSQL"
        if _runuser() is None:
            return "running as root and 'runuser' (util-linux) is not installed"
    return None


def require_replica() -> None:
    """Skip the test without a primary and replica, or fail it under ``CI=true``, saying why."""
    reason = replica_missing()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def asyncpg_url(url: str) -> str:
    """The same URL for SQLAlchemy's asyncpg driver."""
    scheme, rest = url.split("://", 1)
    if not scheme.startswith("postgresql"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql+asyncpg://{rest}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_answers(port: int) -> bool:
    """Whether something accepts TCP connections on ``127.0.0.1:port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class _Server:
    name: str
    data: Path
    log: Path
    port: int = 0


@dataclass
class ReplicaPair:
    """A running primary and its streaming replica; see :func:`replica_pair`."""

    directory: Path
    bindir: Path
    primary_port: int = 0
    replica_port: int = 0
    _primary: _Server = field(init=False)
    _replica: _Server = field(init=False)
    _user: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self._primary = _Server("primary", self.directory / "primary", self.directory / "p.log")
        self._replica = _Server("replica", self.directory / "replica", self.directory / "r.log")
        self._user = ()
        if os.geteuid() == 0:
            runuser = _runuser()
            if runuser is None:
                raise RuntimeError(replica_missing())
            self._user = (runuser, "-u", _OS_USER, "--")

    @property
    def sockets(self) -> Path:
        return self.directory / "sockets"

    @property
    def primary_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.primary_port}/{_DATABASE}"

    @property
    def replica_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.replica_port}/{_DATABASE}"

    @property
    def primary_async_url(self) -> str:
        return asyncpg_url(self.primary_url)

    @property
    def replica_async_url(self) -> str:
        return asyncpg_url(self.replica_url)

    # -- processes ------------------------------------------------------------------------

    def _run(
        self, program: str, *args: str, timeout: float = 60, server: _Server | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["HOME"] = str(self.directory)
        done = subprocess.run(
            [*self._user, str(self.bindir / program), *args],
            cwd=self.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            # A Ctrl-C on the test run must not reach the servers behind the teardown's back.
            start_new_session=True,
        )
        if done.returncode != 0:
            log = f"\n--- {server.log.name} ---\n{_tail(server.log)}" if server else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} exited with {done.returncode}:\n"
                f"{done.stdout}{done.stderr}{log}"
            )
        return done

    def _status(self, server: _Server) -> int:
        if not server.data.is_dir():
            return 4
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        return subprocess.run(
            [*self._user, str(self.bindir / "pg_ctl"), "status", "-D", str(server.data)],
            cwd=self.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode

    def _running(self, server: _Server) -> bool:
        # pg_ctl status: 0 running, 3 not running, 4 no data directory.
        return self._status(server) == 0

    def _start(self, server: _Server) -> None:
        """Start ``server`` on its port; on a taken port (a race with the probe) another one."""
        for attempt in range(_START_ATTEMPTS):
            if server.port == 0 or attempt > 0:
                server.port = _free_port()
            options = f"-p {server.port} -k {self.sockets}"
            try:
                self._run(
                    "pg_ctl", "start", "-w", "-t", "60", "-D", str(server.data),
                    "-l", str(server.log), "-o", options,
                    timeout=90, server=server,
                )  # fmt: skip
                return
            except RuntimeError:
                if attempt + 1 == _START_ATTEMPTS or "already in use" not in _tail(server.log):
                    raise
                self._halt(server)

    def _halt(self, server: _Server, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop ``server`` if it runs, harder each time it resists, until it is gone."""
        for step in (mode, "immediate"):
            if not self._running(server):
                return
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", step, "-D", str(server.data))
        if not self._running(server):
            return
        pid_file = server.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.05)

    # -- setup and teardown ---------------------------------------------------------------

    def _setup(self) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(_OS_USER)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self.directory.chmod(0o700)
        self.sockets.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(self.sockets, entry.pw_uid, entry.pw_gid)

        primary = self._primary
        self._run(
            "initdb", "-D", str(primary.data), "-U", "postgres", "-A", "trust",
            "--no-locale", "-E", "UTF8", "--no-sync", "--no-instructions",
            timeout=120,
        )  # fmt: skip
        # Written into the files initdb made, so they stay owned by the server's user.
        with (primary.data / "postgresql.conf").open("a") as conf:
            conf.write(_SETTINGS)
            conf.write(f"unix_socket_directories = '{self.sockets}'\n")
        with (primary.data / "pg_hba.conf").open("w") as hba:
            hba.write(_HBA)
        self._start(primary)
        self.primary_port = primary.port
        self._sql(primary.port, "postgres", f"CREATE DATABASE {_DATABASE}")

        replica = self._replica
        self._run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(replica.data), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync",
            "-C", "-S", _SLOT,
            timeout=120,
        )  # fmt: skip
        self._start(replica)
        self.replica_port = replica.port

    def _teardown(self) -> None:
        errors: list[Exception] = []
        for server in (self._replica, self._primary):
            try:
                self._halt(server)
            except Exception as error:
                errors.append(error)
        still = [s.name for s in (self._replica, self._primary) if self._running(s)]
        if not still:
            shutil.rmtree(self.directory, ignore_errors=True)
        if still or errors:
            raise RuntimeError(
                f"PostgreSQL did not stop cleanly (still running: {still or 'none'}) in "
                f"{self.directory}: {errors}"
            )

    # -- queries --------------------------------------------------------------------------

    def _sql(self, port: int, database: str, statement: str) -> object:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        ) as connection:
            cursor = connection.execute(statement)
            row = cursor.fetchone() if cursor.description is not None else None
            return None if row is None else row[0]

    # -- public ---------------------------------------------------------------------------

    def stop_replica(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the replica: ``"fast"`` shuts it down cleanly, ``"immediate"`` like a crash."""
        self._run(
            "pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self._replica.data),
            server=self._replica,
        )  # fmt: skip

    def start_replica(self) -> None:
        """Start the replica again on the same port; return once it accepts read queries."""
        if self._running(self._replica):
            return
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self._replica.data),
            "-l", str(self._replica.log), "-o", f"-p {self.replica_port} -k {self.sockets}",
            timeout=90, server=self._replica,
        )  # fmt: skip

    def replica_running(self) -> bool:
        return self._running(self._replica)

    def wait_replayed(self, timeout: float = 15.0) -> None:
        """Block until the replica has replayed all WAL the primary has written so far."""
        target = self._sql(self.primary_port, _DATABASE, "SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + timeout
        replayed: object = None
        while True:
            with contextlib.suppress(Exception):
                replayed = self._sql(
                    self.replica_port,
                    _DATABASE,
                    f"SELECT pg_last_wal_replay_lsn()::text || ' ' || "
                    f"(pg_last_wal_replay_lsn() >= '{target}'::pg_lsn)::text",
                )
                if isinstance(replayed, str) and replayed.endswith(" true"):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"replica replayed up to {replayed}, primary wrote up to {target}, "
                    f"after {timeout} s\n--- replica log ---\n{_tail(self._replica.log)}"
                )
            time.sleep(0.02)


@contextmanager
def replica_pair() -> Iterator[ReplicaPair]:
    """Start a PostgreSQL primary and a streaming replica of it on free loopback ports.

    Both have a database ``test`` and trust the user ``postgres``. Both servers are stopped
    and their files removed at exit, also when the setup fails halfway.
    """
    bindir = postgres_bindir()
    reason = replica_missing()
    if bindir is None or reason is not None:
        raise RuntimeError(reason)
    base = "/tmp" if os.path.isdir("/tmp") else None
    pair = ReplicaPair(Path(tempfile.mkdtemp(prefix="sessionscope-replica-", dir=base)), bindir)
    try:
        pair._setup()
        yield pair
    finally:
        pair._teardown()
