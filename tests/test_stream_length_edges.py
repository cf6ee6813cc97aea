"""Edges of the Content-Length hold-back (SPEC rule 9): trailers, ``write()``, a body that
raises after its last byte or runs past its length, Flask's ``stream_with_context``.

Helpers come from ``test_stream_length``: a body that carries all 4 declared bytes, then
writes; the failing variant adds a child whose parent does not exist, refused when the
stream's work is committed. ``make_db`` checks afterwards that nothing was left behind.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from wsgiref.types import StartResponse, WSGIEnvironment

import anyio.to_thread
import pytest
from flask import Flask, stream_with_context
from flask import Response as FlaskResponse
from sqlalchemy.orm import Session

from sessionscope import Database, SessionMiddleware
from sessionscope._types import Receive, Scope, Send
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Item
from ._uvicorn import serve, wait_until
from .conftest import DatabaseFactory, backend_params
from .middleware._asgi_apps import insert, nothing_left
from .middleware._driver import call
from .test_stream_length import BODY, HEADERS, Rows, run_wsgi, stream_work

pytestmark = pytest.mark.anyio

SQLITE_SYNC = pytest.mark.parametrize(
    "backend", backend_params(["sqlite"], ["sync"]), indirect=True
)


@SQLITE_SYNC
async def test_trailers_never_overtake_a_held_body(make_db: DatabaseFactory, rows: Rows) -> None:
    """A start with trailers and a length: the body that completes the length is held back;
    a first trailers message (``more_trailers``) must not be forwarded before it (a server
    in its body state refuses trailers: hypercorn raises UnexpectedMessageError).
    """
    db: Database[Session] = make_db()
    headers = [(b"content-length", str(len(BODY)).encode())]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": headers, "trailers": True}
        )
        await send({"type": "http.response.body", "body": BODY, "more_body": False})
        await insert(db, "trailer")
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": True})
        await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]})

    exchange = await call(SessionMiddleware(app, db=db), "GET", "/")
    kinds = [message["type"].rsplit(".", 1)[-1] for message in exchange.sent]
    assert kinds == ["start", "body", "trailers", "trailers"], kinds
    assert nothing_left(db) == (0, 0, 0)
    assert rows() == ["trailer"]


@SQLITE_SYNC
async def test_write_callable_that_completes_the_length_waits_for_the_commit(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """PEP 3333's ``write()``: the app writes every declared byte, then its iterable writes
    to the database and that commit fails. The client must not get a complete answer.
    """
    db: Database[Session] = make_db()

    def body() -> Iterator[bytes]:
        db.session.add(Item(name="streamed"))
        db.session.flush()
        stream_work(db, fail=True)
        yield b""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", HEADERS)
        write(BODY)
        return body()

    seen = await anyio.to_thread.run_sync(run_wsgi, db, WSGISessionMiddleware(app, db))
    assert not seen.whole, f"a complete {seen.status} answer, {seen.body!r}, for lost writes"
    assert rows() == []


@SQLITE_SYNC
async def test_body_that_raises_after_its_last_byte_leaves_an_incomplete_answer(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """The drain in ``_last`` runs the rest of the generator inside the server's next():
    when it raises, the held chunk never leaves and the stream's work is rolled back."""
    db: Database[Session] = make_db()

    def body() -> Iterator[bytes]:
        yield BODY
        db.session.add(Item(name="streamed"))
        db.session.flush()
        raise ValueError("the body failed after its last byte")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", HEADERS)
        return body()

    seen = await anyio.to_thread.run_sync(run_wsgi, db, WSGISessionMiddleware(app, db))
    assert not seen.whole
    assert rows() == []


@SQLITE_SYNC
@pytest.mark.parametrize("fail", [False, True])
async def test_flask_stream_with_context_and_a_length(
    make_db: DatabaseFactory, rows: Rows, fail: bool
) -> None:
    """Flask's ``stream_with_context`` body drained inside ``_last``: the request context
    is still there for its work, and a failed commit leaves the answer short."""
    db: Database[Session] = make_db()
    flask_app = Flask(__name__)
    db.init_app(flask_app)

    @flask_app.get("/")
    def endpoint() -> FlaskResponse:
        def body() -> Iterator[bytes]:
            from flask import request

            yield BODY
            db.session.add(Item(name=request.path.strip("/") or "root"))
            db.session.flush()
            stream_work(db, fail)

        return FlaskResponse(stream_with_context(body()), headers=HEADERS)

    seen = await anyio.to_thread.run_sync(run_wsgi, db, flask_app)
    if fail:
        assert not seen.whole
        assert rows() == []
    else:
        assert (seen.status, seen.body) == (200, BODY)
        assert rows() == ["root"]


@SQLITE_SYNC
async def test_a_body_longer_than_its_length_is_not_stored_behind_a_broken_answer(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An app whose body overshoots its Content-Length (a length counted in characters for
    UTF-8 text, say) breaks its own response: the server refuses the extra bytes. Held
    back, that chunk reaches the server only after the stream's work was committed: the
    data is stored and the client gets a broken answer (rule 19: stored means success).
    Stored and a complete answer, or neither.
    """
    db: Database[Session] = make_db()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        headers = [(b"content-length", b"4")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"caf\xc3\xa9", "more_body": True})
        await insert(db, "streamed")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serve(SessionMiddleware(app, db=db)) as served:
        received = await anyio.to_thread.run_sync(_raw_get, served.port)
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    head, _, body = received.partition(b"\r\n\r\n")
    whole = head.startswith(b"HTTP/1.1 200") and body == b"caf\xc3\xa9"[:4] and len(body) == 4
    assert whole == (rows() == ["streamed"]), (received, rows())


def _raw_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received
