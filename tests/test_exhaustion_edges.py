"""Pool exhaustion, edges: a 503 only for a request that got no connection in time.

The pool holds one connection with a short ``pool_timeout``; a slow request (or the test)
holds it. A bug met after the app recovered from a timeout keeps its 500 and traceback; a
``db.begin()`` block is part of its request; an answer already on its way is not answered
twice; a 4xx the app chose stands; the pool is still watched after an engine sharing it is
disposed; and a ``Database`` is not kept alive by an engine it shares. ``make_db`` checks
afterwards, with the garbage collector off, that no connection, unit or session was left.
"""

from __future__ import annotations

import gc
import http.client
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, NoReturn
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import anyio
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from werkzeug.test import Client

from sessionscope import Database, SessionMiddleware
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._exhaustion import (
    BODY,
    SELECT_1,
    Gate,
    errors,
    hold_route,
    nothing_left,
    served_while_held,
    told_to_retry,
)
from ._servers import wait_until as wait_until_blocking
from ._servers import werkzeug_server
from ._units import Boom, run_unit
from ._uvicorn import PROTOCOL_ERRORS, wait_until
from .conftest import Backend, DatabaseFactory, backend_params, leak_checked

pytestmark = pytest.mark.anyio

POOL_TIMEOUT = 0.3
TINY_POOL = {"pool_size": 1, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT}

SQLITE = backend_params(["sqlite"])
SQLITE_SYNC = backend_params(["sqlite"], modes=["sync"])


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """What any thread logs (the servers run in threads), WARNING and up."""
    caplog.set_level(logging.WARNING)
    return caplog


def make_tiny_db(make_db: DatabaseFactory) -> Database[Any]:
    return make_db(engine_options=dict(TINY_POOL))


# -- the pool's only connection, held --------------------------------------------------------------


class Taken:
    """The pool's only connection, held by the test until released (from any thread)."""

    def __init__(self, engine: Engine) -> None:
        self._lock = threading.Lock()
        self._connection: Connection | None = engine.connect()

    def release(self) -> None:
        """Give the connection back to the pool, once (later calls do nothing)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> Taken:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def starlette_app(
    db: Database[Any], gate: Gate, routes: list[Route], on_error: ErrorHandler | None = None
) -> Starlette:
    """``routes`` and ``GET /hold`` under ``SessionMiddleware``; ``on_error``: the app's own
    handler for database errors."""
    handlers = {SQLAlchemyError: on_error} if on_error is not None else {}
    app = Starlette(routes=[hold_route(db, gate), *routes], exception_handlers=handlers)
    app.add_middleware(SessionMiddleware, db=db)
    return app


async def database_error(request: Request, exc: Exception) -> Response:
    """The app's own handler: a database error becomes a 500."""
    return PlainTextResponse("database error", status_code=500)


def assert_told_to_retry(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503, (status, body)
    assert headers.get("retry-after") == "1", headers
    assert body == BODY


# -- ASGI ------------------------------------------------------------------------------------------


def a_bug() -> NoReturn:
    raise Boom("a bug after the recovery")


# Where the app's bug is raised: after its handling of the timeout, or inside it (the bug's
# __context__ is then the timeout, but the timeout did not cause it).
RAISED = ["after-handling", "while-handling"]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
@pytest.mark.parametrize("raised", RAISED)
async def test_a_bug_after_a_recovered_timeout_keeps_its_500_and_traceback(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture, raised: str
) -> None:
    """A bug after a recovered timeout keeps its 500 and traceback: a 503 would hide it."""
    db = make_tiny_db(make_db)
    gate = Gate()
    pool: Any = db.sync_engine.pool

    def recover_then_fail_sync(request: Request) -> Response:
        try:
            db.session.execute(SELECT_1)
        except PoolTimeout:
            gate.release.set()  # the busy moment passes: the next checkout succeeds
            wait_until_blocking(lambda: pool.checkedout() == 0)
            db.session.rollback()
            db.session.execute(SELECT_1)
            if raised == "while-handling":
                a_bug()
        a_bug()

    async def recover_then_fail_async(request: Request) -> Response:
        try:
            await db.session.execute(SELECT_1)
        except PoolTimeout:
            gate.release.set()
            await wait_until(lambda: pool.checkedout() == 0)
            await db.session.rollback()
            await db.session.execute(SELECT_1)
            if raised == "while-handling":
                a_bug()
        a_bug()

    endpoint = recover_then_fail_async if db.is_async else recover_then_fail_sync
    app = starlette_app(db, gate, [Route("/recovers", endpoint)])
    async with served_while_held(app, db, gate) as (served, http):
        response = await http.get("/recovers")
    # Read once the server stopped: it logs the app's error after the unit has ended.
    log = served.log()
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert "Boom: a bug after the recovery" in log, log
    assert told_to_retry(logs) == []
    assert gate.held == [200]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_a_timeout_in_a_begin_block_turned_500_by_a_handler_is_a_503(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """A 'db.begin()' block is part of its request: its timeout, made a 500, is a 503."""
    db = make_tiny_db(make_db)
    gate = Gate()

    def in_a_block_sync(request: Request) -> Response:
        with db.begin() as session:
            session.execute(SELECT_1)
        return PlainTextResponse("done", status_code=201)

    async def in_a_block_async(request: Request) -> Response:
        async with db.begin() as session:
            await session.execute(SELECT_1)
        return PlainTextResponse("done", status_code=201)

    endpoint = in_a_block_async if db.is_async else in_a_block_sync
    routes = [Route("/block", endpoint, methods=["POST"])]
    app = starlette_app(db, gate, routes, on_error=database_error)
    async with served_while_held(app, db, gate) as (_, http):
        response = await http.post("/block")
    assert_told_to_retry(response.status_code, dict(response.headers), response.content)
    assert told_to_retry(logs) == ["POST /block"]
    assert errors(logs) == []


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_any_5xx_the_app_made_of_a_timeout_is_a_503(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """Any 5xx the app made of a busy pool (502, not only 500) tells the client to retry."""
    db = make_tiny_db(make_db)
    gate = Gate()

    def bad_gateway_sync(request: Request) -> Response:
        try:
            db.session.execute(SELECT_1)
        except SQLAlchemyError:
            return PlainTextResponse("bad gateway", status_code=502)
        return PlainTextResponse("read")

    async def bad_gateway_async(request: Request) -> Response:
        try:
            await db.session.execute(SELECT_1)
        except SQLAlchemyError:
            return PlainTextResponse("bad gateway", status_code=502)
        return PlainTextResponse("read")

    endpoint = bad_gateway_async if db.is_async else bad_gateway_sync
    app = starlette_app(db, gate, [Route("/read", endpoint)])
    async with served_while_held(app, db, gate) as (_, http):
        response = await http.get("/read")
    assert_told_to_retry(response.status_code, dict(response.headers), response.content)
    assert told_to_retry(logs) == ["GET /read"]


async def read_into(chunks: list[bytes], response: httpx.Response) -> None:
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_a_timeout_in_a_stream_after_its_start_is_not_answered_twice(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """A timeout after the 200 left cannot become a 503: a second start would break HTTP."""
    db = make_tiny_db(make_db)
    gate = Gate()

    def chunks_sync() -> Iterator[bytes]:
        yield b"first "
        db.session.execute(SELECT_1)
        yield b"second"

    async def chunks_async() -> AsyncIterator[bytes]:
        yield b"first "
        await db.session.execute(SELECT_1)
        yield b"second"

    def stream(request: Request) -> Response:
        return StreamingResponse(chunks_async() if db.is_async else chunks_sync())

    app = starlette_app(db, gate, [Route("/stream", stream)])
    async with served_while_held(app, db, gate) as (served, http):
        chunks: list[bytes] = []
        async with http.stream("GET", "/stream") as response:
            with pytest.raises(httpx.RemoteProtocolError):
                await read_into(chunks, response)
        # Only the slow request's unit and connection remain.
        await wait_until(lambda: nothing_left(db) == (1, 1, 1))
    # Read once the server stopped: it logs the app's error after the unit has ended.
    log = served.log()
    assert (response.status_code, b"".join(chunks)) == (200, b"first ")
    assert not any(text in log for text in PROTOCOL_ERRORS), log
    assert "TimeoutError" in log, log
    assert told_to_retry(logs) == []


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_a_timeout_in_work_after_the_response_keeps_the_answer(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """A background task's timeout comes after the answer: nothing more is sent, nothing leaks."""
    db = make_tiny_db(make_db)
    gate = Gate()
    job_over = threading.Event()

    def job_sync() -> None:
        try:
            db.session.execute(SELECT_1)
        finally:
            job_over.set()

    async def job_async() -> None:
        try:
            await db.session.execute(SELECT_1)
        finally:
            job_over.set()

    def later(request: Request) -> Response:
        job = BackgroundTask(job_async) if db.is_async else BackgroundTask(job_sync)
        return PlainTextResponse("answered", background=job)

    app = starlette_app(db, gate, [Route("/later", later)])
    async with served_while_held(app, db, gate) as (served, http):
        response = await http.get("/later")
        assert await anyio.to_thread.run_sync(job_over.wait, 10)
        await wait_until(lambda: nothing_left(db) == (1, 1, 1))
    # Read once the server stopped: it logs the app's error after the unit has ended.
    log = served.log()
    assert (response.status_code, response.text) == (200, "answered")
    assert not any(text in log for text in PROTOCOL_ERRORS), log
    assert "TimeoutError" in log, log
    assert told_to_retry(logs) == []


# -- WSGI and Flask --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
@pytest.mark.parametrize("shape", ["raises", "generator"])
@pytest.mark.parametrize("raised", RAISED)
def test_a_bug_after_a_recovered_timeout_reaches_the_wsgi_server(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture, shape: str, raised: str
) -> None:
    """Under WSGI too, a bug after a recovered timeout reaches the server, not a 503."""
    db = make_tiny_db(make_db)
    taken = Taken(db.sync_engine)

    def recover_then_fail() -> None:
        try:
            db.session.execute(SELECT_1)
        except PoolTimeout:
            taken.release()  # the busy moment passes: the next checkout succeeds
            db.session.rollback()
            db.session.execute(SELECT_1)
            if raised == "while-handling":
                a_bug()
        a_bug()

    def raises(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        recover_then_fail()
        start_response("200 OK", [])  # pragma: no cover - never reached
        return [b"never"]  # pragma: no cover

    def generator(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        recover_then_fail()
        start_response("200 OK", [])  # pragma: no cover - never reached
        yield b"never"  # pragma: no cover

    app: WSGIApplication = raises if shape == "raises" else generator
    client = Client(WSGISessionMiddleware(app, db))
    with taken, pytest.raises(Boom, match="a bug after the recovery"):
        client.get("/")
    assert told_to_retry(logs) == []


def fetch_answer(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One request over a new connection: the status, the headers and the whole body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        headers = {key.lower(): value for key, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
def test_a_timeout_in_a_begin_block_is_a_503_under_flask(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """Flask's logged 500 for a 'db.begin()' block's timeout becomes the unlogged 503."""
    db = make_tiny_db(make_db)
    app = Flask(__name__)
    db.init_app(app)

    @app.post("/block")
    def block() -> tuple[str, int]:
        with db.begin() as session:
            session.execute(SELECT_1)
        return "done", 201

    with Taken(db.sync_engine), werkzeug_server(app) as port:
        status, headers, body = fetch_answer(port, "POST", "/block")
        wait_until_blocking(lambda: db.live_units == 0)
    assert_told_to_retry(status, headers, body)
    assert told_to_retry(logs) == ["POST /block"]
    assert errors(logs) == []


def flask_app(db: Database[Any], **config: Any) -> Flask:
    """``GET /read`` reads through ``db.session`` with nothing of its own to handle errors."""
    app = Flask(__name__)
    app.config.update(config)
    db.init_app(app)

    @app.get("/read")
    def read() -> str:
        db.session.execute(SELECT_1)
        return "read"

    return app


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
def test_a_flask_app_under_test_gets_the_503(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """With TESTING on, Flask lets the timeout propagate: the client still gets the 503."""
    db = make_tiny_db(make_db)
    client = flask_app(db, TESTING=True).test_client()
    with Taken(db.sync_engine):
        response = client.get("/read")
    headers = {key.lower(): value for key, value in response.headers.items()}
    assert_told_to_retry(response.status_code, headers, response.data)
    assert told_to_retry(logs) == ["GET /read"]
    assert errors(logs) == []


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
def test_a_4xx_an_error_handler_made_of_a_timeout_stands(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """A 4xx the app chose for a busy pool stands: only a 5xx becomes the 503."""
    db = make_tiny_db(make_db)
    app = flask_app(db)

    @app.errorhandler(SQLAlchemyError)
    def conflict(error: SQLAlchemyError) -> tuple[str, int]:
        return "try another way", 409

    with Taken(db.sync_engine):
        response = app.test_client().get("/read")
    assert (response.status_code, response.text) == (409, "try another way")
    assert response.headers.get("Retry-After") is None
    assert told_to_retry(logs) == []
    assert errors(logs) == []


# -- engines that share a pool ---------------------------------------------------------------------


def caught_app(db: Database[Any]) -> WSGIApplication:
    """Reads, and answers a database error with a 500 of its own: only the pool's report of
    the timeout can make that a 503."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            db.session.execute(SELECT_1)
        except SQLAlchemyError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"database error"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"read"]

    return WSGISessionMiddleware(app, db)


def status_while_taken(client: Client, engine: Engine) -> int:
    with Taken(engine):
        return client.get("/").status_code


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
def test_disposing_an_option_engine_of_the_database_keeps_the_503(
    make_db: DatabaseFactory,
) -> None:
    """Disposing an option engine (same pool) neither raises nor leaves the new pool unwatched."""
    db = make_tiny_db(make_db)
    client = Client(caught_app(db))
    assert client.get("/").status_code == 200
    tenant = db.sync_engine.execution_options(schema_translate_map={None: "main"})
    tenant.dispose()
    assert status_while_taken(client, db.sync_engine) == 503
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
def test_a_database_on_an_option_engine_keeps_the_503_after_its_parent_is_disposed(
    backend: Backend,
) -> None:
    """A Database on an option engine still answers 503 after its parent engine's dispose."""
    parent = sa.create_engine(backend.url, **TINY_POOL)
    db: Database[Any] = Database(engine=parent.execution_options(schema_translate_map={}))
    try:
        with leak_checked([db], backend):
            client = Client(caught_app(db))
            assert status_while_taken(client, parent) == 503
            parent.dispose()
            assert status_while_taken(client, parent) == 503
            assert client.get("/").status_code == 200
    finally:
        parent.dispose()


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_databases_sharing_an_engine_are_freed(backend: Backend) -> None:
    """Databases made on one engine (per tenant, per test) must not live as long as it does."""
    engine: Engine | AsyncEngine
    if backend.is_async:
        engine = create_async_engine(backend.url, **TINY_POOL)
    else:
        engine = sa.create_engine(backend.url, **TINY_POOL)
    refs: list[weakref.ref[Database[Any]]] = []
    try:
        for _ in range(3):
            db: Database[Any] = Database(engine=engine)
            await run_unit(db, lambda session: session.execute(SELECT_1))
            refs.append(weakref.ref(db))
            del db
        gc.collect()
        assert [ref for ref in refs if ref() is not None] == []
    finally:
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            engine.dispose()
