"""A PgBouncer of the harness's own, in transaction pooling mode, that can be restarted.

``Bouncer(database).start()`` runs PgBouncer (the Debian package installs it in
``/usr/sbin``) on a free loopback port in front of ``database`` on the local PostgreSQL
server (trust auth, user ``postgres``); ``restart()`` stops it the way ``systemctl restart``
does (SIGINT: PgBouncer's safe shutdown, which waits for the transactions in flight), kills
it if that takes longer than ``grace`` seconds, and starts it again on the same port;
``stop()`` ends it. As root it runs as ``postgres`` (PgBouncer refuses to run as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .servers import local_tcp_ports

__all__ = ["Bouncer", "pgbouncer_path"]

# Debian installs it outside the PATH of ordinary users.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def pgbouncer_path() -> str | None:
    """Where ``pgbouncer`` is, or None when it is not installed."""
    return shutil.which("pgbouncer", path=_SEARCH_PATH)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Bouncer:
    """One PgBouncer process at a time on a fixed port (see the module's docstring)."""

    def __init__(self, database: str, pool_size: int = 20, max_clients: int = 1000) -> None:
        path = pgbouncer_path()
        if path is None:
            raise RuntimeError("pgbouncer is not installed (Debian: 'apt-get install pgbouncer')")
        self.database = database
        self.port = _free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="bench-pgbouncer-"))
        self.directory.chmod(0o755)
        self.command = [path, *(["-u", "postgres"] if os.geteuid() == 0 else [])]
        self.command.append(str(self.directory / "pgbouncer.ini"))
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts: list[dict[str, Any]] = []
        (self.directory / "userlist.txt").write_text('"postgres" ""\n')
        (self.directory / "pgbouncer.ini").write_text(f"""\
[databases]
{database} = host=127.0.0.1 port=5432 dbname={database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.directory / "userlist.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = {max_clients}
ignore_startup_parameters = extra_float_digits,options
server_reset_query =
""")

    def url(self, url: str) -> str:
        """``url`` (a URL of the local server) pointed at this PgBouncer instead."""
        from sqlalchemy import make_url

        return make_url(url).set(port=self.port).render_as_string(hide_password=False)

    def start(self, timeout: float = 15.0) -> None:
        """Start PgBouncer and wait until it accepts connections."""
        log = (self.directory / "pgbouncer.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                self.command,
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer did not listen on port {self.port}"
                        f" (exit code {self.process.poll()}):\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def restart(self, grace: float = 5.0) -> dict[str, Any]:
        """Stop PgBouncer (SIGINT, SIGKILL after ``grace`` s) and start it again."""
        began = time.monotonic()
        how = self._end(signal.SIGINT, grace)
        stopped = time.monotonic()
        self.start()
        event = {
            "t": began,
            "stopped_s": round(stopped - began, 3),
            "down_s": round(time.monotonic() - stopped, 3),
            "how": how,
        }
        self.restarts.append(event)
        return event

    def stop(self) -> None:
        """Kill PgBouncer and remove its files."""
        self._end(signal.SIGKILL, 10.0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def tcp_ports(self) -> set[int]:
        """Local ports of PgBouncer's sockets: its server connections' ``client_port``."""
        if self.process is None or self.process.poll() is not None:
            return set()
        return local_tcp_ports([self.process.pid])

    def log_tail(self, lines: int = 20) -> str:
        """The last lines PgBouncer logged."""
        path = self.directory / "pgbouncer.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _end(self, first: signal.Signals, grace: float) -> str:
        process = self.process
        if process is None or process.poll() is not None:
            return "not running"
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(first)
        try:
            process.wait(grace)
            return first.name
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(10)
            return f"{first.name}, then SIGKILL after {grace:.0f} s"
