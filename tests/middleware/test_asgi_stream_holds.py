"""What the limit on connections held by sync streaming bodies must not catch, and the
pools it reads (SPEC rules 9 and 13).

The limit counts a connection when a streaming unit's session begins a transaction in a
thread other than the event loop's. The unit's own commits (at the start and before the
final message) run in worker threads too: a commit whose flush is the session's first use
of the pool (an endpoint or an async body that only ``add()``s) is not a body's hold. The
limit is half of the pool's size plus overflow, whoever made the pool.

Real uvicorn, real databases; every case ends with ``make_db``'s leak check.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware

from .._models import Item
from .._uvicorn import serve, wait_until
from ..conftest import Backend, DatabaseFactory, assert_no_leaks, backend_params
from ._asgi_apps import nothing_left
from .test_asgi_stream_threads import bodies_then_endpoints

pytestmark = pytest.mark.anyio

SYNC = backend_params(modes=["sync"])
ONE = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 10}
TWO = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 10}


def _app(db: Database[Any], gate: threading.Event) -> Starlette:
    """``/add``: an endpoint that only adds (its connection is checked out by the commit);
    ``/add-then-stream``: the same, then an async body that never touches the database and
    waits for ``gate``; ``/async-add``: an async body that only adds;
    ``/sync-stream``: a sync body that reads.
    """

    async def add(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("added", status_code=201)

    async def add_then_stream(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))

        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            while not gate.is_set():  # noqa: ASYNC110 - set from the test's thread
                await anyio.sleep(0.005)
            yield b"last"

        return StreamingResponse(body())

    async def async_add(request: Request) -> Response:
        name = request.path_params["name"]

        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            db.session.add(Item(name=name))
            yield b"last"

        return StreamingResponse(body())

    def sync_stream(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            yield b"first;"
            db.session.execute(sa.text("SELECT 1"))
            yield b"last"

        return StreamingResponse(body())

    app = Starlette(
        routes=[
            Route("/add/{name}", add, methods=["POST"]),
            Route("/add-then-stream/{name}", add_then_stream, methods=["POST"]),
            Route("/async-add/{name}", async_add, methods=["POST"]),
            Route("/sync-stream", sync_stream),
        ]
    )
    app.add_middleware(SessionMiddleware, db=db)
    return app


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_an_endpoint_that_only_adds_is_not_a_streaming_body(
    make_db: DatabaseFactory, rows: Any
) -> None:
    """No stream at all: the commit at the start checks out the connection for its flush.
    A pool of one connection allows sync bodies none, and that commit must not count as one.
    """
    db: Database[Session] = make_db(engine_options=ONE)
    async with (
        serve(_app(db, threading.Event())) as served,
        httpx.AsyncClient(base_url=served.url, timeout=20) as client,
    ):
        response = await client.post("/add/plain")
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    assert (response.status_code, response.text) == (201, "added")
    assert rows() == ["plain"]


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_an_async_body_that_only_adds_is_not_refused(
    make_db: DatabaseFactory, rows: Any
) -> None:
    """An async generator body is not limited (it needs no thread); its add() is flushed by
    the final commit, in a worker thread: that must not be refused.
    """
    db: Database[Session] = make_db(engine_options=ONE)
    async with (
        serve(_app(db, threading.Event())) as served,
        httpx.AsyncClient(base_url=served.url, timeout=20) as client,
    ):
        try:
            content: bytes | Exception = (await client.post("/async-add/streamed")).content
        except httpx.HTTPError as error:
            content = error
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    assert content == b"first;last"
    assert rows() == ["streamed"]


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_a_long_async_stream_after_a_write_holds_no_share_of_the_pool(
    make_db: DatabaseFactory, rows: Any
) -> None:
    """Pool of two: sync bodies may hold one. An endpoint adds a row, then streams from an
    async body that holds no connection (its work was committed at the start). While it
    streams, another endpoint's write must not be refused as a second sync body.
    """
    db: Database[Session] = make_db(engine_options=TWO)
    gate = threading.Event()
    async with (
        serve(_app(db, gate)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=20) as client,
    ):
        stream = asyncio.ensure_future(client.post("/add-then-stream/streaming"))
        await wait_until(lambda: rows() == ["streaming"])  # the start's commit is done
        try:
            plain = await client.post("/add/plain")
        finally:
            gate.set()
        streamed = await stream
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert streamed.content == b"first;last"
    assert (plain.status_code, plain.text) == (201, "added")
    assert sorted(rows()) == ["plain", "streaming"]


@pytest.mark.parametrize("backend", backend_params(["sqlite"], ["sync"]), indirect=True)
async def test_an_engine_passed_in_counts_its_overflow(backend: Backend) -> None:
    """An engine of one pooled connection and ten of overflow has eleven: a sync body that
    reads must not be refused as if none were left to the endpoints.
    """
    engine: Engine = sa.create_engine(backend.url, pool_size=1, max_overflow=10)
    db: Database[Any] = Database(engine=engine)
    try:
        async with (
            serve(_app(db, threading.Event())) as served,
            httpx.AsyncClient(base_url=served.url, timeout=20) as client,
        ):
            try:
                content: bytes | Exception = (await client.get("/sync-stream")).content
            except httpx.HTTPError as error:
                content = error
            await wait_until(lambda: nothing_left(db) == (0, 0, 0))
        assert content == b"first;last"
        assert_no_leaks(db, backend)
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", backend_params(["sqlite"], ["sync"]), indirect=True)
async def test_a_pool_passed_in_the_options_is_limited_by_its_own_size(
    make_db: DatabaseFactory, backend: Backend
) -> None:
    """``engine_options={"pool": QueuePool(...)}`` (one of the pool choices the library
    knows): the limit must follow that pool's two connections, not the default 5 + 10.
    The shape of ``test_sync_streams_never_hold_every_connection``: two sync bodies hold a
    connection each, endpoints take every thread and wait for the pool; the second body
    must be refused, or the endpoints wait for the pool's timeout.
    """

    def connect() -> Any:
        return sqlite3.connect(backend.database, check_same_thread=False, timeout=15)

    pool = QueuePool(connect, pool_size=2, max_overflow=0, timeout=12)
    outcome = await bodies_then_endpoints(make_db(engine_options={"pool": pool}))
    assert outcome.refused == 1, "the second sync body was allowed half of a pool of 15"
    assert outcome.waited < 8, f"the endpoints waited {outcome.waited:.1f} s for a connection"


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_concurrent_writes_on_the_default_pool_are_not_refused(
    make_db: DatabaseFactory, rows: Any
) -> None:
    """The default pool (SQLite: 15, PostgreSQL/MariaDB: 5 + 10; sync bodies may hold 7).
    Thirty concurrent endpoints that only add, no stream anywhere: every one is stored."""
    db: Database[Session] = make_db()
    async with (
        serve(_app(db, threading.Event())) as served,
        httpx.AsyncClient(
            base_url=served.url, timeout=30, limits=httpx.Limits(max_connections=30)
        ) as client,
    ):
        answers = await asyncio.gather(*(client.post(f"/add/n{i}") for i in range(30)))
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    statuses = [answer.status_code for answer in answers]
    assert statuses == [201] * 30, f"{statuses.count(500)} of 30 writes refused"
    assert len(rows()) == 30


@pytest.mark.parametrize("backend", backend_params(["sqlite"], ["sync"]), indirect=True)
async def test_sync_work_after_a_stream_is_not_limited(make_db: DatabaseFactory, rows: Any) -> None:
    """Held: a ``def`` background task after a stream (its unit opens once the final message
    left) is not a streaming body, even where sync bodies may hold no connection."""
    from starlette.background import BackgroundTask

    db: Database[Session] = make_db(engine_options=ONE)

    def later() -> None:
        db.session.add(Item(name="later"))
        db.session.flush()

    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            yield b"last"

        return StreamingResponse(body(), background=BackgroundTask(later))

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(SessionMiddleware, db=db)
    async with (
        serve(app) as served,
        httpx.AsyncClient(base_url=served.url, timeout=20) as client,
    ):
        response = await client.get("/")
        await wait_until(lambda: rows() == ["later"])
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    assert response.content == b"first;last"
