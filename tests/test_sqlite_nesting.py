"""SQLite: a unit of work nested in one that holds the file's write lock.

Under ``sqlite_begin="auto"`` a request whose method is not a safe one begins its
transaction with ``BEGIN IMMEDIATE``, so it holds the write lock from its first statement
(under ``"immediate"`` every unit does). A ``db.begin()`` block or a ``db.run()`` nested in
it is a unit of its own with its own connection, which SQLite would make wait for that lock
until the busy timeout, while the lock is released only once the outer unit ends. Such a
nested unit must fail at once with an error that names the way out; where no write lock is
held (a safe request, ``"deferred"``, an outer unit that has not run a statement yet) it
works. The busy timeout is a few seconds here, so that waiting it out shows.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.test import Client

from sessionscope import Database, SessionMiddleware
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Item
from ._units import Rows, run_unit
from .conftest import Backend, DatabaseFactory, backend_params

pytestmark = pytest.mark.anyio

sqlite_both = pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
sqlite_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["sqlite"], modes=["sync"]), indirect=True
)

# SQLite's busy timeout for the tests' databases: how long a nested unit would wait.
BUSY_TIMEOUT = 3.0
# A refusal "at once" comes well before the busy timeout, even on a loaded machine.
AT_ONCE = BUSY_TIMEOUT / 3
COUNT = sa.text("SELECT count(*) FROM items")
NESTED = ["begin", "run"]


def make_sqlite_db(make_db: DatabaseFactory, sqlite_begin: str) -> Database[Any]:
    return make_db(
        sqlite_begin=sqlite_begin, engine_options={"connect_args": {"timeout": BUSY_TIMEOUT}}
    )


@pytest.fixture(autouse=True)
def nothing_left_locked(backend: Backend) -> Iterable[None]:
    """After the test (its databases disposed), another connection takes the write lock at
    once: no unit left the file locked."""
    yield
    connection = sqlite3.connect(backend.database, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
    finally:
        connection.close()


# -- a nested unit that writes, and what it met ------------------------------------------------


@dataclass
class Refusals:
    """The errors the nested units raised, and how long each took to come."""

    messages: list[str] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)


def write_nested_sync(db: Database[Any], how: str, name: str) -> None:
    """Add an item in a unit nested in the running one: a ``db.begin()`` block or a
    ``db.run()``."""
    if how == "begin":
        with db.begin() as session:
            session.add(Item(name=name))
    else:

        def add(session: Session) -> None:
            session.add(Item(name=name))

        db.run(add)


async def write_nested_async(db: Database[Any], how: str, name: str) -> None:
    if how == "begin":
        async with db.begin() as session:
            session.add(Item(name=name))
    else:

        async def add(session: AsyncSession) -> None:
            session.add(Item(name=name))

        await db.run_async(add)


def refused_sync(refusals: Refusals, write: Callable[[], None]) -> bool:
    """Run ``write``; record a RuntimeError it raised and how long it took to come."""
    started = time.monotonic()
    try:
        write()
    except RuntimeError as exc:
        refusals.waited.append(time.monotonic() - started)
        refusals.messages.append(str(exc))
        return True
    return False


async def refused_async(refusals: Refusals, write: Callable[[], Awaitable[None]]) -> bool:
    started = time.monotonic()
    try:
        await write()
    except RuntimeError as exc:
        refusals.waited.append(time.monotonic() - started)
        refusals.messages.append(str(exc))
        return True
    return False


def audit_app(db: Database[Any], how: str, refusals: Refusals, read_first: bool = True) -> Any:
    """``/audit`` (any method) reads the item count through the request's own session, then
    records an audit item in a nested unit (``how``): 200 if stored, 409 if refused. With
    ``read_first=False`` the request reads only after the nested unit."""

    def audit_sync(request: Request) -> Response:
        count = int(db.session.execute(COUNT).scalar_one()) if read_first else 0
        if refused_sync(refusals, lambda: write_nested_sync(db, how, f"audit {count}")):
            return PlainTextResponse("refused", status_code=409)
        db.session.execute(COUNT)
        return PlainTextResponse("audited")

    async def audit_async(request: Request) -> Response:
        count = int((await db.session.execute(COUNT)).scalar_one()) if read_first else 0
        if await refused_async(refusals, lambda: write_nested_async(db, how, f"audit {count}")):
            return PlainTextResponse("refused", status_code=409)
        await db.session.execute(COUNT)
        return PlainTextResponse("audited")

    endpoint = audit_async if db.is_async else audit_sync
    app = Starlette(routes=[Route("/audit", endpoint, methods=["GET", "POST"])])
    app.add_middleware(SessionMiddleware, db=db)
    return app


async def send(app: Any, method: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.request(method, "/audit")


def assert_refused_at_once(refusals: Refusals, mode: str) -> None:
    (message,) = refusals.messages
    assert "write lock" in message, message
    assert "sqlite_begin='deferred'" in message, message
    assert f"sqlite_begin={mode!r}" in message, message
    (waited,) = refusals.waited
    assert waited < AT_ONCE, f"waited {waited:.2f} s for the lock (busy timeout {BUSY_TIMEOUT} s)"


# -- "auto": a request that may write ---------------------------------------------------------


@sqlite_both
@pytest.mark.parametrize("how", NESTED)
async def test_a_unit_nested_in_a_post_that_ran_a_statement_fails_at_once(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """Waiting out the busy timeout for a lock its own request holds hangs the request and
    ends in a baffling "database is locked": it must fail at once and say what to do."""
    db = make_sqlite_db(make_db, "auto")
    refusals = Refusals()
    response = await send(audit_app(db, how, refusals), "POST")
    assert (response.status_code, response.text) == (409, "refused")
    assert_refused_at_once(refusals, "auto")
    assert rows() == []


@sqlite_sync
def test_a_unit_nested_in_a_wsgi_post_that_ran_a_statement_fails_at_once(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """The same under the WSGI middleware, where a request's unit lives in its thread."""
    db = make_sqlite_db(make_db, "auto")
    refusals = Refusals()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        count = int(db.session.execute(COUNT).scalar_one())
        if refused_sync(refusals, lambda: write_nested_sync(db, "begin", f"audit {count}")):
            start_response("409 Conflict", [("Content-Type", "text/plain")])
            return [b"refused"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"audited"]

    response = Client(WSGISessionMiddleware(app, db)).post("/audit")
    assert (response.status_code, response.text) == (409, "refused")
    assert_refused_at_once(refusals, "auto")
    assert rows() == []


@sqlite_both
@pytest.mark.parametrize("how", NESTED)
async def test_a_unit_nested_in_a_get_that_ran_a_statement_is_stored(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """A safe request holds no write lock under "auto": an audit record written beside it
    in a unit of its own must be stored, as before."""
    db = make_sqlite_db(make_db, "auto")
    refusals = Refusals()
    response = await send(audit_app(db, how, refusals), "GET")
    assert (response.status_code, response.text) == (200, "audited")
    assert refusals.messages == []
    assert rows() == ["audit 0"]


@sqlite_both
@pytest.mark.parametrize("how", NESTED)
async def test_a_unit_nested_in_a_post_before_its_first_statement_is_stored(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """Until the request has run a statement it holds no lock: a nested unit that writes
    first must not be refused for a lock nobody holds."""
    db = make_sqlite_db(make_db, "auto")
    refusals = Refusals()
    response = await send(audit_app(db, how, refusals, read_first=False), "POST")
    assert (response.status_code, response.text) == (200, "audited")
    assert refusals.messages == []
    assert rows() == ["audit 0"]


# -- "deferred" and "immediate" ------------------------------------------------------------------


@sqlite_both
@pytest.mark.parametrize("how", NESTED)
async def test_deferred_lets_a_unit_nested_in_a_post_that_only_read_write(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """For a POST that only reads, "deferred" is the documented way out: its nested unit's
    write must be stored."""
    db = make_sqlite_db(make_db, "deferred")
    refusals = Refusals()
    response = await send(audit_app(db, how, refusals), "POST")
    assert (response.status_code, response.text) == (200, "audited")
    assert refusals.messages == []
    assert rows() == ["audit 0"]


@sqlite_both
@pytest.mark.parametrize("how", NESTED)
async def test_immediate_refuses_a_unit_nested_in_a_get_that_ran_a_statement(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """Under "immediate" even a safe request holds the write lock from its first statement:
    its nested unit must fail at once too, not after the busy timeout."""
    db = make_sqlite_db(make_db, "immediate")
    refusals = Refusals()
    response = await send(audit_app(db, how, refusals), "GET")
    assert (response.status_code, response.text) == (409, "refused")
    assert_refused_at_once(refusals, "immediate")
    assert rows() == []


@sqlite_both
async def test_immediate_refuses_a_unit_nested_in_a_begin_block_in_a_transaction(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A job's ``db.begin()`` block holds the write lock under "immediate" as a request
    does: a unit nested in it must fail at once, and the outer block still commits."""
    db = make_sqlite_db(make_db, "immediate")
    refusals = Refusals()

    if db.is_async:
        async with db.begin() as outer:
            assert isinstance(outer, AsyncSession)
            await outer.execute(COUNT)
            assert await refused_async(refusals, lambda: write_nested_async(db, "begin", "inner"))
            outer.add(Item(name="outer"))
    else:
        with db.begin() as sync_outer:
            assert isinstance(sync_outer, Session)
            sync_outer.execute(COUNT)
            assert refused_sync(refusals, lambda: write_nested_sync(db, "begin", "inner"))
            sync_outer.add(Item(name="outer"))
    assert_refused_at_once(refusals, "immediate")
    assert rows() == ["outer"]


@sqlite_both
async def test_immediate_lets_a_unit_nested_in_a_begin_block_write_before_its_first_statement(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An outer block that has not run a statement holds no lock, whatever the mode."""
    db = make_sqlite_db(make_db, "immediate")

    def nested_then_outer(session: Session) -> None:
        with db.begin() as inner:
            inner.add(Item(name="inner"))
        session.add(Item(name="outer"))

    if db.is_async:
        async with db.begin() as outer:
            await write_nested_async(db, "begin", "inner")
            outer.add(Item(name="outer"))
    else:
        await run_unit(db, nested_then_outer)
    assert rows() == ["inner", "outer"]
