"""Real WSGI servers for the end-to-end tests: Werkzeug's threaded server and gunicorn."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from wsgiref.types import WSGIApplication

from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent


def wait_listening(
    port: int, process: subprocess.Popen[bytes], seconds: float, why: Callable[[], str]
) -> None:
    """Wait until ``process`` accepts connections on ``port``; raise with ``why()`` if it
    exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(why()) from None
            time.sleep(0.05)


@contextmanager
def werkzeug_server(app: WSGIApplication) -> Iterator[int]:
    """Serve ``app`` on a free loopback port with a thread per request; yield the port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def gunicorn_server(
    target: str, env: dict[str, str], threads: int = 8, workers: int = 1, preload: bool = False
) -> Iterator[int]:
    """Run ``gunicorn`` (``workers`` workers of ``threads`` threads) on ``target``; kill it at
    the end. With ``preload`` the master imports the app before it forks the workers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [sys.executable, "-m", "gunicorn", "--workers", str(workers)]
    command += ["--threads", str(threads), *(["--preload"] if preload else [])]
    command += ["--bind", f"127.0.0.1:{port}", "--graceful-timeout", "2", target]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    stderr = process.stderr
    assert stderr is not None
    try:
        wait_listening(port, process, 20, lambda: f"gunicorn did not start: {stderr.read()!r}")
        yield port
    finally:
        # The whole process group: a worker stuck on the database outlives its master.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        assert process.stderr is not None
        process.stderr.close()


def fetch(port: int, method: str, path: str) -> tuple[int, bytes]:
    """One request over a new connection: the status and the whole body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds: server threads finish after the client is done."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
