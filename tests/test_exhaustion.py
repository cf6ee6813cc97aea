"""Pool exhaustion: a request that gets no pooled connection in time is told to come back.

Every test serves a real app on a pool of one connection with a short ``pool_timeout``. A
slow request takes that connection and waits; meanwhile a burst of concurrent requests
needs one. Each of them must get a ``503`` with ``Retry-After`` within the pool's timeout
(plus a margin), never a 500 with a traceback, whether the error escaped the endpoint, the
app's own error handling turned it into a 500, or the commit met it. An app that catches
the error and answers 200 itself keeps its answer. Afterwards the slow request still
answers, the next write is stored, and the ``make_db`` fixture checks that no connection,
unit or session was left behind.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from wsgiref.types import WSGIApplication

import anyio
import anyio.to_thread
import httpx
import pytest
from fastapi import Depends, FastAPI
from flask import Flask
from flask import request as flask_request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.wrappers import Request as WSGIRequest
from werkzeug.wrappers import Response as WSGIResponse

from sessionscope import Database, SessionMiddleware
from sessionscope.adapters.starlette import session_dependency
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._exhaustion import BODY, SELECT_1, nothing_left
from ._models import Item
from ._servers import wait_until as wait_until_blocking
from ._servers import werkzeug_server
from ._uvicorn import serve, wait_until
from .conftest import DatabaseFactory, backend_params

POOL_TIMEOUT = 0.5
TINY_POOL = {"pool_size": 1, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT}
# How much longer than the pool's timeout a told-to-retry answer may take on a loaded machine.
MARGIN = 2.0
BURST = 4

SYNC_ONLY = backend_params(modes=["sync"])
SQLITE_SYNC = backend_params(["sqlite"], modes=["sync"])
SQLITE = backend_params(["sqlite"])

# The app answers a busy pool itself with a 200: in the endpoint, or in its error handler.
FALLBACKS = ["fallback", "handler-fallback"]

Rows = Callable[[], list[str]]
Requests = list[tuple[str, str]]
Endpoint = Callable[[Request], Any]


# -- what every scenario shares ----------------------------------------------------------------


@dataclass
class Gate:
    """The slow request holds the only connection until the test opens the gate."""

    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    # Every run of a burst endpoint, by path: one per request when nothing is retried.
    calls: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """What the client got, and how long it took."""

    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float


@dataclass
class Outcome:
    """A whole scenario, as seen from outside the server."""

    burst: list[Answer]
    held: Answer
    after: Answer
    # (live units, sessions in the registry, connections checked out) once the burst had
    # its answers and the slow request still held its connection.
    during: tuple[int, int, int]
    calls: list[str]
    server_errors: list[str] = field(default_factory=list)


def burst_requests(case: str) -> Requests:
    """The burst of ``case``: distinct paths, so that each request's log line is its own."""
    if case == "commit":
        # The endpoint only adds: the connection is needed by the flush inside the commit.
        return [("POST", f"/add/burst-{i}") for i in range(BURST)]
    route = {"caught": "caught", "fallback": "fallback"}.get(case, "read")
    return [("GET", f"/{route}/burst-{i}") for i in range(BURST)]


def idle(db: Database[Any]) -> Callable[[], bool]:
    return lambda: nothing_left(db) == (0, 0, 0)


def make_tiny_db(make_db: DatabaseFactory) -> Database[Any]:
    """A database on a pool of one connection that waits ``POOL_TIMEOUT`` for it."""
    return make_db(engine_options=dict(TINY_POOL))


def scenario(make_db: DatabaseFactory, case: str) -> tuple[Database[Any], Gate, Requests]:
    """What a test of ``case`` starts from: a tiny pool's database, a gate, the burst."""
    return make_tiny_db(make_db), Gate(), burst_requests(case)


def assert_told_to_retry(answer: Answer, retry_after: int) -> None:
    assert answer.status == 503, answer
    assert answer.headers.get("retry-after") == str(retry_after), answer.headers
    assert answer.headers.get("content-type") == "text/plain; charset=utf-8", answer.headers
    assert answer.body == BODY


def assert_within_the_pool_timeout(answer: Answer) -> None:
    # It did wait for the pool (so the burst really met the timeout), and not much longer.
    assert POOL_TIMEOUT * 0.9 <= answer.elapsed < POOL_TIMEOUT + MARGIN, answer


def assert_warned_once_each(records: list[logging.LogRecord], requests: Requests) -> None:
    """One WARNING without a traceback per told-to-retry request, naming its method and path."""
    ours = [r for r in records if r.name == "sessionscope"]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    messages = [r.getMessage() for r in warnings]
    for method, path in requests:
        label = f"{method} {path}"
        assert sum(label in message for message in messages) == 1, (label, messages)
    assert len(warnings) == len(requests), messages
    assert [r.exc_info for r in warnings if r.exc_info] == []
    assert [r.getMessage() for r in ours if r.levelno >= logging.ERROR] == []


def check(
    outcome: Outcome,
    case: str,
    requests: Requests,
    logs: pytest.LogCaptureFixture,
    rows: Rows,
    retry_after: int = 1,
) -> None:
    """The assertions every scenario makes."""
    records = logs.records
    for answer in outcome.burst:
        if case.endswith("fallback"):
            assert (answer.status, answer.body) == (200, b"fallback"), answer
        else:
            assert_told_to_retry(answer, retry_after)
        assert_within_the_pool_timeout(answer)
    if not case.endswith("fallback"):
        assert_warned_once_each(records, requests)
    # Each endpoint ran once: nothing was retried inside the server.
    assert sorted(outcome.calls) == sorted(path for _, path in requests)
    # The burst's units ended: only the slow request's unit and its connection remained.
    assert outcome.during == (1, 1, 1)
    assert (outcome.held.status, outcome.held.body) == (200, b"held")
    assert outcome.after.status == 201
    # The burst wrote nothing (its units were rolled back); the next write is stored.
    assert rows() == ["after"]
    assert outcome.server_errors == []
    errors = [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """What the test logs, by any thread (the servers run in threads), WARNING and up."""
    caplog.set_level(logging.WARNING, logger="sessionscope")
    return caplog


# -- ASGI: Starlette and FastAPI under uvicorn ----------------------------------------------


async def database_error(request: Request, exc: Exception) -> Response:
    """The app's own handler: a database error becomes a 500."""
    return PlainTextResponse("database error", status_code=500)


async def database_fallback(request: Request, exc: Exception) -> Response:
    """The app's own handler: a database error gets a degraded answer, a 200."""
    return PlainTextResponse("fallback")


def burst_routes(
    hold: Endpoint, read: Endpoint, caught: Endpoint, fallback: Endpoint, add: Endpoint
) -> list[Route]:
    """The paths of the slow request and of every kind of burst, on their endpoints."""
    return [
        Route("/hold", hold),
        Route("/read/{name}", read),
        Route("/caught/{name}", caught),
        Route("/fallback/{name}", fallback),
        Route("/add/{name}", add, methods=["POST"]),
    ]


def sync_routes(db: Database[Any], gate: Gate) -> list[Route]:
    """``def`` endpoints (run in Starlette's thread pool) on a sync session."""

    def hold(request: Request) -> Response:
        db.session.execute(SELECT_1)
        gate.holding.set()
        gate.release.wait(10)
        return PlainTextResponse("held")

    def read(request: Request) -> Response:
        gate.calls.append(request.url.path)
        db.session.execute(SELECT_1)
        return PlainTextResponse("read")

    def caught(request: Request) -> Response:
        gate.calls.append(request.url.path)
        try:
            db.session.execute(SELECT_1)
        except SQLAlchemyError:
            return PlainTextResponse("database error", status_code=500)
        return PlainTextResponse("read")

    def fallback(request: Request) -> Response:
        gate.calls.append(request.url.path)
        try:
            db.session.execute(SELECT_1)
        except PoolTimeout:
            return PlainTextResponse("fallback")
        return PlainTextResponse("read")

    def add(request: Request) -> Response:
        gate.calls.append(request.url.path)
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("added", status_code=201)

    return burst_routes(hold, read, caught, fallback, add)


def async_routes(db: Database[Any], gate: Gate) -> list[Route]:
    """``async def`` endpoints on an async session."""

    async def hold(request: Request) -> Response:
        await db.session.execute(SELECT_1)
        gate.holding.set()
        await anyio.to_thread.run_sync(gate.release.wait, 10)
        return PlainTextResponse("held")

    async def read(request: Request) -> Response:
        gate.calls.append(request.url.path)
        await db.session.execute(SELECT_1)
        return PlainTextResponse("read")

    async def caught(request: Request) -> Response:
        gate.calls.append(request.url.path)
        try:
            await db.session.execute(SELECT_1)
        except SQLAlchemyError:
            return PlainTextResponse("database error", status_code=500)
        return PlainTextResponse("read")

    async def fallback(request: Request) -> Response:
        gate.calls.append(request.url.path)
        try:
            await db.session.execute(SELECT_1)
        except PoolTimeout:
            return PlainTextResponse("fallback")
        return PlainTextResponse("read")

    async def add(request: Request) -> Response:
        gate.calls.append(request.url.path)
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("added", status_code=201)

    return burst_routes(hold, read, caught, fallback, add)


def starlette_app(db: Database[Any], gate: Gate, case: str, **options: Any) -> Starlette:
    """Sync endpoints on a sync database, async ones on an async database."""
    routes = async_routes(db, gate) if db.is_async else sync_routes(db, gate)
    handlers: dict[Any, Any] = {}
    if case == "handler":
        handlers[SQLAlchemyError] = database_error
    if case == "handler-fallback":
        handlers[SQLAlchemyError] = database_fallback
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.add_middleware(SessionMiddleware, db=db, **options)
    return app


def fastapi_app(db: Database[Any], gate: Gate, case: str, **options: Any) -> FastAPI:
    """Endpoints that get the session from ``session_dependency``."""
    app = FastAPI()
    session_dep = Depends(session_dependency(db))

    if db.is_async:

        @app.get("/hold")
        async def hold_async(session: AsyncSession = session_dep) -> Response:
            await session.execute(SELECT_1)
            gate.holding.set()
            await anyio.to_thread.run_sync(gate.release.wait, 10)
            return PlainTextResponse("held")

        @app.get("/read/{name}")
        async def read_async(name: str, session: AsyncSession = session_dep) -> Response:
            gate.calls.append(f"/read/{name}")
            await session.execute(SELECT_1)
            return PlainTextResponse("read")

        @app.get("/fallback/{name}")
        async def fallback_async(name: str, session: AsyncSession = session_dep) -> Response:
            gate.calls.append(f"/fallback/{name}")
            try:
                await session.execute(SELECT_1)
            except PoolTimeout:
                return PlainTextResponse("fallback")
            return PlainTextResponse("read")

        @app.post("/add/{name}")
        async def add_async(name: str, session: AsyncSession = session_dep) -> Response:
            gate.calls.append(f"/add/{name}")
            session.add(Item(name=name))
            return PlainTextResponse("added", status_code=201)

    else:

        @app.get("/hold")
        def hold(session: Session = session_dep) -> Response:
            session.execute(SELECT_1)
            gate.holding.set()
            gate.release.wait(10)
            return PlainTextResponse("held")

        @app.get("/read/{name}")
        def read(name: str, session: Session = session_dep) -> Response:
            gate.calls.append(f"/read/{name}")
            session.execute(SELECT_1)
            return PlainTextResponse("read")

        @app.get("/fallback/{name}")
        def fallback(name: str, session: Session = session_dep) -> Response:
            gate.calls.append(f"/fallback/{name}")
            try:
                session.execute(SELECT_1)
            except PoolTimeout:
                return PlainTextResponse("fallback")
            return PlainTextResponse("read")

        @app.post("/add/{name}")
        def add(name: str, session: Session = session_dep) -> Response:
            gate.calls.append(f"/add/{name}")
            session.add(Item(name=name))
            return PlainTextResponse("added", status_code=201)

    if case == "handler":

        @app.exception_handler(SQLAlchemyError)
        async def database_error_json(request: Request, exc: SQLAlchemyError) -> Response:
            return JSONResponse({"detail": "database error"}, status_code=500)

    if case == "handler-fallback":

        @app.exception_handler(SQLAlchemyError)
        async def database_fallback_json(request: Request, exc: SQLAlchemyError) -> Response:
            return PlainTextResponse("fallback")

    app.add_middleware(SessionMiddleware, db=db, **options)
    return app


def from_httpx(response: httpx.Response, started: float) -> Answer:
    headers = {key.lower(): value for key, value in response.headers.items()}
    return Answer(response.status_code, headers, response.content, time.monotonic() - started)


async def exhaust_asgi(app: Any, db: Database[Any], gate: Gate, requests: Requests) -> Outcome:
    """Serve ``app``; hold the only connection; send ``requests`` at once; release; write."""
    async with serve(app) as served:
        limits = httpx.Limits(max_connections=BURST + 2, max_keepalive_connections=BURST + 2)
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as http:
            held: list[Answer] = []
            burst: dict[int, Answer] = {}

            async def hold() -> None:
                started = time.monotonic()
                held.append(from_httpx(await http.get("/hold"), started))

            async def one(index: int, method: str, path: str) -> None:
                started = time.monotonic()
                burst[index] = from_httpx(await http.request(method, path), started)

            async with anyio.create_task_group() as holding:
                holding.start_soon(hold)
                try:
                    assert await anyio.to_thread.run_sync(gate.holding.wait, 10)
                    with anyio.fail_after(POOL_TIMEOUT + MARGIN + 10):
                        async with anyio.create_task_group() as tg:
                            for index, (method, path) in enumerate(requests):
                                tg.start_soon(one, index, method, path)
                    calls = list(gate.calls)
                    # The server ends a unit just after the client has its answer.
                    await wait_until(lambda: db.live_units == 1 and db.live_sessions == 1)
                    during = nothing_left(db)
                finally:
                    gate.release.set()
            started = time.monotonic()
            after = from_httpx(await http.post("/add/after"), started)
        await wait_until(idle(db))
        server_errors = [f"{r.name}: {r.getMessage()}" for r in served.errors()]
    answers = [burst[index] for index in range(len(requests))]
    return Outcome(answers, held[0], after, during, calls, server_errors)


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["unhandled", "handler", "caught", "commit", *FALLBACKS])
async def test_starlette_answers_503_when_the_pool_is_exhausted(
    make_db: DatabaseFactory, rows: Rows, logs: pytest.LogCaptureFixture, case: str
) -> None:
    """A busy pool tells Starlette clients to come back instead of failing them with a 500."""
    db, gate, requests = scenario(make_db, case)
    outcome = await exhaust_asgi(starlette_app(db, gate, case), db, gate, requests)
    check(outcome, case, requests, logs, rows)


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["unhandled", "handler", "commit", *FALLBACKS])
async def test_fastapi_answers_503_when_the_pool_is_exhausted(
    make_db: DatabaseFactory, rows: Rows, logs: pytest.LogCaptureFixture, case: str
) -> None:
    """FastAPI endpoints with an injected session get the same 503 as Starlette ones."""
    db, gate, requests = scenario(make_db, case)
    outcome = await exhaust_asgi(fastapi_app(db, gate, case), db, gate, requests)
    check(outcome, case, requests, logs, rows)


@pytest.mark.anyio
@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_asgi_retry_after_is_the_configured_value(
    make_db: DatabaseFactory, rows: Rows, logs: pytest.LogCaptureFixture
) -> None:
    """'retry_after' is what clients and load balancers are told to wait, so it must arrive."""
    db, gate, requests = scenario(make_db, "unhandled")
    app = starlette_app(db, gate, "unhandled", retry_after=7)
    outcome = await exhaust_asgi(app, db, gate, requests)
    check(outcome, "unhandled", requests, logs, rows, retry_after=7)


# -- WSGI: the plain middleware and Flask under Werkzeug's threaded server -----------------


def wsgi_app(db: Database[Any], gate: Gate, **options: Any) -> WSGIApplication:
    """A plain WSGI app under ``WSGISessionMiddleware``."""

    @WSGIRequest.application
    def app(request: WSGIRequest) -> WSGIResponse:
        kind, _, name = request.path.strip("/").partition("/")
        if kind == "hold":
            db.session.execute(SELECT_1)
            gate.holding.set()
            gate.release.wait(10)
            return WSGIResponse("held")
        gate.calls.append(request.path)
        if kind == "read":
            db.session.execute(SELECT_1)
            return WSGIResponse("read")
        if kind == "caught":
            try:
                db.session.execute(SELECT_1)
            except SQLAlchemyError:
                return WSGIResponse("database error", status=500)
            return WSGIResponse("read")
        if kind == "fallback":
            try:
                db.session.execute(SELECT_1)
            except PoolTimeout:
                return WSGIResponse("fallback")
            return WSGIResponse("read")
        assert kind == "add", request.path
        db.session.add(Item(name=name))
        return WSGIResponse("added", status=201)

    return WSGISessionMiddleware(app, db, **options)


def flask_app(db: Database[Any], gate: Gate, case: str, **options: Any) -> Flask:
    """A Flask app with ``db.init_app``; ``case`` picks the app's own error handler."""
    app = Flask(__name__)
    db.init_app(app, **options)

    @app.get("/hold")
    def hold() -> str:
        db.session.execute(SELECT_1)
        gate.holding.set()
        gate.release.wait(10)
        return "held"

    @app.get("/read/<name>")
    def read(name: str) -> str:
        gate.calls.append(flask_request.path)
        db.session.execute(SELECT_1)
        return "read"

    @app.get("/fallback/<name>")
    def fallback(name: str) -> str:
        gate.calls.append(flask_request.path)
        try:
            db.session.execute(SELECT_1)
        except PoolTimeout:
            return "fallback"
        return "read"

    @app.post("/add/<name>")
    def add(name: str) -> tuple[str, int]:
        gate.calls.append(flask_request.path)
        db.session.add(Item(name=name))
        return "added", 201

    if case == "handler-500":

        @app.errorhandler(500)
        def internal_error(error: Exception) -> tuple[str, int]:
            return "database error", 500

    if case == "handler-exception":

        @app.errorhandler(Exception)
        def any_error(error: Exception) -> tuple[str, int]:
            return "database error", 500

    if case == "handler-fallback":

        @app.errorhandler(SQLAlchemyError)
        def database_fallback(error: SQLAlchemyError) -> str:
            return "fallback"

    return app


def fetch_answer(port: int, method: str, path: str) -> Answer:
    """One request over a new connection, with its headers and how long it took."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        headers = {key.lower(): value for key, value in response.getheaders()}
        return Answer(response.status, headers, body, time.monotonic() - started)
    finally:
        connection.close()


def exhaust_wsgi(
    app: WSGIApplication, db: Database[Any], gate: Gate, requests: Requests
) -> Outcome:
    """Serve ``app``; hold the only connection; send ``requests`` at once; release; write."""
    with werkzeug_server(app) as port, ThreadPoolExecutor(len(requests) + 1) as clients:
        held = clients.submit(fetch_answer, port, "GET", "/hold")
        try:
            assert gate.holding.wait(10)
            futures = [clients.submit(fetch_answer, port, m, p) for m, p in requests]
            burst = [future.result(POOL_TIMEOUT + MARGIN + 10) for future in futures]
            calls = list(gate.calls)
            # The server ends a unit just after the client has its answer.
            wait_until_blocking(lambda: db.live_units == 1 and db.live_sessions == 1)
            during = nothing_left(db)
        finally:
            gate.release.set()
        held_answer = held.result(10)
        after = fetch_answer(port, "POST", "/add/after")
        wait_until_blocking(idle(db))
    return Outcome(burst, held_answer, after, during, calls)


@pytest.mark.parametrize("backend", SYNC_ONLY, indirect=True)
@pytest.mark.parametrize("case", ["unhandled", "caught", "commit", "fallback"])
def test_wsgi_answers_503_when_the_pool_is_exhausted(
    make_db: DatabaseFactory, rows: Rows, logs: pytest.LogCaptureFixture, case: str
) -> None:
    """A busy pool tells WSGI clients to come back instead of failing them with a 500."""
    db, gate, requests = scenario(make_db, case)
    outcome = exhaust_wsgi(wsgi_app(db, gate), db, gate, requests)
    check(outcome, case, requests, logs, rows)


@pytest.mark.parametrize("backend", SYNC_ONLY, indirect=True)
@pytest.mark.parametrize(
    "case", ["unhandled", "handler-500", "handler-exception", "commit", *FALLBACKS]
)
def test_flask_answers_503_when_the_pool_is_exhausted(
    make_db: DatabaseFactory, rows: Rows, logs: pytest.LogCaptureFixture, case: str
) -> None:
    """Flask's 500 (its own or an error handler's) for a busy pool becomes a 503, unlogged."""
    db, gate, requests = scenario(make_db, case)
    outcome = exhaust_wsgi(flask_app(db, gate, case), db, gate, requests)
    check(outcome, case, requests, logs, rows)


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
@pytest.mark.parametrize("adapter", ["wsgi", "flask"])
def test_wsgi_retry_after_is_the_configured_value(
    make_db: DatabaseFactory, rows: Rows, logs: pytest.LogCaptureFixture, adapter: str
) -> None:
    """'retry_after' is what clients and load balancers are told to wait, so it must arrive."""
    db, gate, requests = scenario(make_db, "unhandled")
    if adapter == "wsgi":
        app = wsgi_app(db, gate, retry_after=7)
    else:
        app = flask_app(db, gate, "unhandled", retry_after=7)
    outcome = exhaust_wsgi(app, db, gate, requests)
    check(outcome, "unhandled", requests, logs, rows, retry_after=7)
