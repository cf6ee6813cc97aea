"""The fault app under gunicorn: ``benchmarks.apps.faults_multi:create()``.

``benchmarks.multiworker`` runs it with ``-k uvicorn.workers.UvicornWorker -w N``; the
environment sets it up: ``FAULTS_URL`` (the database, reached through PgBouncer),
``FAULTS_MODE`` (``sync`` or ``async``), ``FAULTS_PGBOUNCER`` (``1``: build the
``Database`` with ``pgbouncer=True``) and ``FAULTS_CONTROL``, a directory.

Each worker has its own pool, registry and ``Ledger``, while gunicorn hands each connection
to whichever worker accepts it first: asking ``GET /_stats`` of the shared port reaches one
worker at random. So ``Control``, wrapped around ``faults_app.build``'s app, opens a second,
private port in every worker when the worker's lifespan starts (a plain HTTP/1.1 listener on
the worker's event loop, one request per connection) and writes
``<FAULTS_CONTROL>/<pid>.json`` with ``{"pid", "port"}``. A ``GET`` there is served by the
same app (``/_stats``, ``/_answers``, ``/_holders``, ``/_info``) in that very worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .faults_app import build

__all__ = ["Control", "create"]


class Control:
    """Outermost ASGI wrapper: the worker's private control port (see the module)."""

    def __init__(self, app: ASGIApp, directory: Path) -> None:
        self.app = app
        self.directory = directory
        self.server: asyncio.Server | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def watched() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._open()
            elif message["type"] == "lifespan.shutdown":
                await self._close()
            return message

        await self.app(scope, watched, send)

    async def _open(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        pid = os.getpid()
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{pid}.tmp"
        partial.write_text(json.dumps({"pid": pid, "port": port}))
        partial.rename(self.directory / f"{pid}.json")

    async def _close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode("latin-1")
            status, body = await self._ask(path)
            if path == "/_stats" and status == 200:
                # Not counted by the app's own figure, which leaves out the asking request.
                stats = json.loads(body)
                stats["requests_in_flight"] = _uvicorn_cycles()
                body = json.dumps(stats).encode()
            writer.write(
                f"HTTP/1.1 {status} -\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            writer.close()

    async def _ask(self, path: str) -> tuple[int, bytes]:
        """``GET path`` of the app, in this worker; the status and the whole body."""
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        status = 500
        chunks: list[bytes] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return status, b"".join(chunks)


def _uvicorn_cycles() -> int:
    """The HTTP requests uvicorn is running in this worker: one task each."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("RequestResponseCycle.run_asgi")
    )


def create() -> ASGIApp:
    """The app named by the environment (see the module's docstring)."""
    app = build(
        os.environ["FAULTS_URL"],
        os.environ.get("FAULTS_MODE", "sync"),
        pgbouncer=os.environ.get("FAULTS_PGBOUNCER", "1") == "1",
    )
    return Control(app, Path(os.environ["FAULTS_CONTROL"]))
