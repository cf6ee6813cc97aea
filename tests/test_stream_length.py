"""A declared length is a promise of completeness: keep it until the stream is stored (rule 9).

Rule 9 withholds a stream's final message when the commit of the work its body did fails,
so that the client sees an incomplete response. When the response declared a
``Content-Length`` and the body's chunks already carried every promised byte, the final
message is empty and withholding it hides nothing: the client has the whole body it was
promised and takes the response for complete although the stream's writes were lost. The
chunk that completes the declared length must therefore wait until the stream's work is
committed.

Each adapter runs under a real server and is read over a raw socket: ``SessionMiddleware``
around a raw ASGI app under uvicorn (sync and async drivers), ``WSGISessionMiddleware``
around a PEP 3333 generator app and the Flask extension with a generator body, both under
Werkzeug's server. The body sends all 4 declared bytes, then writes an item; the failing
variant also adds a child whose parent does not exist, refused when the stream's work is
committed (the deferred foreign key at COMMIT, or the flush inside ``commit()`` on
MariaDB). ``make_db`` checks afterwards that nothing was left behind.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import anyio.to_thread
import pytest
from flask import Flask
from flask import Response as FlaskResponse

from sessionscope import Database, SessionMiddleware
from sessionscope._types import Message, Receive, Scope, Send
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from . import _servers
from ._models import Child, Item
from ._uvicorn import serve, wait_until
from .conftest import DatabaseFactory
from .middleware._asgi_apps import insert, nothing_left
from .test_stream_semantics import adapter_params

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]

BODY = b"abcd"
"""The whole body, sent before the stream's work is done; ``Content-Length`` announces it."""

HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


every_adapter = pytest.mark.parametrize(
    ("backend", "adapter"), adapter_params(["uvicorn", "wsgi", "flask"]), indirect=["backend"]
)


@dataclass(frozen=True)
class Seen:
    """What the client read before the server closed the connection."""

    status: int
    declared: int | None
    body: bytes

    @property
    def whole(self) -> bool:
        """A success carrying every byte its ``Content-Length`` promised: a complete answer."""
        return self.status == 200 and self.declared == len(self.body) == len(BODY)


def fetch_raw(port: int) -> Seen:
    """GET / with 'Connection: close' and read to the end of the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    declared = headers.get("content-length")
    return Seen(int(status_line.split()[1]), None if declared is None else int(declared), body)


def stream_work(db: Database[Any], fail: bool) -> None:
    """The stream's work after its last byte; ``fail`` adds a row its commit will refuse."""
    if fail:
        db.session.add(Child(parent_id=999_999))


def asgi_app(db: Database[Any], fail: bool) -> SessionMiddleware:
    """A raw ASGI app: the start with a length, all of the body, a write, the empty end."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message: Message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        headers = [(name.lower().encode(), value.encode()) for name, value in HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY, "more_body": True})
        await insert(db, "streamed")
        stream_work(db, fail)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return SessionMiddleware(app, db)


def wsgi_app(adapter: str, db: Database[Any], fail: bool) -> WSGIApplication:
    """A generator body that yields all of the body, then writes."""

    def body() -> Iterator[bytes]:
        yield BODY
        db.session.add(Item(name="streamed"))
        db.session.flush()
        stream_work(db, fail)

    if adapter == "wsgi":

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            start_response("200 OK", HEADERS)
            return body()

        return WSGISessionMiddleware(app, db)
    flask_app = Flask(__name__)
    db.init_app(flask_app)

    @flask_app.get("/")
    def endpoint() -> FlaskResponse:
        return FlaskResponse(body(), headers=HEADERS)

    return flask_app


async def run(adapter: str, db: Database[Any], fail: bool) -> Seen:
    """Serve one request through ``adapter`` and read it; return once the unit has ended."""
    if adapter == "uvicorn":
        async with serve(asgi_app(db, fail)) as served:
            seen = await anyio.to_thread.run_sync(fetch_raw, served.port)
            # The server ends the unit after the client has its answer.
            await wait_until(lambda: nothing_left(db) == (0, 0, 0))
        return seen
    return await anyio.to_thread.run_sync(run_wsgi, db, wsgi_app(adapter, db, fail))


def run_wsgi(db: Database[Any], app: WSGIApplication) -> Seen:
    with _servers.werkzeug_server(app) as port:
        seen = fetch_raw(port)
        # The server thread ends the unit after the client has its answer.
        _servers.wait_until(lambda: nothing_left(db) == (0, 0, 0))
    return seen


@every_adapter
async def test_stream_whose_commit_fails_never_delivers_its_whole_declared_length(
    make_db: DatabaseFactory, rows: Rows, adapter: str
) -> None:
    """The client must not get every promised byte of a stream whose writes were lost: the
    chunk that completes the Content-Length waits for the stream's commit.
    """
    db = make_db()
    seen = await run(adapter, db, fail=True)
    assert not seen.whole, f"a complete {seen.status} answer, {seen.body!r}, for lost writes"
    assert rows() == []


@every_adapter
async def test_stream_whose_commit_succeeds_delivers_its_whole_declared_length(
    make_db: DatabaseFactory, rows: Rows, adapter: str
) -> None:
    """Holding the last chunk back until the commit must still deliver it once stored."""
    db = make_db()
    seen = await run(adapter, db, fail=False)
    assert (seen.status, seen.declared, seen.body) == (200, len(BODY), BODY)
    assert rows() == ["streamed"]
