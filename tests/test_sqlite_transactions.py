"""SQLite with real transactions: every unit begins with an explicit BEGIN.

pysqlite's legacy transaction control commits DDL at once, starts no transaction for a
plain SELECT and lets a SAVEPOINT outside a transaction commit on its RELEASE. Engines that
sessionscope creates from a URL turn it off; ``sqlite_begin`` chooses ``BEGIN`` or
``BEGIN IMMEDIATE`` ("auto": IMMEDIATE for requests whose method is not safe). The lock a
unit holds is observed from outside with plain ``sqlite3`` connections; after every test
one of them must be able to take the write lock at once, so no unit left the file locked.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.types import WSGIApplication

import anyio
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from werkzeug.test import Client
from werkzeug.wrappers import Request as WSGIRequest
from werkzeug.wrappers import Response as WSGIResponse

from sessionscope import Database, SessionMiddleware
from sessionscope._types import Message
from sessionscope.middleware.wsgi import WSGISessionMiddleware
from sessionscope.testing import Isolation, isolated

from ._models import Item
from ._servers import fetch, werkzeug_server
from ._units import Boom, Rows, add, run_unit
from ._uvicorn import serve
from ._uvicorn import wait_until as wait_until_async
from .conftest import Backend, DatabaseFactory, assert_no_leaks, backend_params

pytestmark = pytest.mark.anyio

sqlite_both = pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
sqlite_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["sqlite"], modes=["sync"]), indirect=True
)

SAFE_METHODS = ["GET", "HEAD", "OPTIONS", "TRACE"]
UNSAFE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]
ALL_METHODS = SAFE_METHODS + UNSAFE_METHODS
COUNT = sa.text("SELECT count(*) FROM items")
# How long request A waits for request B to read too: under BEGIN IMMEDIATE B cannot read
# before A ends, so the wait runs out; otherwise both reads overlap.
OVERLAP_WAIT = 0.5
# Waits that only end early in a failed run.
LONG_WAIT = 10.0


# -- looking at the file from outside ---------------------------------------------------------


def database_path(backend: Backend) -> Path:
    return Path(backend.database)


def outsider(path: Path, timeout: float = 0) -> sqlite3.Connection:
    """A plain sqlite3 connection that runs exactly the statements it is given."""
    return sqlite3.connect(path, timeout=timeout, isolation_level=None)


def write_lock_taken(path: Path) -> bool:
    """Whether another connection holds the write lock: BEGIN IMMEDIATE fails at once."""
    connection = outsider(path)
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "database is locked" not in str(exc):
            raise
        return True
    else:
        connection.execute("ROLLBACK")
        return False
    finally:
        connection.close()


def set_journal_mode(path: Path, mode: str) -> None:
    """Switch the file's journal mode (WAL stays set in the file for every connection)."""
    connection = outsider(path)
    try:
        assert connection.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
    finally:
        connection.close()


def has_table(checker: Engine, name: str) -> bool:
    return sa.inspect(checker).has_table(name)


@pytest.fixture(autouse=True)
def nothing_left_locked(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test (its databases disposed), the write lock is free at once."""
    if "backend" not in request.fixturenames:
        yield
        return
    backend: Backend = request.getfixturevalue("backend")
    yield
    assert not write_lock_taken(database_path(backend)), "a unit left the file locked"


@pytest.fixture(params=["delete", "wal"])
def journal(request: pytest.FixtureRequest, backend: Backend) -> str:
    """The file as the app finds it: in rollback-journal mode (SQLite's default) or in WAL
    mode. An engine sessionscope creates puts it in WAL mode either way."""
    mode = str(request.param)
    set_journal_mode(database_path(backend), mode)
    return mode


def journal_mode(path: Path) -> str:
    connection = outsider(path)
    try:
        return str(connection.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        connection.close()


# -- apps ---------------------------------------------------------------------------------------


@dataclass
class Cues:
    """What the requests of one test tell each other and the test."""

    a_read: threading.Event = field(default_factory=threading.Event)
    b_read: threading.Event = field(default_factory=threading.Event)
    b_inserted: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


def count_sync(db: Database[Any]) -> int:
    return int(db.session.execute(COUNT).scalar_one())


def names_sync(db: Database[Any]) -> list[str]:
    return list(db.session.scalars(sa.select(Item.name).order_by(Item.id)))


def insert_sync(db: Database[Any], name: str) -> None:
    db.session.add(Item(name=name))
    db.session.flush()


def race_sync(db: Database[Any], cues: Cues, who: str) -> str:
    """Read the count, let the other request read and write, then write: the upgrade race.

    A reads first; B reads once A has; A writes once B has written. Under plain BEGIN both
    reads overlap and A's write must fail; under BEGIN IMMEDIATE B cannot even read
    before A has committed, so A's wait for B runs out and both succeed one after the other.
    """
    if who == "b":
        cues.a_read.wait(LONG_WAIT)
    count = count_sync(db)
    if who == "a":
        cues.a_read.set()
        if cues.b_read.wait(OVERLAP_WAIT):
            cues.b_inserted.wait(LONG_WAIT)
    else:
        cues.b_read.set()
    insert_sync(db, who)
    if who == "b":
        cues.b_inserted.set()
    return str(count)


def probe_sync(db: Database[Any], cues: Cues) -> None:
    """Read, tell the test, and keep the unit open until the test has looked at the lock."""
    count_sync(db)
    cues.started.set()
    cues.release.wait(LONG_WAIT)


def ddl_sync(db: Database[Any]) -> None:
    db.session.execute(sa.text("CREATE TABLE extra (x INTEGER)"))


async def wait_for(event: threading.Event, seconds: float) -> bool:
    return await anyio.to_thread.run_sync(event.wait, seconds)


async def count_async(session: AsyncSession) -> int:
    return int((await session.execute(COUNT)).scalar_one())


async def insert_async(session: AsyncSession, name: str) -> None:
    session.add(Item(name=name))
    await session.flush()


def _async_routes(db: Database[Any], cues: Cues) -> list[Route]:
    async def race(request: Request) -> Response:
        who = request.path_params["who"]
        session: AsyncSession = db.session()
        if who == "b":
            await wait_for(cues.a_read, LONG_WAIT)
        count = await count_async(session)
        if who == "a":
            cues.a_read.set()
            if await wait_for(cues.b_read, OVERLAP_WAIT):
                await wait_for(cues.b_inserted, LONG_WAIT)
        else:
            cues.b_read.set()
        await insert_async(session, who)
        if who == "b":
            cues.b_inserted.set()
        return PlainTextResponse(str(count), status_code=201)

    async def probe(request: Request) -> Response:
        await count_async(db.session())
        cues.started.set()
        await wait_for(cues.release, LONG_WAIT)
        return PlainTextResponse("probed")

    async def ddl(request: Request) -> Response:
        await db.session.execute(sa.text("CREATE TABLE extra (x INTEGER)"))
        return PlainTextResponse("refused", status_code=400)

    async def count(request: Request) -> Response:
        return PlainTextResponse(str(await count_async(db.session())))

    async def create(request: Request) -> Response:
        await insert_async(db.session(), request.path_params["name"])
        return PlainTextResponse("created", status_code=201)

    async def listing(request: Request) -> Response:
        result = await db.session.scalars(sa.select(Item.name).order_by(Item.id))
        return JSONResponse(list(result))

    return _routes(race, probe, ddl, count, create, listing)


def _sync_routes(db: Database[Any], cues: Cues) -> list[Route]:
    def race(request: Request) -> Response:
        return PlainTextResponse(race_sync(db, cues, request.path_params["who"]), status_code=201)

    def probe(request: Request) -> Response:
        probe_sync(db, cues)
        return PlainTextResponse("probed")

    def ddl(request: Request) -> Response:
        ddl_sync(db)
        return PlainTextResponse("refused", status_code=400)

    def count(request: Request) -> Response:
        return PlainTextResponse(str(count_sync(db)))

    def create(request: Request) -> Response:
        insert_sync(db, request.path_params["name"])
        return PlainTextResponse("created", status_code=201)

    def listing(request: Request) -> Response:
        return JSONResponse(names_sync(db))

    return _routes(race, probe, ddl, count, create, listing)


def _routes(
    race: Callable[..., Any],
    probe: Callable[..., Any],
    ddl: Callable[..., Any],
    count: Callable[..., Any],
    create: Callable[..., Any],
    listing: Callable[..., Any],
) -> list[Route]:
    return [
        Route("/race/{who}", race, methods=["POST"]),
        Route("/probe", probe, methods=ALL_METHODS),
        Route("/ddl", ddl, methods=["POST"]),
        Route("/count", count, methods=["GET"]),
        Route("/items/{name}", create, methods=["POST"]),
        Route("/items", listing, methods=["GET"]),
    ]


def starlette_app(db: Database[Any], cues: Cues) -> Starlette:
    """The endpoints the tests use: ``def`` ones for a sync database, ``async def`` ones for
    an async database, with the same behaviour."""
    routes = _async_routes(db, cues) if db.is_async else _sync_routes(db, cues)
    app = Starlette(routes=routes)
    app.add_middleware(SessionMiddleware, db=db)
    return app


def wsgi_app(adapter: str, db: Database[Any], cues: Cues) -> WSGIApplication:
    """The same endpoints as ``starlette_app`` under ``WSGISessionMiddleware`` or Flask."""

    def answer(path: str) -> tuple[str, int]:
        if path.startswith("/race/"):
            return race_sync(db, cues, path.removeprefix("/race/")), 201
        if path == "/probe":
            probe_sync(db, cues)
            return "probed", 200
        if path == "/ddl":
            ddl_sync(db)
            return "refused", 400
        if path == "/count":
            return str(count_sync(db)), 200
        if path.startswith("/items/"):
            insert_sync(db, path.removeprefix("/items/"))
            return "created", 201
        raise AssertionError(path)

    if adapter == "wsgi":

        @WSGIRequest.application
        def app(request: WSGIRequest) -> WSGIResponse:
            body, status = answer(request.path)
            return WSGIResponse(body, status=status)

        return WSGISessionMiddleware(app, db)
    flask_app = Flask(__name__)

    def view(path: str) -> tuple[str, int]:
        return answer("/" + path)

    flask_app.add_url_rule(
        "/<path:path>", "view", view, methods=ALL_METHODS, provide_automatic_options=False
    )
    db.init_app(flask_app)
    return flask_app


@pytest.fixture(params=["wsgi", "flask"])
def adapter(request: pytest.FixtureRequest) -> str:
    """The plain WSGI middleware, or the Flask extension."""
    return str(request.param)


def http_client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


class _Isolated:
    """``with`` or ``async with isolated(db)`` by the driver, for tests that run on both."""

    def __init__(self, db: Database[Any]) -> None:
        self.inner = isolated(db)
        self.is_async = db.is_async

    async def __aenter__(self) -> Isolation:
        if self.is_async:
            return await self.inner.__aenter__()
        return self.inner.__enter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        if self.is_async:
            await self.inner.__aexit__(*exc_info)
        else:
            self.inner.__exit__(*exc_info)


def run_sync_unit(db: Database[Any], work: Callable[[Session], None]) -> None:
    """``run_unit`` for a sync test."""
    with db.begin() as session:
        assert isinstance(session, Session)
        work(session)


def create_extra_and_fail(session: Session) -> None:
    session.execute(sa.text("CREATE TABLE extra (x INTEGER)"))
    raise Boom("after the DDL")


def create_extra(session: Session) -> None:
    session.execute(sa.text("CREATE TABLE extra (x INTEGER)"))


# -- DDL is rolled back -------------------------------------------------------------------------


@sqlite_both
async def test_ddl_in_a_failed_unit_is_rolled_back(
    make_db: DatabaseFactory, checker: Engine
) -> None:
    """A migration step or a table made in a unit that fails must not stay half-applied."""
    db = make_db()
    with pytest.raises(Boom):
        await run_unit(db, create_extra_and_fail)
    assert not has_table(checker, "extra")
    await run_unit(db, create_extra)
    assert has_table(checker, "extra")


@sqlite_both
async def test_ddl_in_a_request_answered_400_is_rolled_back(
    make_db: DatabaseFactory, checker: Engine, rows: Rows
) -> None:
    """A request answered 400 stores nothing, DDL included, under SessionMiddleware."""
    db = make_db()
    async with http_client(starlette_app(db, Cues())) as http:
        assert (await http.post("/ddl")).status_code == 400
        assert (await http.post("/items/kept")).status_code == 201
    assert not has_table(checker, "extra")
    assert rows() == ["kept"]


@sqlite_sync
def test_ddl_in_a_wsgi_request_answered_400_is_rolled_back(
    adapter: str, make_db: DatabaseFactory, checker: Engine, rows: Rows
) -> None:
    """The same under WSGISessionMiddleware and Flask: a 400 leaves no table behind."""
    db = make_db()
    client = Client(wsgi_app(adapter, db, Cues()))
    with client.post("/ddl") as response:
        assert response.status_code == 400
    with client.post("/items/kept") as response:
        assert response.status_code == 201
    assert not has_table(checker, "extra")
    assert rows() == ["kept"]


# Not 'sqlite+aiosqlite://': its one connection sits in a StaticPool that overlapping units
# share, so it keeps the driver's own handling (README).
@pytest.mark.parametrize("url", ["sqlite://"])
async def test_ddl_is_rolled_back_in_a_memory_database(url: str) -> None:
    """An in-memory database gets real transactions too: a failed unit's table is gone."""
    db: Database[Any] = Database(url)

    def tables(session: Session) -> list[str]:
        query = sa.text("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return list(session.scalars(query))

    try:
        with pytest.raises(Boom):
            await run_unit(db, create_extra_and_fail)
        assert await run_unit(db, tables) == []
        await run_unit(db, create_extra)
        assert await run_unit(db, tables) == ["extra"]
        assert (db.live_units, db.live_sessions) == (0, 0)
        pool: Any = db.sync_engine.pool
        # An async memory database keeps its one connection in a StaticPool, which counts none.
        assert getattr(pool, "checkedout", lambda: 0)() == 0
    finally:
        if db.is_async:
            await db.dispose_async()
        else:
            db.dispose()


@sqlite_sync
def test_an_engine_passed_in_is_left_as_it_is(backend: Backend, checker: Engine) -> None:
    """sessionscope changes only engines it creates: the app's own engine keeps pysqlite's
    behaviour, which commits DDL at once."""
    engine = sa.create_engine(backend.url)
    db: Database[Any] = Database(engine=engine)
    try:
        with pytest.raises(Boom):
            run_sync_unit(db, create_extra_and_fail)
        assert has_table(checker, "extra")
        assert_no_leaks(db, backend)
    finally:
        engine.dispose()


# -- one snapshot per unit ----------------------------------------------------------------------


@sqlite_both
async def test_reads_in_one_unit_see_one_snapshot(
    make_db: DatabaseFactory, backend: Backend, journal: str, rows: Rows
) -> None:
    """Two reads of one unit agree, whatever another connection commits between them. The
    engine put the file in WAL mode, so the other commit happens (a reader never holds off
    a writer) and the unit does not see it."""
    db = make_db()
    path = database_path(backend)
    outside: list[str] = []

    def read_twice(session: Session) -> tuple[int, int]:
        first = int(session.execute(COUNT).scalar_one())
        connection = outsider(path)
        try:
            connection.execute("INSERT INTO items (name) VALUES ('outside')")
            outside.append("committed")
        except sqlite3.OperationalError as exc:
            outside.append(str(exc))
        finally:
            connection.close()
        return first, int(session.execute(COUNT).scalar_one())

    first, second = await run_unit(db, read_twice)
    assert first == second == 0
    assert outside == ["committed"]
    assert rows() == ["outside"]
    assert journal_mode(path) == "wal"


# -- savepoints ---------------------------------------------------------------------------------


@sqlite_both
async def test_rolled_back_savepoint_undoes_only_its_rows(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """begin_nested() as a unit's first statement: rolling the savepoint back drops its row
    only, and the unit's own row after it is stored."""
    db = make_db()

    def work(session: Session) -> None:
        nested = session.begin_nested()
        session.add(Item(name="inner"))
        session.flush()
        nested.rollback()
        session.add(Item(name="outer"))

    await run_unit(db, work)
    assert rows() == ["outer"]


@sqlite_both
async def test_released_savepoint_of_a_failed_unit_stores_nothing(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """Releasing a savepoint is not a commit: the unit's failure afterwards drops its rows
    (pysqlite's own handling committed them at the RELEASE)."""
    db = make_db()

    def work(session: Session) -> None:
        with session.begin_nested():
            session.add(Item(name="released"))
        raise Boom("after the release")

    with pytest.raises(Boom):
        await run_unit(db, work)
    assert rows() == []
    await run_unit(db, add("later"))
    assert rows() == ["later"]


# -- which BEGIN --------------------------------------------------------------------------------


@sqlite_both
@pytest.mark.parametrize(
    ("sqlite_begin", "locked"), [("auto", False), ("deferred", False), ("immediate", True)]
)
async def test_a_db_begin_unit_holds_the_write_lock_only_when_immediate(
    make_db: DatabaseFactory, backend: Backend, sqlite_begin: str, locked: bool
) -> None:
    """A read-only job takes the write lock (blocking every writer) only when asked to."""
    db = make_db(sqlite_begin=sqlite_begin)
    path = database_path(backend)

    def read_and_look(session: Session) -> bool:
        session.execute(COUNT)
        return write_lock_taken(path)

    assert await run_unit(db, read_and_look) is locked
    assert not write_lock_taken(path)


METHOD_CASES = [
    *[pytest.param("auto", m, m in UNSAFE_METHODS, id=f"auto-{m}") for m in ALL_METHODS],
    *[pytest.param(b, m, b == "immediate", id=f"{b}-{m}") for b in ("deferred", "immediate")
      for m in ("GET", "POST")],
]  # fmt: skip


@sqlite_both
@pytest.mark.parametrize(("sqlite_begin", "method", "locked"), METHOD_CASES)
async def test_a_request_holds_the_write_lock_by_its_method(
    make_db: DatabaseFactory, backend: Backend, sqlite_begin: str, method: str, locked: bool
) -> None:
    """Under SessionMiddleware: "auto" makes a request that may write take the write lock
    at its first statement and lets a safe one read alongside the writers."""
    db = make_db(sqlite_begin=sqlite_begin)
    cues = Cues()
    taken: list[bool] = []
    async with http_client(starlette_app(db, cues)) as http, anyio.create_task_group() as tg:
        responses: list[httpx.Response] = []

        async def send() -> None:
            responses.append(await http.request(method, "/probe"))

        tg.start_soon(send)
        try:
            assert await wait_for(cues.started, 5), "the request did not read"
            taken.append(write_lock_taken(database_path(backend)))
        finally:
            cues.release.set()
    assert [r.status_code for r in responses] == [200]
    assert taken == [locked]


@sqlite_sync
@pytest.mark.parametrize(("sqlite_begin", "method", "locked"), METHOD_CASES)
def test_a_wsgi_request_holds_the_write_lock_by_its_method(
    adapter: str,
    make_db: DatabaseFactory,
    backend: Backend,
    sqlite_begin: str,
    method: str,
    locked: bool,
) -> None:
    """The same under WSGISessionMiddleware and Flask."""
    db = make_db(sqlite_begin=sqlite_begin)
    cues = Cues()
    client = Client(wsgi_app(adapter, db, cues))

    def send() -> int:
        with client.open("/probe", method=method) as response:
            return response.status_code

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(send)
        try:
            assert cues.started.wait(5), "the request did not read"
            taken = write_lock_taken(database_path(backend))
        finally:
            cues.release.set()
        assert future.result(10) == 200
    assert taken is locked


@sqlite_both
@pytest.mark.parametrize(("sqlite_begin", "locked"), [("auto", False), ("immediate", True)])
async def test_work_after_a_post_response_does_not_take_the_write_lock(
    make_db: DatabaseFactory, backend: Backend, sqlite_begin: str, locked: bool
) -> None:
    """A background task after a POST is a unit of its own that may only read: under
    "auto" it must not block every writer while it runs."""
    db = make_db(sqlite_begin=sqlite_begin)
    path = database_path(backend)
    seen: list[bool] = []

    async def later_async() -> None:
        await count_async(db.session())
        seen.append(write_lock_taken(path))

    def later_sync() -> None:
        count_sync(db)
        seen.append(write_lock_taken(path))

    async def accept(request: Request) -> Response:
        task = BackgroundTask(later_async) if db.is_async else BackgroundTask(later_sync)
        return PlainTextResponse("accepted", status_code=202, background=task)

    app = Starlette(routes=[Route("/later", accept, methods=["POST"])])
    app.add_middleware(SessionMiddleware, db=db)
    async with http_client(app) as http:
        assert (await http.post("/later")).status_code == 202
    assert seen == [locked]


@sqlite_both
@pytest.mark.parametrize(("sqlite_begin", "locked"), [("auto", False), ("immediate", True)])
async def test_a_websocket_unit_does_not_take_the_write_lock(
    make_db: DatabaseFactory, backend: Backend, sqlite_begin: str, locked: bool
) -> None:
    """A websocket's unit lives as long as the socket: under "auto" it must not hold the
    write lock all that time."""
    db = make_db(sqlite_begin=sqlite_begin)
    path = database_path(backend)
    seen: list[bool] = []

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        if db.is_async:
            await count_async(db.session())
        else:
            count_sync(db)
        seen.append(write_lock_taken(path))
        await websocket.send_text("bye")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", socket)])
    app.add_middleware(SessionMiddleware, db=db)
    sent: list[Message] = []
    incoming: list[Message] = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
             "headers": [], "scheme": "ws", "root_path": "", "subprotocols": []}  # fmt: skip
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert seen == [locked]


@sqlite_sync
@pytest.mark.parametrize(("sqlite_begin", "locked"), [("auto", False), ("immediate", True)])
def test_a_flask_app_context_unit_does_not_take_the_write_lock(
    make_db: DatabaseFactory, backend: Backend, sqlite_begin: str, locked: bool
) -> None:
    """A CLI command or a job in an app context is not a request that may write: under
    "auto" its reads leave the write lock to the app's requests."""
    db = make_db(sqlite_begin=sqlite_begin)
    app = Flask(__name__)
    db.init_app(app)
    with app.app_context():
        count_sync(db)
        seen = write_lock_taken(database_path(backend))
    assert seen is locked


# -- the upgrade race, through real servers -----------------------------------------------------


def expected_race(sqlite_begin: str) -> dict[str, tuple[int, str]]:
    """What the two racing requests answer, and the rows stored."""
    if sqlite_begin == "auto":
        # A commits before B can begin: B reads A's row.
        return {"a": (201, "0"), "b": (201, "1")}
    # Both read 0; B writes and commits first; A's read transaction cannot become a write.
    return {"a": (500, ""), "b": (201, "0")}


@sqlite_both
@pytest.mark.parametrize("sqlite_begin", ["auto", "deferred"])
async def test_two_writers_that_read_first_both_succeed_under_uvicorn(
    make_db: DatabaseFactory, journal: str, rows: Rows, sqlite_begin: str
) -> None:
    """Two POSTs that read and then write at once: with "auto" both answer 201 and both rows
    are stored; with plain BEGIN the first one's write fails ("database is locked")."""
    db = make_db(sqlite_begin=sqlite_begin)
    cues = Cues()
    answers: dict[str, tuple[int, str]] = {}
    async with serve(starlette_app(db, cues)) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:

            async def post(who: str) -> None:
                response = await http.post(f"/race/{who}")
                body = response.text if response.status_code == 201 else ""
                answers[who] = (response.status_code, body)

            async with anyio.create_task_group() as tg:
                tg.start_soon(post, "a")
                tg.start_soon(post, "b")
        await wait_until_async(lambda: db.live_units == 0)
    assert answers == expected_race(sqlite_begin), served.log()
    if sqlite_begin == "auto":
        assert sorted(rows()) == ["a", "b"]
        assert served.errors() == [], served.log()
    else:
        assert rows() == ["b"]
        assert "database is locked" in served.log()


@sqlite_sync
@pytest.mark.parametrize("sqlite_begin", ["auto", "deferred"])
def test_two_writers_that_read_first_both_succeed_under_werkzeug(
    adapter: str, make_db: DatabaseFactory, journal: str, rows: Rows, sqlite_begin: str
) -> None:
    """The same race through Werkzeug's threaded server, on the WSGI middleware and Flask."""
    db = make_db(sqlite_begin=sqlite_begin)
    cues = Cues()
    app = wsgi_app(adapter, db, cues)
    answers: dict[str, tuple[int, str]] = {}
    with werkzeug_server(app) as port, ThreadPoolExecutor(2) as pool:
        futures = {who: pool.submit(fetch, port, "POST", f"/race/{who}") for who in "ab"}
        for who, future in futures.items():
            status, body = future.result(30)
            answers[who] = (status, body.decode() if status == 201 else "")
    assert answers == expected_race(sqlite_begin)
    expected_rows = ["a", "b"] if sqlite_begin == "auto" else ["b"]
    assert sorted(rows()) == expected_rows


# -- a held write lock: safe requests read, the others wait -------------------------------------


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another process's writer: holds the write lock until the block ends."""
    connection = outsider(path)
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        connection.execute("COMMIT")
        connection.close()


@sqlite_both
@pytest.mark.parametrize("sqlite_begin", ["auto", "immediate"])
async def test_a_get_reads_while_another_connection_writes_under_uvicorn(
    make_db: DatabaseFactory, backend: Backend, rows: Rows, sqlite_begin: str
) -> None:
    """While another connection holds the write lock, a GET answers at once under "auto"
    (it waits under "immediate"), and a POST waits for the lock, then answers 201."""
    # In WAL mode already: the engine's first connection could not switch it while
    # another connection holds the write lock.
    set_journal_mode(database_path(backend), "wal")
    db = make_db(sqlite_begin=sqlite_begin)
    async with serve(starlette_app(db, Cues())) as served:
        async with (
            httpx.AsyncClient(base_url=served.url, timeout=30) as http,
            anyio.create_task_group() as tg,
        ):
            answers: dict[str, httpx.Response] = {}

            async def send(method: str, path: str) -> None:
                answers[method] = await http.request(method, path)

            with write_lock_held(database_path(backend)):
                tg.start_soon(send, "POST", "/items/late")
                tg.start_soon(send, "GET", "/count")
                if sqlite_begin == "auto":
                    # Well under the 15 s busy timeout: it did not wait for the lock.
                    await wait_until_async(lambda: "GET" in answers, within=5)
                await anyio.sleep(0.5)
                assert "POST" not in answers, "a POST wrote while another connection did"
                if sqlite_begin == "immediate":
                    assert "GET" not in answers, "an immediate GET did not wait"
        await wait_until_async(lambda: db.live_units == 0)
    assert answers["GET"].status_code == 200
    assert answers["POST"].status_code == 201
    assert rows() == ["late"]


@sqlite_sync
@pytest.mark.parametrize("sqlite_begin", ["auto", "immediate"])
def test_a_get_reads_while_another_connection_writes_under_werkzeug(
    adapter: str, make_db: DatabaseFactory, backend: Backend, rows: Rows, sqlite_begin: str
) -> None:
    """The same through Werkzeug's threaded server, on the WSGI middleware and Flask."""
    # In WAL mode already: the engine's first connection could not switch it while
    # another connection holds the write lock.
    set_journal_mode(database_path(backend), "wal")
    db = make_db(sqlite_begin=sqlite_begin)
    app = wsgi_app(adapter, db, Cues())
    futures: dict[str, Future[tuple[int, bytes]]] = {}
    with werkzeug_server(app) as port, ThreadPoolExecutor(2) as pool:
        with write_lock_held(database_path(backend)):
            futures["POST"] = pool.submit(fetch, port, "POST", "/items/late")
            futures["GET"] = pool.submit(fetch, port, "GET", "/count")
            if sqlite_begin == "auto":
                # Well under the 15 s busy timeout: it did not wait for the lock.
                assert futures["GET"].result(5) == (200, b"0")
            time.sleep(0.5)
            assert not futures["POST"].done(), "a POST wrote while another connection did"
            if sqlite_begin == "immediate":
                assert not futures["GET"].done(), "an immediate GET did not wait"
        assert futures["GET"].result(30)[0] == 200
        assert futures["POST"].result(30)[0] == 201
    assert rows() == ["late"]


# -- isolated() on an engine with real transactions ---------------------------------------------


@sqlite_both
async def test_isolated_still_works(make_db: DatabaseFactory, checker: Engine, rows: Rows) -> None:
    """The testing helper: a request's writes reach the next request, nothing stays after
    the block, and real transactions (DDL rolled back, commits stored) resume after it."""
    db = make_db()
    app = starlette_app(db, Cues())
    async with _Isolated(db), http_client(app) as http:
        assert (await http.post("/items/a")).status_code == 201
        assert (await http.get("/items")).json() == ["a"]
        assert (await http.post("/ddl")).status_code == 400
        assert (await http.post("/items/b")).status_code == 201
        assert (await http.get("/items")).json() == ["a", "b"]
        assert rows() == [], "another connection saw a row of the isolated block"
    assert rows() == []
    assert not has_table(checker, "extra")
    with pytest.raises(Boom):
        await run_unit(db, create_extra_and_fail)
    assert not has_table(checker, "extra")
    await run_unit(db, add("after"))
    assert rows() == ["after"]


@sqlite_sync
def test_isolated_still_works_under_wsgi(
    adapter: str, make_db: DatabaseFactory, checker: Engine, rows: Rows
) -> None:
    """The same with ``with isolated(db):`` around WSGI and Flask requests."""
    db = make_db()
    client = Client(wsgi_app(adapter, db, Cues()))

    def call(method: str, path: str) -> tuple[int, str]:
        with client.open(path, method=method) as response:
            return response.status_code, response.get_data(as_text=True)

    with isolated(db):
        assert call("POST", "/items/a")[0] == 201
        assert call("GET", "/count") == (200, "1")
        assert call("POST", "/ddl")[0] == 400
        assert rows() == []
    assert rows() == []
    assert not has_table(checker, "extra")
    with pytest.raises(Boom):
        run_sync_unit(db, create_extra_and_fail)
    assert not has_table(checker, "extra")


# -- argument errors ----------------------------------------------------------------------------


def message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


@sqlite_both
@pytest.mark.parametrize("value", ["exclusive", "IMMEDIATE", ""])
def test_an_unknown_sqlite_begin_is_refused(backend: Backend, value: object) -> None:
    """A typo must not silently pick a mode: the error lists the three values."""
    options: dict[str, Any] = {"sqlite_begin": value}
    with pytest.raises(ValueError, match="sqlite_begin") as excinfo:
        Database(backend.url, **options)
    for name in ("auto", "deferred", "immediate"):
        assert repr(name) in message(excinfo) or name in message(excinfo)


@pytest.mark.parametrize("value", ["deferred", "immediate"])
@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://app@127.0.0.1/app", "mysql+pymysql://app@127.0.0.1/app"]
)
def test_sqlite_begin_on_another_database_is_refused(url: str, value: str) -> None:
    """The option means nothing elsewhere: saying so beats ignoring it."""
    options: dict[str, Any] = {"sqlite_begin": value}
    with pytest.raises(ValueError, match="SQLite") as excinfo:
        Database(url, **options)
    assert "sqlite_begin" in message(excinfo)


def build_engine(**options: Any) -> None:
    """Make a Database and its engine (which connects to nothing yet)."""
    db: Database[Any] = Database(**options)
    db.sync_engine.dispose()


def test_sqlite_begin_with_another_database_from_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The URL may come from DATABASE_URL: the option is refused there too, not ignored."""
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app@127.0.0.1/app")
    with pytest.raises(ValueError, match="SQLite"):
        build_engine(sqlite_begin="immediate")


def test_sqlite_begin_with_another_database_from_flask_config_is_refused() -> None:
    """The URL may come from the Flask app's config: the option is refused there too."""
    options: dict[str, Any] = {"sqlite_begin": "immediate"}
    db: Database[Any] = Database(**options)
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://app@127.0.0.1/app"
    with pytest.raises(ValueError, match="SQLite"):
        db.init_app(app)


def test_auto_on_another_database_is_accepted() -> None:
    """ "auto" is the default, so naming it is harmless whatever the database."""
    options: dict[str, Any] = {"sqlite_begin": "auto"}
    db: Database[Any] = Database("postgresql+psycopg://app@127.0.0.1/app", **options)
    assert db.url.startswith("postgresql+psycopg://")
    db.dispose()


@sqlite_sync
@pytest.mark.parametrize("value", ["deferred", "immediate"])
@pytest.mark.parametrize("given", ["engine", "session_factory"])
def test_sqlite_begin_with_an_engine_of_ones_own_is_refused(
    backend: Backend, given: str, value: str
) -> None:
    """An engine passed in is left as it is, so an option that would change it is refused
    rather than ignored."""
    engine = sa.create_engine(backend.url)
    try:
        source: Any = engine if given == "engine" else sessionmaker(engine)
        options: dict[str, Any] = {given: source, "sqlite_begin": value}
        with pytest.raises(TypeError, match="sqlite_begin") as excinfo:
            Database(**options)
        assert "URL" in message(excinfo) or "url" in message(excinfo)
        accepted: Database[Any] = Database(**{given: source, "sqlite_begin": "auto"})
        assert not accepted.is_async
    finally:
        engine.dispose()


def _readme_block(heading: str) -> str:
    """The first Python block of docs/configuration.md's section ``heading``."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    section = readme.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_sqlite_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs' "SQLite: real transactions" example runs as written, twice: the job counts."""
    monkeypatch.chdir(tmp_path)
    code = _readme_block("## SQLite: real transactions")
    for earlier_runs in range(2):
        namespace: dict[str, Any] = {}
        exec(compile(code, "docs/configuration.md", "exec"), namespace)
        db: Database[Session] = namespace["db"]
        assert namespace["runs"] == earlier_runs
        assert_no_leaks(db)
        db.dispose()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as connection:
        assert connection.execute("SELECT n FROM runs ORDER BY n").fetchall() == [(1,), (2,)]
    connection.close()


@sqlite_sync
def test_a_post_that_only_read_ends_off_the_event_loop(
    make_db: DatabaseFactory, backend: Backend
) -> None:
    """A POST begins with BEGIN IMMEDIATE, and outside WAL mode the COMMIT of such a
    transaction waits for readers even if it wrote nothing: it never runs on the loop."""
    db: Database[Session] = make_db()
    loop_thread: list[int] = []
    commits: list[int] = []
    sa.event.listen(
        db.sync_engine, "commit", lambda connection: commits.append(threading.get_ident())
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        loop_thread.append(threading.get_ident())
        db.session.execute(COUNT)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=SessionMiddleware(app, db=db)))

    async def post() -> int:
        async with client:
            return (await client.post("http://test/")).status_code

    assert anyio.run(post) == 200
    assert len(commits) == 1
    assert commits != loop_thread
