"""SessionMiddleware and the shape of a response: a start that leaves at once, trailers, no body.

SPEC rules 3 and 9 (issue 12 cases 8, 9 and 10): the status decision commits what the app
wrote before it sent ``http.response.start``, and the start leaves as soon as that commit is
done; what is written afterwards is stream work, committed before the final message leaves
(the last trailers message when the start announced trailers) if the status passed. Driven
through raw ASGI calls, a real uvicorn server, and a real hypercorn server speaking HTTP/2
(h2c with prior knowledge, the only way hypercorn sends trailers) to the ``h2`` library as
client. ``make_db`` checks afterwards that nothing was left behind.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.to_thread
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import sqlalchemy as sa
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from hypercorn.typing import Framework
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sessionscope import Database, SessionMiddleware
from sessionscope._types import ASGIApp, Message, Receive, Scope, Send

from .._models import Child
from .._uvicorn import serve, wait_until
from ..conftest import DatabaseFactory
from ._asgi_apps import insert, nothing_left, with_route
from ._driver import Exchange, call

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol, so that a server can start and stop a raw app."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def child_count(checker: sa.Engine) -> int:
    with checker.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).select_from(Child)) or 0)


# -- case 8: the start leaves as soon as the app sends it -----------------------------------


async def test_start_leaves_before_the_body_produces_its_first_chunk(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A body that waits until the client has the status (long polling, server-sent events)
    must not deadlock: nothing holds the start back until the first chunk any more.
    """
    db = make_db()
    start_sent = anyio.Event()

    async def endpoint(request: Request) -> Response:
        await insert(db, "before")

        async def body() -> AsyncIterator[bytes]:
            await start_sent.wait()
            await insert(db, "streamed")
            yield b"first;"
            yield b"last"

        return StreamingResponse(body())

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start_sent.set()

    exchange = Exchange()
    with anyio.move_on_after(3) as waited:
        await call(with_route(db, "/", endpoint), "POST", "/", exchange, on_send)
    assert not waited.cancelled_caught, "the start was held back until the body's first chunk"
    assert (exchange.status, exchange.body, exchange.complete) == (200, b"first;last", True)
    assert rows() == ["before", "streamed"]


# -- case 10: a start with no body message ----------------------------------------------------

# (method, status, headers): responses that a client takes as complete once it has the start.
BODYLESS = [
    pytest.param("POST", 204, [], id="204"),
    pytest.param("GET", 304, [], id="304"),
    pytest.param("HEAD", 200, [], id="HEAD"),
    pytest.param("GET", 200, [(b"content-length", b"0")], id="content-length-0"),
]


def bodyless_app(db: Database[Any], status: int, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
    """An app that writes, sends a start and returns without any body message."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        await insert(db, "nobody")
        await send({"type": "http.response.start", "status": status, "headers": headers})

    return SessionMiddleware(app, db=db)


@pytest.mark.parametrize(("method", "status", "headers"), BODYLESS)
async def test_start_without_a_body_is_committed_before_it_leaves(
    make_db: DatabaseFactory,
    rows: Rows,
    method: str,
    status: int,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """The server may answer a bodyless status completely from the start alone: what the
    app wrote before it is committed by the time the start reaches the server.
    """
    db = make_db()
    seen_at_start: list[list[str]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen_at_start.append(await anyio.to_thread.run_sync(rows))

    exchange = await call(bodyless_app(db, status, headers), method, "/", on_send=on_send)
    assert exchange.status == status
    assert seen_at_start == [["nobody"]]
    assert rows() == ["nobody"]


@pytest.mark.parametrize(("method", "status", "headers"), BODYLESS)
async def test_complete_bodyless_answer_from_uvicorn_keeps_its_write(
    make_db: DatabaseFactory,
    rows: Rows,
    method: str,
    status: int,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """A client that got a complete success must find the write stored, never rolled back."""
    db = make_db()
    async with (
        serve(bodyless_app(db, status, headers)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as http,
    ):
        response = await http.request(method, "/")
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    assert (response.status_code, response.content) == (status, b"")
    assert rows() == ["nobody"]


# -- case 9: trailers over HTTP/2 under hypercorn -----------------------------------------------


@asynccontextmanager
async def hypercorn_h2c(app: ASGIApp) -> AsyncIterator[int]:
    """Serve ``app`` with hypercorn on a free loopback port in a thread; yield the port.

    A client that opens with the HTTP/2 preface gets HTTP/2 without TLS (h2c, prior
    knowledge). The server's lifespan shutdown disposes an async database on its own loop.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2
    stop = threading.Event()
    failure: list[BaseException] = []

    async def stopped() -> None:
        # Polled: set from the test's thread, which cannot set an asyncio.Event of this loop.
        while not stop.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    def run() -> None:
        try:
            asyncio.run(hypercorn_serve(cast("Framework", app), config, shutdown_trigger=stopped))
        except BaseException as exc:  # pragma: no cover - reported below
            failure.append(exc)

    thread = threading.Thread(target=run, name="hypercorn", daemon=True)
    thread.start()
    try:
        with anyio.fail_after(20):
            while True:
                try:
                    probe_stream = await anyio.connect_tcp("127.0.0.1", port)
                except OSError:
                    if not thread.is_alive():
                        raise RuntimeError(f"hypercorn did not start: {failure!r}") from None
                    await anyio.sleep(0.02)
                else:
                    await probe_stream.aclose()
                    break
        yield port
    finally:
        stop.set()
        await anyio.to_thread.run_sync(thread.join, 30)
        if thread.is_alive():  # pragma: no cover
            raise RuntimeError("hypercorn did not stop within 30 s")
    if failure:  # pragma: no cover
        raise failure[0]


@dataclass
class H2Answer:
    """What an HTTP/2 client saw of one response."""

    status: int | None = None
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False

    @property
    def complete_with_trailers(self) -> bool:
        return self.ended and self.trailers is not None


async def h2_get(port: int, server_done: threading.Event) -> H2Answer:
    """GET / over h2c, announcing ``te: trailers``; read until the stream ends, or until the
    server has finished the request and nothing more arrived for half a second.
    """
    answer = H2Answer()
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    connection.initiate_connection()
    stream_id = connection.get_next_available_stream_id()
    request_headers = [
        (b":method", b"GET"),
        (b":path", b"/"),
        (b":scheme", b"http"),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b"te", b"trailers"),
    ]
    connection.send_headers(stream_id, request_headers, end_stream=True)
    quiet = 0
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(connection.data_to_send())
        with anyio.fail_after(10):
            while not answer.ended and quiet < 5:
                data = b""
                with anyio.move_on_after(0.1):
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
                if not data:
                    quiet = quiet + 1 if server_done.is_set() else 0
                    continue
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        answer.status = int(dict(event.headers or [])[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        answer.body += event.data or b""
                        connection.acknowledge_received_data(
                            event.flow_controlled_length or 0, stream_id
                        )
                    elif isinstance(event, h2.events.TrailersReceived):
                        answer.trailers = [
                            (bytes(name), bytes(value)) for name, value in event.headers or []
                        ]
                    elif isinstance(event, h2.events.StreamEnded):
                        answer.ended = True
                    elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                        return answer
                await stream.send(connection.data_to_send())
    return answer


TRAILERS = [(b"x-checksum", b"42")]


def trailers_app(
    db: Database[Any],
    status: int,
    compute_trailers: Callable[[], Awaitable[None]],
    done: threading.Event,
    after_trailers: Callable[[], Awaitable[None]] | None = None,
) -> ASGIApp:
    """An app that writes, streams two chunks, computes its trailers, and sends them.

    ``after_trailers`` runs in the app once they are sent; ``done`` is set once the request
    is over, middleware included.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        assert "http.response.trailers" in scope["extensions"]
        await insert(db, "before")
        start = {"type": "http.response.start", "status": status, "headers": [], "trailers": True}
        await send(start)
        await send({"type": "http.response.body", "body": b"first;", "more_body": True})
        await send({"type": "http.response.body", "body": b"last", "more_body": False})
        await compute_trailers()
        await send({"type": "http.response.trailers", "headers": TRAILERS})
        if after_trailers is not None:
            await after_trailers()

    middleware = SessionMiddleware(app, db=db)

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await middleware(scope, receive, send)
        finally:
            if scope["type"] == "http":
                done.set()

    return outer


async def test_trailer_write_of_an_error_status_is_rolled_back(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """The status decides for everything up to the final trailers: a 400's write made while
    computing its trailers is rolled back like the rest of the response.
    """
    db = make_db()
    done = threading.Event()

    async def compute_trailers() -> None:
        await insert(db, "trailer")

    async with hypercorn_h2c(trailers_app(db, 400, compute_trailers, done)) as port:
        answer = await h2_get(port, done)
        await wait_until(done.is_set)
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    assert (answer.status, answer.body, answer.trailers) == (400, b"first;last", TRAILERS)
    assert answer.ended
    assert rows() == []


async def test_trailer_write_is_committed_before_the_trailers_leave(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """The last trailers message is the response's final message: a client that has the
    complete response can read the write made while computing the trailers.
    """
    db = make_db()
    done = threading.Event()
    release = threading.Event()

    async def compute_trailers() -> None:
        await insert(db, "trailer")

    async def wait_for_the_test() -> None:
        # The app stays in the request after its trailers left, until the test has looked.
        with anyio.fail_after(10):
            while not release.is_set():  # noqa: ASYNC110 - set from the test's thread
                await anyio.sleep(0.01)

    app = trailers_app(db, 200, compute_trailers, done, wait_for_the_test)
    try:
        async with hypercorn_h2c(app) as port:
            answer = await h2_get(port, done)
            stored_when_complete = rows()
            release.set()
            await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    finally:
        release.set()
    assert (answer.status, answer.body, answer.trailers) == (200, b"first;last", TRAILERS)
    assert answer.ended
    assert stored_when_complete == ["before", "trailer"]
    assert rows() == ["before", "trailer"]


async def test_failed_commit_of_a_trailer_write_withholds_the_trailers(
    make_db: DatabaseFactory, rows: Rows, checker: sa.Engine
) -> None:
    """Too late for a 500: the client must not see a complete response whose last write was
    lost, so the final trailers message is withheld.
    """
    db = make_db()
    done = threading.Event()

    async def compute_trailers() -> None:
        # No such parent: the database refuses the row at COMMIT (at its flush on MariaDB).
        db.session.add(Child(parent_id=999_999))

    async with hypercorn_h2c(trailers_app(db, 200, compute_trailers, done)) as port:
        answer = await h2_get(port, done)
        await wait_until(done.is_set)
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    assert answer.status == 200
    assert not answer.complete_with_trailers, "a complete response with trailers; data lost"
    assert child_count(checker) == 0
    assert rows() == ["before"]
