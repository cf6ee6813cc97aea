"""A real PgBouncer in transaction pooling mode in front of the tests' PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ._servers import wait_listening

# Debian installs it outside the PATH of ordinary users.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def pgbouncer_missing() -> str | None:
    """Why PgBouncer cannot run here, or None when it can."""
    if shutil.which("pgbouncer", path=_SEARCH_PATH) is None:
        return "pgbouncer is not installed (Debian: 'apt-get install pgbouncer')"
    return None


def require_pgbouncer() -> None:
    """Skip the test without PgBouncer, or fail it under ``CI=true``, saying why."""
    reason = pgbouncer_missing()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(directory: Path, database: str, port: int) -> str:
    return f"""\
[databases]
{database} = host=127.0.0.1 port=5432 dbname={database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "userlist.txt"}
pool_mode = transaction
default_pool_size = 4
max_client_conn = 500
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
"""


@contextmanager
def pgbouncer(database: str) -> Iterator[int]:
    """Run PgBouncer for ``database`` of the local server on a free loopback port; yield the
    port. PgBouncer is killed and its files removed at exit."""
    path = shutil.which("pgbouncer", path=_SEARCH_PATH)
    if path is None:
        raise RuntimeError(pgbouncer_missing())
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    # PgBouncer refuses to run as root; as 'postgres' it must still read its files here.
    directory.chmod(0o755)
    command = [path, *(["-u", "postgres"] if os.geteuid() == 0 else [])]
    try:
        port = _free_port()
        (directory / "userlist.txt").write_text('"postgres" ""\n')
        (directory / "pgbouncer.ini").write_text(_config(directory, database, port))
        # Its log goes to stderr: a file, since nobody reads a pipe while the tests run.
        with (directory / "pgbouncer.log").open("wb") as log:
            process = subprocess.Popen(
                [*command, str(directory / "pgbouncer.ini")],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

        def why() -> str:
            text = (directory / "pgbouncer.log").read_text(errors="replace")
            return f"pgbouncer did not listen on port {port} (exit code {process.poll()}):\n{text}"

        try:
            wait_listening(port, process, 15, why)
            yield port
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
