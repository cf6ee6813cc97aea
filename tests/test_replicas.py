"""Read replicas end to end: a real PostgreSQL primary with a streaming replica.

Every statement is counted where it ran: listeners on the primary's engine and on replica
engines the test made, and ``pg_is_in_recovery()`` in the answer of each read (true only on
the replica), so that URL replicas, whose engines sessionscope makes, are checked too.
Requests go through real servers: uvicorn for Starlette and FastAPI, Werkzeug's threaded
server for Flask's ``db.init_app`` and the plain ``WSGISessionMiddleware``.
"""

from __future__ import annotations

import gc
import http.client
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast
from wsgiref.types import StartResponse, WSGIEnvironment

import anyio
import anyio.to_thread
import httpx
import psycopg
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from flask import Flask
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware, WSGISessionMiddleware
from sessionscope._types import ASGIApp
from sessionscope.adapters.starlette import session_dependency

from ._models import Base, Item
from ._replica import ReplicaPair, replica_pair, require_replica
from ._servers import werkzeug_server
from ._uvicorn import Served, serve, wait_until

COOKIE = "sessionscope_primary=1; Max-Age=15; Path=/; HttpOnly; SameSite=Lax"
WARNING = "cannot be reached"
# One statement that says where it ran and what it saw.
READ = sa.text(
    "SELECT pg_is_in_recovery(), coalesce(string_agg(name, ',' ORDER BY id), '') FROM items"
)
APP = "sessionscope-replicas"

_names = (f"n{number}" for number in itertools.count())


def fresh_name() -> str:
    return next(_names)


# -- the servers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicaPair]:
    """One primary and replica for the module, with the ``items`` table on both."""
    require_replica()
    with replica_pair() as started:
        engine = sa.create_engine(started.primary_url, poolclass=sa.NullPool)
        Base.metadata.create_all(engine, tables=[Base.metadata.tables["items"]])
        engine.dispose()
        started.wait_replayed()
        yield started


def _sql(port: int, statement: str, *args: object) -> Any:
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="test", autocommit=True
    ) as connection:
        row = connection.execute(statement, args or None).fetchone()
        return None if row is None else row[0]


def busy_backends(pair: ReplicaPair) -> int:
    """Backends of this module's engines, on either server, inside a transaction or a query."""
    total = 0
    for port in (pair.primary_port, pair.replica_port):
        total += int(
            _sql(
                port,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s"
                " AND state <> 'idle'",
                APP + "%",
            )
        )
    return total


def stored(pair: ReplicaPair, name: str) -> int:
    return int(_sql(pair.primary_port, "SELECT count(*) FROM items WHERE name = %s", name))


@pytest.fixture(autouse=True)
def _replica_up(pair: ReplicaPair) -> Iterator[None]:
    """Each test starts with the replica running and caught up; gc is off during the test,
    so that a leaked connection cannot hide behind it."""
    pair.start_replica()
    pair.wait_replayed()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        while _MADE:
            end_sync(_MADE.pop())
        if was_enabled:
            gc.enable()
        pair.start_replica()
        if _sql(pair.replica_port, "SELECT pg_is_wal_replay_paused()"):
            _sql(pair.replica_port, "SELECT pg_wal_replay_resume()")


def connect_args(url: str, name: str) -> dict[str, Any]:
    if "+asyncpg" in url:
        return {"server_settings": {"application_name": name}}
    return {"application_name": name}


def sync_replica(pair: ReplicaPair) -> sa.Engine:
    return sa.create_engine(
        pair.replica_url, connect_args=connect_args(pair.replica_url, APP + "-given")
    )


def async_replica(pair: ReplicaPair) -> AsyncEngine:
    return create_async_engine(
        pair.replica_async_url, connect_args=connect_args(pair.replica_async_url, APP + "-given")
    )


def make_db(
    pair: ReplicaPair, is_async: bool, replicas: Sequence[Any], **options: Any
) -> Database[Any]:
    url = pair.primary_async_url if is_async else pair.primary_url
    return Database(
        url,
        replicas=replicas,
        engine_options={"connect_args": connect_args(url, APP)},
        **options,
    )


# -- counting where each statement ran ----------------------------------------------------


class Hits:
    """The statements of the app (on ``items``, or ``pg_is_in_recovery``) by server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, str]] = []

    def watch(self, engine: sa.Engine | AsyncEngine, label: str) -> None:
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

        def before(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            if "items" in statement or "pg_is_in_recovery" in statement:
                with self._lock:
                    self._seen.append((label, statement.split()[0].upper()))

        sa.event.listen(sync_engine, "before_cursor_execute", before)

    def take(self) -> list[tuple[str, str]]:
        with self._lock:
            seen, self._seen = self._seen, []
        return seen


def where(row: Any) -> str:
    """``READ``'s answer: the server that ran it and the names it saw."""
    return f"{'replica' if row[0] else 'primary'}:{row[1]}"


def assert_clean(pair: ReplicaPair, db: Database[Any], *replicas: sa.Engine | AsyncEngine) -> None:
    assert db.live_units == 0, f"{db.live_units} unit(s) still open"
    assert db.live_sessions == 0, f"{db.live_sessions} session(s) left"
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    for engine in replicas:
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        assert sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert busy_backends(pair) == 0


# -- the apps -----------------------------------------------------------------------------


@dataclass
class Gate:
    """Holds GET /gated after its session is made (its replica picked), before its read."""

    opened: threading.Event
    entered: threading.Semaphore

    @classmethod
    def new(cls) -> Gate:
        return cls(threading.Event(), threading.Semaphore(0))


def starlette_app(
    db: Database[Any], dispose: Sequence[AsyncEngine] = (), gate: Gate | None = None
) -> ASGIApp:
    """GET /read, POST /items/{name}, GET /read-write/{name} (read, write, read), and
    GET /gated (``gate``)."""
    routes: list[Route]
    the_gate = gate or Gate.new()
    if db.is_async:
        adb = cast(Database[AsyncSession], db)

        async def read(request: Request) -> Response:
            return PlainTextResponse(where((await adb.session.execute(READ)).one()))

        async def create(request: Request) -> Response:
            adb.session.add(Item(name=request.path_params["name"]))
            return PlainTextResponse("ok")

        async def read_write(request: Request) -> Response:
            first = where((await adb.session.execute(READ)).one())
            adb.session.add(Item(name=request.path_params["name"]))
            await adb.session.flush()
            second = where((await adb.session.execute(READ)).one())
            return PlainTextResponse(f"{first};{second}")

        async def gated(request: Request) -> Response:
            session = adb.session()
            the_gate.entered.release()
            assert await anyio.to_thread.run_sync(the_gate.opened.wait, 30)
            return PlainTextResponse(where((await session.execute(READ)).one()))

        routes = [
            Route("/read", read),
            Route("/items/{name}", create, methods=["POST"]),
            Route("/read-write/{name}", read_write),
            Route("/gated", gated),
        ]
    else:
        sdb = cast(Database[Session], db)

        def sync_read(request: Request) -> Response:
            return PlainTextResponse(where(sdb.session.execute(READ).one()))

        def sync_create(request: Request) -> Response:
            sdb.session.add(Item(name=request.path_params["name"]))
            return PlainTextResponse("ok")

        def sync_read_write(request: Request) -> Response:
            first = where(sdb.session.execute(READ).one())
            sdb.session.add(Item(name=request.path_params["name"]))
            sdb.session.flush()
            second = where(sdb.session.execute(READ).one())
            return PlainTextResponse(f"{first};{second}")

        def sync_gated(request: Request) -> Response:
            session = sdb.session()
            the_gate.entered.release()
            assert the_gate.opened.wait(30)
            return PlainTextResponse(where(session.execute(READ).one()))

        routes = [
            Route("/read", sync_read),
            Route("/items/{name}", sync_create, methods=["POST"]),
            Route("/read-write/{name}", sync_read_write),
            Route("/gated", sync_gated),
        ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # Engines of the test's own, disposed on the server's loop that connected them.
        for engine in dispose:
            await engine.dispose()

    return SessionMiddleware(Starlette(routes=routes, lifespan=lifespan), db)


def client(served: Served) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=served.url, timeout=60)


def cookies_set(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


VARIANTS = ["sync-engine", "sync-url", "async-engine", "async-url"]


_MADE: list[Setup] = []


@dataclass
class Setup:
    db: Database[Any]
    hits: Hits
    given: list[sa.Engine | AsyncEngine]
    dispose_on_server: list[AsyncEngine]

    def replica_hits(self) -> bool:
        """Whether the replica's statements are counted (only for engines the test made)."""
        return bool(self.given)


def setup(pair: ReplicaPair, variant: str, **options: Any) -> Setup:
    is_async = variant.startswith("async")
    hits = Hits()
    given: list[sa.Engine | AsyncEngine] = []
    if variant.endswith("engine"):
        given.append(async_replica(pair) if is_async else sync_replica(pair))
    replicas: list[Any] = [*given] or [pair.replica_async_url if is_async else pair.replica_url]
    db = make_db(pair, is_async, replicas, **options)
    hits.watch(db.sync_engine, "primary")
    for engine in given:
        hits.watch(engine, "replica")
    dispose = [engine for engine in given if isinstance(engine, AsyncEngine)]
    made = Setup(db, hits, given, dispose)
    _MADE.append(made)
    return made


def end_sync(setup: Setup) -> None:
    """Dispose what the server's loop does not (a sync database's engines)."""
    if not setup.db.is_async:
        setup.db.dispose()
        for engine in setup.given:
            assert isinstance(engine, sa.Engine)
            engine.dispose()


def idle(db: Database[Any], *replicas: sa.Engine | AsyncEngine) -> Callable[[], bool]:
    """Every unit ended, every connection of the primary and of ``replicas`` back."""

    def check() -> bool:
        engines = [db.sync_engine] + [
            engine.sync_engine if isinstance(engine, AsyncEngine) else engine for engine in replicas
        ]
        checked_out = sum(engine.pool.checkedout() for engine in engines)  # type: ignore[attr-defined]
        return db.live_units == 0 and db.live_sessions == 0 and checked_out == 0

    return check


def pause_replay(pair: ReplicaPair) -> None:
    _sql(pair.replica_port, "SELECT pg_wal_replay_pause()")
    deadline = time.monotonic() + 10
    while _sql(pair.replica_port, "SELECT pg_get_wal_replay_pause_state()") != "paused":
        assert time.monotonic() < deadline, "the replica did not pause its replay"
        time.sleep(0.01)


def resume_replay(pair: ReplicaPair) -> None:
    _sql(pair.replica_port, "SELECT pg_wal_replay_resume()")


# -- 1. GET on the replica, POST on the primary, the cookie -------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("variant", VARIANTS)
async def test_get_reads_replica_post_writes_primary_and_cookie_reads_primary(
    pair: ReplicaPair, variant: str
) -> None:
    """The POST's client reads its own write from the primary while the replica, its replay
    paused, has not got it; a client without the cookie reads the lagging replica."""
    s = setup(pair, variant)
    name = fresh_name()
    async with serve(starlette_app(s.db, s.dispose_on_server)) as served:
        async with client(served) as writer, client(served) as other:
            first = await writer.get("/read")
            assert first.status_code == 200
            assert first.text.startswith("replica:")
            assert name not in first.text
            assert cookies_set(first) == []
            if s.replica_hits():
                assert s.hits.take() == [("replica", "SELECT")]

            await anyio.to_thread.run_sync(pause_replay, pair)
            try:
                posted = await writer.post(f"/items/{name}")
                assert posted.status_code == 200
                assert cookies_set(posted) == [COOKIE]
                assert s.hits.take() == [("primary", "INSERT")]
                assert stored(pair, name) == 1

                # The same client sends the cookie back: it reads the primary, and its row.
                again = await writer.get("/read")
                assert "sessionscope_primary=1" in again.request.headers["cookie"]
                assert again.text.startswith("primary:")
                assert name in again.text.split(":")[1].split(",")
                assert cookies_set(again) == []
                assert s.hits.take() == [("primary", "SELECT")]

                # Another client reads the replica, which has not replayed the row yet.
                lagging = await other.get("/read")
                assert lagging.text.startswith("replica:")
                assert name not in lagging.text
                if s.replica_hits():
                    assert s.hits.take() == [("replica", "SELECT")]
            finally:
                await anyio.to_thread.run_sync(resume_replay, pair)
            await anyio.to_thread.run_sync(pair.wait_replayed)
            caught_up = await other.get("/read")
            assert caught_up.text.startswith("replica:")
            assert name in caught_up.text
            if s.replica_hits():
                assert s.hits.take() == [("replica", "SELECT")]
        await wait_until(idle(s.db, *s.given))
    assert served.errors() == []
    assert_clean(pair, s.db, *s.given)


@pytest.mark.anyio
@pytest.mark.parametrize("variant", ["sync-url", "async-url"])
async def test_read_your_writes_zero_sets_no_cookie(pair: ReplicaPair, variant: str) -> None:
    s = setup(pair, variant, read_your_writes=0)
    assert s.db.read_your_writes == 0
    async with serve(starlette_app(s.db, s.dispose_on_server)) as served:
        async with client(served) as http:
            posted = await http.post(f"/items/{fresh_name()}")
            assert posted.status_code == 200
            assert cookies_set(posted) == []
            moved = await http.get(f"/read-write/{fresh_name()}")
            assert moved.status_code == 200
            assert cookies_set(moved) == []
            # With no cookie, the client's next GET still reads a replica.
            assert (await http.get("/read")).text.startswith("replica:")
        await wait_until(idle(s.db, *s.given))
    assert_clean(pair, s.db, *s.given)


# -- 2. read, write, read in one GET -------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("variant", VARIANTS)
async def test_get_that_writes_moves_to_primary_for_good(pair: ReplicaPair, variant: str) -> None:
    s = setup(pair, variant)
    name = fresh_name()
    async with serve(starlette_app(s.db, s.dispose_on_server)) as served:
        async with client(served) as http:
            response = await http.get(f"/read-write/{name}")
            assert response.status_code == 200
            first, second = response.text.split(";")
            assert first.startswith("replica:")
            assert name not in first
            assert second.startswith("primary:")
            assert name in second.split(":")[1].split(",")
            assert cookies_set(response) == [COOKIE]
            if s.replica_hits():
                assert s.hits.take() == [
                    ("replica", "SELECT"),
                    ("primary", "INSERT"),
                    ("primary", "SELECT"),
                ]
        await wait_until(idle(s.db, *s.given))
    assert stored(pair, name) == 1
    assert served.errors() == []
    assert_clean(pair, s.db, *s.given)


@pytest.mark.anyio
async def test_fastapi_dependency_routes_too(pair: ReplicaPair) -> None:
    """A FastAPI endpoint's session (``session_dependency``) is the routed one."""
    s = setup(pair, "sync-engine")
    sdb = cast(Database[Session], s.db)
    api = FastAPI()

    @api.get("/read")
    def read(session: Session = Depends(session_dependency(sdb))) -> str:  # noqa: B008
        return where(session.execute(READ).one())

    @api.get("/write/{name}")
    def write(name: str, session: Session = Depends(session_dependency(sdb))) -> str:  # noqa: B008
        first = where(session.execute(READ).one())
        session.add(Item(name=name))
        session.flush()
        return first + ";" + where(session.execute(READ).one())

    name = fresh_name()
    async with serve(SessionMiddleware(api, sdb)) as served:
        async with client(served) as http:
            assert (await http.get("/read")).json().startswith("replica:")
            response = await http.get(f"/write/{name}")
            first, second = response.json().split(";")
            assert first.startswith("replica:")
            assert second.startswith("primary:")
            assert cookies_set(response) == [COOKIE]
        await wait_until(idle(sdb, *s.given))
    assert s.hits.take() == [
        ("replica", "SELECT"),
        ("replica", "SELECT"),
        ("primary", "INSERT"),
        ("primary", "SELECT"),
    ]
    assert stored(pair, name) == 1
    assert_clean(pair, s.db, *s.given)


# -- WSGI: Flask's init_app and the plain middleware -------------------------------------


def flask_app(db: Database[Session]) -> Flask:
    app = Flask(__name__)
    db.init_app(app)

    @app.get("/read")
    def read() -> str:
        return where(db.session.execute(READ).one())

    @app.post("/items/<name>")
    def create(name: str) -> str:
        db.session.add(Item(name=name))
        return "ok"

    @app.get("/read-write/<name>")
    def read_write(name: str) -> str:
        first = where(db.session.execute(READ).one())
        db.session.add(Item(name=name))
        db.session.flush()
        return first + ";" + where(db.session.execute(READ).one())

    return app


def wsgi_app(db: Database[Session]) -> WSGISessionMiddleware:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        session = db.session
        if path == "/read":
            body = where(session.execute(READ).one())
        elif path.startswith("/items/") and method == "POST":
            session.add(Item(name=path.rsplit("/", 1)[1]))
            body = "ok"
        else:
            first = where(session.execute(READ).one())
            session.add(Item(name=path.rsplit("/", 1)[1]))
            session.flush()
            body = first + ";" + where(session.execute(READ).one())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body.encode()]

    return WSGISessionMiddleware(app, db)


def call(
    port: int, method: str, path: str, cookie: str | None = None
) -> tuple[int, str, list[str]]:
    """One request: the status, the body and the ``Set-Cookie`` headers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, headers={"Cookie": cookie} if cookie else {})
        response = connection.getresponse()
        body = response.read().decode()
        return response.status, body, response.headers.get_all("Set-Cookie") or []
    finally:
        connection.close()


@pytest.mark.parametrize("adapter", ["flask", "wsgi"])
@pytest.mark.parametrize("given", [True, False], ids=["engine", "url"])
def test_wsgi_routes_and_sets_the_cookie(pair: ReplicaPair, adapter: str, given: bool) -> None:
    s = setup(pair, "sync-engine" if given else "sync-url")
    db = cast(Database[Session], s.db)
    app = flask_app(db) if adapter == "flask" else wsgi_app(db)
    posted_name, moved_name = fresh_name(), fresh_name()
    with werkzeug_server(app) as port:
        status, body, cookies = call(port, "GET", "/read")
        assert (status, cookies) == (200, [])
        assert body.startswith("replica:")
        if given:
            assert s.hits.take() == [("replica", "SELECT")]

        status, body, cookies = call(port, "POST", f"/items/{posted_name}")
        assert (status, body, cookies) == (200, "ok", [COOKIE])
        assert s.hits.take() == [("primary", "INSERT")]

        # The client sends back the cookie it got: its GET reads the primary.
        status, body, cookies = call(port, "GET", "/read", cookie="sessionscope_primary=1")
        assert (status, cookies) == (200, [])
        assert body.startswith("primary:")
        assert posted_name in body
        assert s.hits.take() == [("primary", "SELECT")]

        status, body, cookies = call(port, "GET", f"/read-write/{moved_name}")
        assert (status, cookies) == (200, [COOKIE])
        first, second = body.split(";")
        assert first.startswith("replica:")
        assert second.startswith("primary:")
        assert moved_name in second
        if given:
            assert s.hits.take() == [
                ("replica", "SELECT"),
                ("primary", "INSERT"),
                ("primary", "SELECT"),
            ]
        wait_then = time.monotonic() + 10
        while not idle(db, *s.given)():
            assert time.monotonic() < wait_then
            time.sleep(0.01)
    assert stored(pair, posted_name) == stored(pair, moved_name) == 1
    assert_clean(pair, s.db, *s.given)


# -- 3. the ORM's statements, outside requests --------------------------------------------


def _add_and_flush(session: Session) -> None:
    session.add(Item(name=fresh_name()))
    session.flush()


STEPS: dict[str, tuple[Callable[[Session, Database[Session]], object], bool, str]] = {
    # name: (what the unit runs, whether it moves to the primary, its statement's verb)
    "select": (lambda s, db: s.scalars(sa.select(Item.name)).all(), False, "SELECT"),
    "get": (lambda s, db: s.get(Item, -1), False, "SELECT"),
    "text-select": (lambda s, db: s.execute(sa.text("SELECT name FROM items")), False, "SELECT"),
    "text-columns": (
        lambda s, db: s.execute(sa.text("SELECT name FROM items").columns(sa.column("name"))),
        False,
        "SELECT",
    ),
    "for-update": (
        lambda s, db: s.scalars(sa.select(Item.name).with_for_update()).all(),
        True,
        "SELECT",
    ),
    "text-for-update": (
        lambda s, db: s.execute(sa.text("SELECT name FROM items FOR UPDATE")),
        True,
        "SELECT",
    ),
    "text-insert": (
        lambda s, db: s.execute(sa.text(f"INSERT INTO items (name) VALUES ('{fresh_name()}')")),
        True,
        "INSERT",
    ),
    "text-cte-insert": (
        lambda s, db: s.execute(
            sa.text(
                f"WITH x AS (INSERT INTO items (name) VALUES ('{fresh_name()}') RETURNING id)"
                " SELECT id FROM x"
            )
        ),
        True,
        "WITH",
    ),
    "core-update": (
        lambda s, db: s.execute(sa.update(Item).where(Item.id == -1).values(name="x")),
        True,
        "UPDATE",
    ),
    "core-delete": (lambda s, db: s.execute(sa.delete(Item).where(Item.id == -1)), True, "DELETE"),
    "flush": (lambda s, db: _add_and_flush(s), True, "INSERT"),
    "connection": (lambda s, db: s.connection(), True, ""),
    "get-bind": (lambda s, db: s.get_bind(), True, ""),
    "use-primary": (lambda s, db: db.use_primary(), True, ""),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_use_replica_in_begin_moves_at_the_first_statement_that_may_write(
    pair: ReplicaPair, step: str
) -> None:
    replica = sync_replica(pair)
    db = cast(Database[Session], make_db(pair, False, [replica]))
    hits = Hits()
    hits.watch(db.sync_engine, "primary")
    hits.watch(replica, "replica")
    run, moves, verb = STEPS[step]
    try:
        with db.begin() as session:
            db.use_replica()
            assert where(session.execute(READ).one()).startswith("replica:")
            run(session, db)
            after = where(session.execute(READ).one())
            assert after.startswith("primary:" if moves else "replica:")
        expected = [("replica", "SELECT")]
        if verb:
            expected.append(("primary" if moves else "replica", verb))
        expected.append(("primary" if moves else "replica", "SELECT"))
        assert hits.take() == expected
        assert_clean(pair, db, replica)
    finally:
        db.dispose()
        replica.dispose()


def test_begin_is_on_the_primary_and_use_primary_first_stays_there(pair: ReplicaPair) -> None:
    replica = sync_replica(pair)
    db = cast(Database[Session], make_db(pair, False, [replica]))
    hits = Hits()
    hits.watch(db.sync_engine, "primary")
    hits.watch(replica, "replica")
    try:
        with db.begin() as session:
            assert where(session.execute(READ).one()).startswith("primary:")
        with db.begin() as session:
            db.use_replica()
            db.use_primary()
            assert where(session.execute(READ).one()).startswith("primary:")
        # A block nested in a unit on a replica is a unit of its own, on the primary.
        with db.begin() as outer:
            db.use_replica()
            assert where(outer.execute(READ).one()).startswith("replica:")
            with db.begin() as inner:
                assert where(inner.execute(READ).one()).startswith("primary:")
            assert where(outer.execute(READ).one()).startswith("replica:")
        assert [label for label, _ in hits.take()] == [
            "primary",
            "primary",
            "replica",
            "primary",
            "replica",
        ]
        assert_clean(pair, db, replica)
    finally:
        db.dispose()
        replica.dispose()


def test_round_robin_among_replicas(pair: ReplicaPair) -> None:
    first, second = sync_replica(pair), sync_replica(pair)
    db = cast(Database[Session], make_db(pair, False, [first, second]))
    hits = Hits()
    hits.watch(first, "first")
    hits.watch(second, "second")
    try:
        for _ in range(4):
            with db.begin() as session:
                db.use_replica()
                session.execute(READ)
        assert [label for label, _ in hits.take()] == ["first", "second", "first", "second"]
        assert_clean(pair, db, first, second)
    finally:
        db.dispose()
        first.dispose()
        second.dispose()


@pytest.mark.anyio
async def test_async_use_replica_moves_on_write(pair: ReplicaPair) -> None:
    replica = async_replica(pair)
    db = cast(Database[AsyncSession], make_db(pair, True, [replica]))
    hits = Hits()
    hits.watch(db.sync_engine, "primary")
    hits.watch(replica, "replica")
    name = fresh_name()
    try:
        async with db.begin() as session:
            assert where((await session.execute(READ)).one()).startswith("primary:")
        async with db.begin() as session:
            db.use_replica()
            assert where((await session.execute(READ)).one()).startswith("replica:")
            await session.execute(sa.select(Item.name).with_for_update())
            assert where((await session.execute(READ)).one()).startswith("primary:")
        async with db.begin() as session:
            db.use_replica()
            await session.execute(sa.text("SELECT name FROM items"))
            session.add(Item(name=name))
            await session.flush()
            assert name in where((await session.execute(READ)).one())
        assert hits.take() == [
            ("primary", "SELECT"),
            ("replica", "SELECT"),
            ("primary", "SELECT"),
            ("primary", "SELECT"),
            ("replica", "SELECT"),
            ("primary", "INSERT"),
            ("primary", "SELECT"),
        ]
        assert stored(pair, name) == 1
        assert_clean(pair, db, replica)
    finally:
        await db.dispose_async()
        await replica.dispose()


# -- the API's errors, and dispose ---------------------------------------------------------


def test_invalid_arguments(pair: ReplicaPair) -> None:
    with pytest.raises(TypeError, match="list of URLs"):
        Database(pair.primary_url, replicas=pair.replica_url)
    with pytest.raises(TypeError, match="primary named"):
        Database(replicas=[pair.replica_url])
    with pytest.raises(ValueError, match="0 or more"):
        Database(pair.primary_url, replicas=[pair.replica_url], read_your_writes=-1)
    with pytest.raises(TypeError, match="an async driver"):
        Database(pair.primary_async_url, replicas=[pair.replica_url])
    with pytest.raises(TypeError, match="a synchronous driver"):
        Database(pair.primary_url, replicas=[pair.replica_async_url])


def test_use_replica_refused_without_replicas_or_after_the_first_statement(
    pair: ReplicaPair,
) -> None:
    plain = Database(pair.primary_url)
    db = cast(Database[Session], make_db(pair, False, [pair.replica_url]))
    try:
        with plain.begin(), pytest.raises(RuntimeError, match="no read replicas"):
            plain.use_replica()
        with db.begin() as session:
            session.execute(READ)
            with pytest.raises(RuntimeError, match="after the unit's first statement"):
                db.use_replica()
            assert where(session.execute(READ).one()).startswith("primary:")
        assert_clean(pair, db)
    finally:
        plain.dispose()
        db.dispose()


def _connections(pair: ReplicaPair, application: str) -> int:
    return int(
        _sql(
            pair.replica_port,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            application,
        )
    )


def test_dispose_closes_created_replicas_not_given_ones(pair: ReplicaPair) -> None:
    given = sync_replica(pair)
    db = cast(Database[Session], make_db(pair, False, [pair.replica_url, given]))
    try:
        for _ in range(2):  # one unit on each replica, in turn
            with db.begin() as session:
                db.use_replica()
                assert where(session.execute(READ).one()).startswith("replica:")
        assert _connections(pair, APP) == 1
        assert _connections(pair, APP + "-given") == 1
        db.dispose()
        assert _connections(pair, APP) == 0
        assert _connections(pair, APP + "-given") == 1
    finally:
        db.dispose()
        given.dispose()
    assert _connections(pair, APP + "-given") == 0


@pytest.mark.anyio
async def test_dispose_async_closes_created_replicas_not_given_ones(pair: ReplicaPair) -> None:
    given = async_replica(pair)
    db = cast(Database[AsyncSession], make_db(pair, True, [pair.replica_async_url, given]))
    try:
        for _ in range(2):
            async with db.begin() as session:
                db.use_replica()
                assert where((await session.execute(READ)).one()).startswith("replica:")
        assert _connections(pair, APP) == 1
        assert _connections(pair, APP + "-given") == 1
        await db.dispose_async()
        assert _connections(pair, APP) == 0
        assert _connections(pair, APP + "-given") == 1
    finally:
        await db.dispose_async()
        await given.dispose()
    assert _connections(pair, APP + "-given") == 0


# -- 4. a replica that dies ---------------------------------------------------------------


async def _load(
    http: httpx.AsyncClient, until: Callable[[], bool], answers: list[tuple[int, str]]
) -> None:
    while not until():
        response = await http.get("/read")
        answers.append((response.status_code, response.text))


async def _gated(http: httpx.AsyncClient, answers: list[tuple[int, str]]) -> None:
    response = await http.get("/gated")
    answers.append((response.status_code, response.text))


async def _killed_replica_costs_no_request(
    pair: ReplicaPair, variant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """GETs whose unit picked the replica before it died, and GETs after, all answer 200
    from the primary; the WARNING is logged once; 5 s later the replica reads again."""
    s = setup(pair, variant)
    gate = Gate.new()
    caplog.set_level(logging.WARNING, logger="sessionscope")
    async with serve(starlette_app(s.db, s.dispose_on_server, gate)) as served:
        async with client(served) as http:
            # The pool keeps connections to the replica: the kill leaves them broken.
            async with anyio.create_task_group() as group:
                warm: list[tuple[int, str]] = []
                for _ in range(4):
                    group.start_soon(_load, http, lambda: len(warm) >= 8, warm)
            assert all(text.startswith("replica:") for _, text in warm)
            await wait_until(idle(s.db, *s.given))

            during: list[tuple[int, str]] = []
            after: list[tuple[int, str]] = []
            async with anyio.create_task_group() as group:
                for _ in range(6):
                    group.start_soon(_gated, http, during)
                for _ in range(6):
                    assert await anyio.to_thread.run_sync(gate.entered.acquire, True, 10)
                await anyio.to_thread.run_sync(pair.stop_replica, "immediate")
                down_at = time.monotonic()
                gate.opened.set()
            async with anyio.create_task_group() as group:
                done = time.monotonic() + 0.5
                for _ in range(8):
                    group.start_soon(_load, http, lambda: time.monotonic() > done, after)
            assert len(during) == 6
            assert after
            assert [answer for answer in during + after if answer[0] != 200] == []
            assert all(text.startswith("primary:") for _, text in during + after)
            warnings = [r for r in caplog.records if WARNING in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert warnings[0].levelno == logging.WARNING

            await anyio.to_thread.run_sync(pair.start_replica)
            await anyio.to_thread.run_sync(pair.wait_replayed)
            if time.monotonic() - down_at < 4.5:
                # Back, but still left out: its reads keep going to the primary.
                assert (await http.get("/read")).text.startswith("primary:")
            await anyio.sleep(max(0.0, down_at + 5.2 - time.monotonic()))
            back = [await http.get("/read") for _ in range(3)]
            assert all(r.status_code == 200 for r in back)
            assert all(r.text.startswith("replica:") for r in back)
        await wait_until(idle(s.db, *s.given))
    assert len([r for r in caplog.records if WARNING in r.getMessage()]) == 1
    assert_clean(pair, s.db, *s.given)


@pytest.mark.anyio
async def test_killed_replica_costs_no_request_sync(
    pair: ReplicaPair, caplog: pytest.LogCaptureFixture
) -> None:
    await _killed_replica_costs_no_request(pair, "sync-url", caplog)


@pytest.mark.anyio
async def test_killed_replica_costs_no_request_async(
    pair: ReplicaPair, caplog: pytest.LogCaptureFixture
) -> None:
    await _killed_replica_costs_no_request(pair, "async-url", caplog)


# -- 6. faults: the replica gone before a moved unit commits; forks ------------------------


def test_a_replica_gone_before_a_moved_unit_commits_leaves_its_write_stored(
    pair: ReplicaPair, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 19: the unit read on the replica, then wrote on the primary; the replica dies
    before the unit ends. Its read transaction's COMMIT fails, after or before the
    primary's: the write is stored and the block ends without an error."""
    replica = sync_replica(pair)
    db = cast(Database[Session], make_db(pair, False, [replica]))
    name = fresh_name()
    caplog.set_level(logging.WARNING, logger="sessionscope")
    try:
        with db.begin() as session:
            db.use_replica()
            assert where(session.execute(READ).one()).startswith("replica:")
            pair.stop_replica("immediate")
            session.add(Item(name=name))
            session.flush()
            assert where(session.execute(READ).one()).startswith("primary:")
        assert stored(pair, name) == 1
        warnings = [r.getMessage() for r in caplog.records if r.name == "sessionscope"]
        assert any(m.startswith("Ending a read transaction on the replica") for m in warnings)
        pair.start_replica()  # for the check of both servers' backends
        assert_clean(pair, db, replica)
    finally:
        db.dispose()
        replica.dispose()


def test_the_primary_engine_is_refused_as_a_replica(pair: ReplicaPair) -> None:
    """A replica's failed read COMMIT is only logged: the primary's own engine, given as a
    replica, would hide a failed write."""
    engine = sa.create_engine(pair.primary_url)
    try:
        with pytest.raises(ValueError, match="is the primary's own engine"):
            Database(engine=engine, replicas=[engine]).session  # noqa: B018
    finally:
        engine.dispose()


def test_a_forked_child_reads_on_replica_connections_of_its_own(pair: ReplicaPair) -> None:
    """Rule 21 for replica engines: a child forked after the parent read from the replica
    never uses the parent's pooled replica connection, and the parent's still works."""
    db = cast(Database[Session], make_db(pair, False, [pair.replica_url]))
    backend_pid = sa.text("SELECT pg_backend_pid(), pg_is_in_recovery()")

    def replica_backend() -> int:
        with db.begin() as session:
            db.use_replica()
            pid, on_replica = session.execute(backend_pid).one()
            assert on_replica
            return int(pid)

    try:
        parent = replica_backend()
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child's coverage is never saved
            try:
                os.close(read_end)
                try:
                    report = str(replica_backend())
                except BaseException as exc:
                    report = repr(exc)
                os.write(write_end, report.encode())
            finally:
                os._exit(0)  # never back into pytest
        os.close(write_end)
        try:
            _, status = os.waitpid(child, 0)
        finally:
            with os.fdopen(read_end, "rb") as pipe:
                report = pipe.read().decode()
        assert status == 0
        assert report.isdigit(), report
        assert int(report) != parent
        assert replica_backend() == parent  # its pooled connection is untouched
        assert db.live_units == 0
        assert db.live_sessions == 0
        assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        db.dispose()
