"""SQLite with real transactions, edges: what the explicit BEGIN must not break.

A reader's transaction must not hold off a writer's COMMIT (the engine puts a file in WAL
mode); a POST that cannot take the write lock fails at its first statement, where the app
can retry, and leaves its pooled connection clean; pools that share one connection among
units (``StaticPool``) keep the driver's own handling, so overlapping and nested units work;
an engine made with ``isolation_level="AUTOCOMMIT"`` gets no BEGIN. Files are observed from
outside with plain ``sqlite3`` connections.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import anyio
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.test import Client

from sessionscope import Database, SessionMiddleware
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Item
from ._units import Boom, Rows, run_unit
from ._uvicorn import serve, wait_until
from .conftest import Backend, DatabaseFactory, backend_params

pytestmark = pytest.mark.anyio

sqlite_both = pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
sqlite_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["sqlite"], modes=["sync"]), indirect=True
)

COUNT = sa.text("SELECT count(*) FROM items")
# Waits that only end early in a failed run.
LONG_WAIT = 10.0


def outsider(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection that runs exactly the statements it is given."""
    return sqlite3.connect(path, timeout=0, isolation_level=None)


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's writer: holds the write lock until the block ends (or it commits)."""
    connection = outsider(path)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()


# -- a reader does not hold off a writer -----------------------------------------------------------


@sqlite_both
async def test_a_slow_reader_does_not_make_a_writer_fail(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A GET still rendering must not make a POST's COMMIT fail: the file is in WAL mode."""
    # A short busy timeout stands for a page slower than the default.
    db: Database[Any] = make_db(engine_options={"connect_args": {"timeout": 0.3}})
    reading, written = threading.Event(), threading.Event()

    def page_sync(request: Request) -> Response:
        count = db.session.execute(COUNT).scalar_one()
        reading.set()
        written.wait(LONG_WAIT)  # rendering, with the read transaction open
        return PlainTextResponse(str(count))

    async def page_async(request: Request) -> Response:
        count = (await db.session.execute(COUNT)).scalar_one()
        reading.set()
        await anyio.to_thread.run_sync(written.wait, LONG_WAIT)
        return PlainTextResponse(str(count))

    def create_sync(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("created", status_code=201)

    async def create_async(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("created", status_code=201)

    routes = [
        Route("/page", page_async if db.is_async else page_sync),
        Route("/items/{name}", create_async if db.is_async else create_sync, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SessionMiddleware, db=db)
    answers: dict[str, httpx.Response] = {}
    async with (
        serve(app) as served,
        httpx.AsyncClient(base_url=served.url, timeout=30) as http,
    ):
        async with anyio.create_task_group() as tg:

            async def page() -> None:
                answers["GET"] = await http.get("/page")

            tg.start_soon(page)
            try:
                assert await anyio.to_thread.run_sync(reading.wait, LONG_WAIT)
                answers["POST"] = await http.post("/items/new")
            finally:
                written.set()
        await wait_until(lambda: db.live_units == 0)
    assert (answers["GET"].status_code, answers["GET"].text) == (200, "0")
    assert (answers["POST"].status_code, answers["POST"].text) == (201, "created")
    assert rows() == ["new"]


# -- a write lock that cannot be taken -------------------------------------------------------------


def locked_out_db(make_db: DatabaseFactory) -> Database[Session]:
    """One pooled connection, no busy timeout: every request reuses the connection of the
    one before it, and a taken write lock fails at once. Connected before the test locks
    the file, so that the engine's switch to WAL mode is done."""
    db: Database[Session] = make_db(
        engine_options={"connect_args": {"timeout": 0}, "pool_size": 1, "max_overflow": 0}
    )
    with db.begin() as session:
        session.execute(COUNT)
    return db


@sqlite_sync
def test_a_post_that_cannot_take_the_write_lock_can_retry_in_its_unit(
    make_db: DatabaseFactory, backend: Backend, rows: Rows
) -> None:
    """A POST meets a taken write lock at its first statement, where the app can retry."""
    db = locked_out_db(make_db)
    seen: list[str] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        name = environ["PATH_INFO"].strip("/")
        try:
            db.session.execute(COUNT)
        except OperationalError as exc:
            seen.append(str(exc.orig))
            writer.execute("COMMIT")  # the other writer is done
            db.session.rollback()
            db.session.execute(COUNT)
        db.session.add(Item(name=name))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"created"]

    client = Client(WSGISessionMiddleware(app, db))
    with write_lock_held(Path(backend.database)) as writer:
        assert client.post("/first").status_code == 201
        assert seen == ["database is locked"]
        assert not writer.in_transaction
    assert client.post("/second").status_code == 201
    assert seen == ["database is locked"]
    assert rows() == ["first", "second"]


@sqlite_sync
def test_a_post_that_cannot_take_the_write_lock_leaves_its_connection_clean(
    make_db: DatabaseFactory, backend: Backend, rows: Rows
) -> None:
    """A POST whose BEGIN IMMEDIATE failed raises at once and leaves its connection clean."""
    db = locked_out_db(make_db)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        db.session.execute(COUNT)
        db.session.add(Item(name=environ["PATH_INFO"].strip("/")))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"created"]

    client = Client(WSGISessionMiddleware(app, db))
    with write_lock_held(Path(backend.database)):
        with pytest.raises(OperationalError, match="database is locked"):
            client.post("/refused")
        assert (db.live_units, db.sync_engine.pool.checkedout()) == (0, 0)  # type: ignore[attr-defined]
    assert client.post("/next").status_code == 201
    assert rows() == ["next"]


# -- pools that share one connection among units ---------------------------------------------------


async def test_overlapping_requests_on_an_in_memory_aiosqlite_database() -> None:
    """Overlapping requests on in-memory aiosqlite (one shared connection) both succeed."""
    db: Database[Any] = Database("sqlite+aiosqlite://")
    first_read = anyio.Event()
    second_read = anyio.Event()

    async def read(request: Request) -> Response:
        await db.session.execute(sa.text("SELECT count(*) FROM t"))
        if request.query_params.get("first"):
            first_read.set()
            with anyio.move_on_after(LONG_WAIT):
                await second_read.wait()  # its unit stays open while the second one reads
        else:
            second_read.set()
        await db.session.execute(sa.text("SELECT 1"))
        return PlainTextResponse("read")

    app = Starlette(routes=[Route("/", read)])
    app.add_middleware(SessionMiddleware, db=db)
    transport = httpx.ASGITransport(app=app)
    statuses: dict[str, int] = {}
    try:
        async with db.begin() as session:
            await session.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
            anyio.create_task_group() as tg,
        ):

            async def get(name: str, path: str) -> None:
                statuses[name] = (await http.get(path)).status_code

            tg.start_soon(get, "first", "/?first=1")
            await first_read.wait()
            tg.start_soon(get, "second", "/")
        assert statuses == {"first": 200, "second": 200}
        assert (db.live_units, db.live_sessions) == (0, 0)
    finally:
        await db.dispose_async()


def test_a_nested_unit_on_a_static_pool() -> None:
    """The FastAPI testing recipe (a StaticPool) runs a 'db.begin()' nested in another unit."""
    db: Database[Session] = Database(
        "sqlite://",
        engine_options={"poolclass": StaticPool, "connect_args": {"check_same_thread": False}},
    )
    try:
        with db.begin() as session:
            session.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        with db.begin() as outer:
            assert outer.execute(sa.text("SELECT count(*) FROM t")).scalar_one() == 0
            with db.begin() as inner:
                inner.execute(sa.text("INSERT INTO t DEFAULT VALUES"))
            assert outer.execute(sa.text("SELECT count(*) FROM t")).scalar_one() == 1
        assert (db.live_units, db.live_sessions) == (0, 0)
    finally:
        db.dispose()


# -- an engine-wide AUTOCOMMIT ---------------------------------------------------------------------


@sqlite_both
async def test_an_engine_wide_autocommit_is_respected(make_db: DatabaseFactory, rows: Rows) -> None:
    """An engine made with AUTOCOMMIT gets no BEGIN: a failed unit keeps what it wrote."""
    db: Database[Any] = make_db(engine_options={"isolation_level": "AUTOCOMMIT"})

    def add_then_fail(session: Session) -> None:
        session.add(Item(name="kept"))
        session.flush()
        raise Boom("after the autocommitted INSERT")

    with pytest.raises(Boom):
        await run_unit(db, add_then_fail)
    assert rows() == ["kept"]
