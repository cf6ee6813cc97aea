"""SessionMiddleware end to end: a real uvicorn server on a loopback port, a real HTTP client.

The raw-ASGI tests in ``test_asgi.py`` control every message; these check that the same
promises hold when uvicorn owns the sockets: clients that go away, hundreds of concurrent
requests on a small pool, other middleware around ours. ``make_db`` checks afterwards that
no connection, unit or session was left behind (and, on PostgreSQL, no backend idle in a
transaction); the server's lifespan shutdown disposes async engines on the server's loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware
from sessionscope.adapters.starlette import session_dependency

from .._models import Child, Item
from .._uvicorn import PROTOCOL_ERRORS, Served, serve, wait_until
from ..conftest import Backend, DatabaseFactory, backend_params
from ._asgi_apps import build_app, insert, resolve

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]


def client(served: Served, connections: int = 10) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60)


def idle(db: Database[Any]) -> Callable[[], bool]:
    """Whether every unit has ended and the pool has every connection back."""

    def check() -> bool:
        checked_out: int = db.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        return db.live_units == 0 and db.live_sessions == 0 and checked_out == 0

    return check


def child_count(checker: sa.Engine) -> int:
    with checker.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).select_from(Child)) or 0)


def no_protocol_errors(served: Served) -> bool:
    log = served.log()
    return not any(text in log for text in PROTOCOL_ERRORS)


# -- the basic outcomes ------------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 303])
async def test_success_is_stored_before_the_client_reads_it(
    make_db: DatabaseFactory, rows: Rows, status: int
) -> None:
    """A 2xx or a 303 after a POST: the row is readable the moment the client has the answer."""
    db = make_db()
    async with serve(build_app(db)) as served:
        async with client(served) as http:
            response = await http.post(f"/items/a?status={status}", follow_redirects=False)
            # Read-your-writes: no waiting for the server to finish after the response.
            assert rows() == ["a"]
        assert response.status_code == status
    assert served.errors() == []


async def test_http_exception_rolls_back(make_db: DatabaseFactory, rows: Rows) -> None:
    """An HTTPException becomes a 4xx response inside the app; its writes must not stay."""
    db = make_db()
    async with serve(build_app(db)) as served, client(served) as http:
        assert (await http.post("/http-error/a?status=409")).status_code == 409
        assert (await http.post("/items/b")).status_code == 200
    assert rows() == ["b"]
    assert served.errors() == []


async def test_unhandled_error_answers_500_and_rolls_back(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An endpoint that crashes after writing gets a 500, loses its writes, leaks nothing."""
    db = make_db()
    async with serve(build_app(db)) as served:
        async with client(served) as http:
            assert (await http.post("/crash/a")).status_code == 500
        await wait_until(idle(db))
    assert rows() == []
    assert "endpoint failed after writing" in served.log()
    assert no_protocol_errors(served), served.log()


async def test_failed_commit_answers_500_with_a_clean_protocol(
    make_db: DatabaseFactory, checker: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A COMMIT the database refuses reaches the client as a 500 that uvicorn sends cleanly."""
    db = make_db()
    with caplog.at_level(logging.ERROR, logger="sessionscope"):
        async with serve(build_app(db)) as served, client(served) as http:
            response = await http.post("/orphan")
            assert (await http.post("/items/after")).status_code == 200
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert child_count(checker) == 0
    assert served.errors() == [], served.log()
    assert no_protocol_errors(served)
    commit_errors = [r for r in caplog.records if r.name == "sessionscope"]
    assert [r.getMessage() for r in commit_errors] == [
        f"Commit failed for POST /orphan on {db.url}; the unit of work was rolled back."
    ]


# -- clients that go away ----------------------------------------------------------------


async def send_request(port: int, target: str) -> anyio.abc.SocketStream:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    request = f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    await stream.send(request.encode())
    return stream


async def read_until(stream: anyio.abc.SocketStream, marker: bytes) -> None:
    received = b""
    with anyio.fail_after(10):
        while marker not in received:
            received += await stream.receive()


def build_disconnect_app(db: Database[Any], entered: list[str]) -> Starlette:
    async def wait_for_client(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)
        entered.append(name)
        with anyio.fail_after(10):
            while (await request.receive())["type"] != "http.disconnect":
                pass
        # Nobody reads the answer, but the session still works until the request ends.
        await resolve(db.session.execute(sa.select(Item.id)))
        return PlainTextResponse("nobody is listening")

    async def endless(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)

        async def body() -> Any:
            yield b"first;"
            await insert(db, name + "-streamed")
            yield b"second;"
            for _ in range(500):
                await anyio.sleep(0.02)
                yield b"."

        return StreamingResponse(body())

    app = build_app(db)
    app.router.routes[:0] = [
        Route("/wait-for-client/{name}", wait_for_client, methods=["POST"]),
        Route("/endless/{name}", endless, methods=["POST"]),
    ]
    return app


REPEAT = 50


async def test_client_gone_mid_request_costs_no_connection(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A client that hangs up while its request holds the only connection gives it back."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    entered: list[str] = []
    async with serve(build_disconnect_app(db, entered)) as served:
        for i in range(REPEAT):
            stream = await send_request(served.port, f"/wait-for-client/gone-{i}")
            await wait_until(lambda i=i: f"gone-{i}" in entered)  # type: ignore[misc]
            await stream.aclose()
            await wait_until(idle(db))
        async with client(served) as http:
            with anyio.fail_after(2):
                assert (await http.post("/items/after")).status_code == 200
        await wait_until(idle(db))
        assert no_protocol_errors(served), served.log()
    assert rows()[-1] == "after"


async def test_client_gone_mid_stream_costs_no_connection(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A client that hangs up mid-stream, with the stream's write open, gives it back."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    async with serve(build_disconnect_app(db, [])) as served:
        for i in range(REPEAT):
            stream = await send_request(served.port, f"/endless/s{i}")
            await read_until(stream, b"second;")
            await stream.aclose()
            await wait_until(idle(db))
        async with client(served) as http:
            with anyio.fail_after(2):
                assert (await http.post("/items/after")).status_code == 200
        await wait_until(idle(db))
        assert no_protocol_errors(served), served.log()
    # Written before the first chunk left: committed. Written during the stream: rolled back.
    assert rows() == [*(f"s{i}" for i in range(REPEAT)), "after"]


# -- deadlock shapes (SPEC rule 13) ------------------------------------------------------


def build_sync_app(db: Database[Any], **options: Any) -> Starlette:
    def add_only_sync(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("added", status_code=201)

    def flush_then_add_sync(request: Request) -> Response:
        # Holds a connection from the flush, and still has a change to flush at the end.
        name = request.path_params["name"]
        db.session.add(Item(name=name))
        db.session.flush()
        db.session.add(Item(name=name + "-more"))
        return PlainTextResponse("created", status_code=201)

    app = build_app(db, **options)
    app.router.routes[:0] = [
        Route("/sync/add-only/{name}", add_only_sync, methods=["POST"]),
        Route("/sync/flush-then-add/{name}", flush_then_add_sync, methods=["POST"]),
    ]
    return app


async def hammer(served: Served, paths: list[str], seconds: float) -> dict[str, int]:
    """POST every path at once; fail if they do not all finish within ``seconds``."""
    statuses: dict[str, int] = {}
    async with client(served, connections=len(paths)) as http:

        async def one(path: str) -> None:
            statuses[path] = (await http.post(path)).status_code

        with anyio.fail_after(seconds):
            async with anyio.create_task_group() as tg:
                for path in paths:
                    tg.start_soon(one, path)
    return statuses


def stored_names(statuses: dict[str, int]) -> list[str]:
    """The rows the 2xx answers promise: a flush-then-add request stores two."""
    names: list[str] = []
    for path, status in statuses.items():
        if status < 300:
            name = path.rsplit("/", 1)[1]
            names += [name, name + "-more"] if "/flush-then-add/" in path else [name]
    return sorted(names)


SYNC_DEADLOCK_BACKENDS = backend_params(["sqlite", "postgresql", "mariadb"], modes=["sync"])


@pytest.mark.parametrize("backend", SYNC_DEADLOCK_BACKENDS, indirect=True)
@pytest.mark.parametrize("commit_in_thread", [False, True])
async def test_sync_endpoints_on_a_tiny_pool_do_not_deadlock(
    make_db: DatabaseFactory, rows: Rows, commit_in_thread: bool
) -> None:
    """200 flushing def endpoints on 2 connections: commits never queue behind endpoints."""
    db = make_db(engine_options={"pool_size": 2, "max_overflow": 0, "pool_timeout": 30})
    async with serve(build_sync_app(db, commit_in_thread=commit_in_thread)) as served:
        paths = [f"/sync/items/t{i}" for i in range(200)]
        statuses = await hammer(served, paths, seconds=25)
        await wait_until(idle(db))
    assert set(statuses.values()) == {201}
    assert sorted(rows()) == stored_names(statuses)


@pytest.mark.parametrize("backend", SYNC_DEADLOCK_BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", ["flush", "add-only", "mixed"])
async def test_many_sync_requests_on_the_default_pool_do_not_deadlock(
    make_db: DatabaseFactory, rows: Rows, shape: str, backend: Backend
) -> None:
    """256 def endpoints on 5+10 connections, holding one or checking out inside the commit.

    On SQLite the writers queue for the file's one write lock, one after another: on a
    loaded 2-core machine the last of 256 can wait longer than the fixture's 15 s busy
    timeout, which is not what this test is about.
    """
    sqlite = backend.name == "sqlite"
    db = make_db(engine_options={"connect_args": {"timeout": 60}} if sqlite else {})
    flush, add_only = "/sync/flush-then-add/", "/sync/add-only/"
    prefixes = {"flush": [flush], "add-only": [add_only], "mixed": [flush, add_only]}[shape]
    paths = [f"{prefixes[i % len(prefixes)]}d{i}" for i in range(256)]
    async with serve(build_sync_app(db)) as served:
        statuses = await hammer(served, paths, seconds=30)
        await wait_until(idle(db))
    assert set(statuses.values()) == {201}
    assert sorted(rows()) == stored_names(statuses)


# -- other middleware around ours ---------------------------------------------------------


STACKS = ["alone", "inside-base-http", "outside-base-http", "gzip-outer", "gzip-inner", "cors"]


def build_stack_app(db: Database[Any], stack: str, seen: dict[str, list[object]]) -> FastAPI:
    """Writes in a sync dependency (the first to touch the session) and a sync endpoint."""
    app = FastAPI()

    def first_touch(request: Request) -> object:
        marker = request.path_params["marker"]
        session = db.session()
        session.info["request"] = marker
        session.add(Item(name=f"{marker}-dependency"))
        if not db.is_async:
            session.flush()
        seen[marker] = [session]
        return session

    first_dependency = Depends(first_touch)
    session_dep = Depends(session_dependency(db))

    @app.post("/write/{marker}", status_code=201)
    def write(
        marker: str, first: Any = first_dependency, injected: Any = session_dep
    ) -> dict[str, str]:
        seen[marker] += [injected, db.session()]
        db.session.add(Item(name=f"{marker}-endpoint"))
        # Big enough for GZipMiddleware to compress.
        return {"marker": marker, "padding": "x" * 1000}

    @app.post("/orphan")
    def orphan() -> str:
        db.session.add(Child(parent_id=999_999))
        return "this answer must never reach the client"

    async def tag(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Any:
        response = await call_next(request)
        response.headers["x-base-http"] = "yes"
        return response

    # The middleware added last is the outermost.
    if stack == "outside-base-http":
        app.middleware("http")(tag)
    if stack == "gzip-inner":
        app.add_middleware(GZipMiddleware)
    app.add_middleware(SessionMiddleware, db=db)
    if stack == "inside-base-http":
        app.middleware("http")(tag)
    if stack == "gzip-outer":
        app.add_middleware(GZipMiddleware)
    if stack == "cors":
        app.add_middleware(CORSMiddleware, allow_origins=["*"])
    return app


@pytest.fixture
def committed() -> Iterator[list[tuple[str, Session]]]:
    """The sessions committed meanwhile, with the request marker each carried."""
    sessions: list[tuple[str, Session]] = []

    def after_commit(session: Session) -> None:
        sessions.append((str(session.info.get("request")), session))

    event.listen(Session, "after_commit", after_commit)
    try:
        yield sessions
    finally:
        event.remove(Session, "after_commit", after_commit)


@pytest.mark.parametrize("stack", STACKS)
async def test_middleware_stacks_keep_one_session_per_request(
    make_db: DatabaseFactory,
    rows: Rows,
    checker: sa.Engine,
    committed: list[tuple[str, Session]],
    stack: str,
) -> None:
    """Around or inside other middleware: one session per request, sync writes committed."""
    db = make_db()
    seen: dict[str, list[object]] = {}
    markers = [f"r{i}" for i in range(6)]
    async with serve(build_stack_app(db, stack, seen)) as served:
        async with client(served) as http:
            responses = [await http.post(f"/write/{m}") for m in markers[:2]]
            async with anyio.create_task_group() as tg:

                async def one(marker: str) -> None:
                    responses.append(await http.post(f"/write/{marker}"))

                for marker in markers[2:]:
                    tg.start_soon(one, marker)
            failed = await http.post("/orphan", headers={"origin": "https://example.com"})
        await wait_until(idle(db))
    assert [r.status_code for r in responses] == [201] * len(markers)
    assert sorted(r.json()["marker"] for r in responses) == markers
    if "base-http" in stack:
        assert all(r.headers["x-base-http"] == "yes" for r in responses)
    if "gzip" in stack:
        assert all(r.headers["content-encoding"] == "gzip" for r in responses)
    for marker in markers:
        first, injected, current = seen[marker]
        assert first is injected is current, marker
    by_marker = dict(committed)
    assert sorted(marker for marker, _ in committed) == markers  # each exactly once
    for marker in markers:
        first = seen[marker][0]
        assert by_marker[marker] is getattr(first, "sync_session", first)
    assert sorted(rows()) == sorted(f"{m}-{w}" for m in markers for w in ("dependency", "endpoint"))
    assert failed.status_code == 500
    assert child_count(checker) == 0
    if stack == "cors":
        assert failed.headers["access-control-allow-origin"] == "*"
    assert served.errors() == [], served.log()


# -- work after the response --------------------------------------------------------------


@pytest.mark.parametrize("task_kind", ["async", "sync"])
async def test_background_task_starts_with_the_connection_back(
    make_db: DatabaseFactory, rows: Rows, task_kind: str
) -> None:
    """On one connection, a parked background task leaves it to the next request."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    parked = threading.Event()
    release = threading.Event()
    observed: dict[str, object] = {}

    def look(request_session: object) -> None:
        observed["checked_out"] = db.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        observed["fresh"] = db.session() is not request_session
        parked.set()

    async def endpoint(request: Request) -> Response:
        await insert(db, "request")
        request_session = db.session()

        async def later_async() -> None:
            look(request_session)
            assert await anyio.to_thread.run_sync(release.wait, 10)
            await insert(db, "later")

        def later_sync() -> None:
            look(request_session)
            assert release.wait(10)
            session: Any = db.session()
            session.add(Item(name="later"))
            if not db.is_async:
                session.flush()

        task = BackgroundTask(later_async) if task_kind == "async" else BackgroundTask(later_sync)
        return PlainTextResponse("accepted", background=task)

    app = build_app(db)
    app.router.routes.insert(0, Route("/parked", endpoint, methods=["POST"]))
    async with serve(app) as served:
        async with client(served) as http:
            assert (await http.post("/parked")).text == "accepted"
            await wait_until(parked.is_set)
            with anyio.fail_after(3):
                assert (await http.post("/items/meanwhile")).status_code == 200
            release.set()
        await wait_until(idle(db))
    assert observed == {"checked_out": 0, "fresh": True}
    assert rows() == ["request", "meanwhile", "later"]
    assert served.errors() == [], served.log()
