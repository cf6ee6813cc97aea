"""How a unit's outcome is decided, the same on every adapter that ends a unit (issue 12).

An aborted transaction is never a success (rule 18), stored data is a success (rule 19), and
closing the unit's session by hand never loses writes silently (rule 20). Each scenario is an
endpoint body run by every adapter that ends a unit: ``db.begin()``, ``SessionMiddleware``,
``WSGISessionMiddleware`` and the Flask extension (the last two for sync drivers only), on
SQLite, PostgreSQL and MariaDB; ``make_db`` checks afterwards that nothing was left behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from sessionscope import Database, SessionMiddleware
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Item, Parent
from ._units import Boom, Rows
from .conftest import BACKENDS, DatabaseFactory
from .middleware._asgi_apps import insert, resolve
from .middleware._driver import Exchange, call

pytestmark = pytest.mark.anyio

T = TypeVar("T")

Body = Callable[[Database[Any]], Coroutine[Any, Any, int]]
"""An endpoint body: works on ``db.session`` and returns the status it answers.

Written once for both kinds of session: on a sync session every ``await resolve(...)``
returns at once, so the body never suspends and ``run_now`` runs it in sync code.
"""


def run_now(body: Coroutine[Any, Any, T]) -> T:
    """Run a body on a sync session to its end, without an event loop."""
    try:
        body.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    body.close()
    raise RuntimeError("A body on a sync session suspended; it must not await anything real.")


@dataclass(frozen=True)
class Outcome:
    """How a unit ended, as its caller saw it."""

    status: int
    """The status the client got; for ``db.begin()``, the body's answer, or 500 if it raised."""
    raised: bool
    """Whether an exception left the unit (the ``db.begin()`` block, the app)."""
    answered: bool = True
    """Whether the body ran to its answer (False: it raised itself)."""


SUCCESS = Outcome(201, raised=False)

Serve = Callable[[Database[Any], Body], Awaitable[tuple[int, bool]]]


@dataclass(frozen=True)
class Adapter:
    """One way to end a unit: it runs a body in a unit of its own and reports the outcome."""

    name: str
    modes: tuple[str, ...]
    serve: Serve

    @property
    def failure(self) -> Outcome:
        """What a failed commit looks like: a block that raises, or a 500 response."""
        return Outcome(500, raised=self.name == "begin")

    async def run(self, db: Database[Any], body: Body) -> Outcome:
        answered: list[int] = []

        async def tracked(db: Database[Any]) -> int:
            answered.append(await body(db))
            return answered[-1]

        status, raised = await self.serve(db, tracked)
        return Outcome(status, raised, answered=bool(answered))


async def serve_begin(db: Database[Any], body: Body) -> tuple[int, bool]:
    """``with db.begin():`` (``async with``) around the body; a raising block counts as 500."""
    if not db.is_async:
        # In a worker thread, like a script's thread: two units can then run at once.
        return await anyio.to_thread.run_sync(_serve_sync_begin, db, body)
    status = 500
    try:
        async with db.begin():
            status = await body(db)
    except Exception:
        return 500, True
    return status, False


def _serve_sync_begin(db: Database[Any], body: Body) -> tuple[int, bool]:
    status = 500
    try:
        with db.begin():
            status = run_now(body(db))
    except Exception:
        return 500, True
    return status, False


async def serve_asgi(db: Database[Any], body: Body) -> tuple[int, bool]:
    """A Starlette app under ``SessionMiddleware``, called once through the raw ASGI driver."""

    async def async_endpoint(request: StarletteRequest) -> PlainTextResponse:
        return PlainTextResponse("done", status_code=await body(db))

    def sync_endpoint(request: StarletteRequest) -> PlainTextResponse:
        # A 'def' endpoint, run in Starlette's threadpool: the usual shape for a sync session.
        return PlainTextResponse("done", status_code=run_now(body(db)))

    endpoint = async_endpoint if db.is_async else sync_endpoint
    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    app.add_middleware(SessionMiddleware, db=db)
    exchange = Exchange()
    try:
        await call(app, "POST", "/", exchange)
    except Exception:
        # Starlette sent its 500 before letting the error out, as a server would.
        return exchange.status or 500, True
    assert exchange.status is not None
    return exchange.status, False


async def serve_wsgi(db: Database[Any], body: Body) -> tuple[int, bool]:
    """A Werkzeug app under ``WSGISessionMiddleware``, through werkzeug's test client."""

    @Request.application
    def app(request: Request) -> Response:
        return Response("done", status=run_now(body(db)))

    return await anyio.to_thread.run_sync(post, Client(WSGISessionMiddleware(app, db)))


async def serve_flask(db: Database[Any], body: Body) -> tuple[int, bool]:
    """A Flask app with ``db.init_app(app)``, through Flask's test client."""
    app = Flask(__name__)
    app.add_url_rule(
        "/", "body", lambda: Response("done", status=run_now(body(db))), methods=["POST"]
    )
    db.init_app(app)
    return await anyio.to_thread.run_sync(post, app.test_client())


def post(client: Client) -> tuple[int, bool]:
    """POST / as a server would: read the body, close the response; an error is its 500."""
    try:
        with client.post("/") as response:
            response.get_data()
            return response.status_code, False
    except Exception:
        return 500, True


ADAPTERS = [
    Adapter("begin", ("sync", "async"), serve_begin),
    Adapter("asgi", ("sync", "async"), serve_asgi),
    Adapter("wsgi", ("sync",), serve_wsgi),
    Adapter("flask", ("sync",), serve_flask),
]


def adapter_params(backends: list[str] = BACKENDS) -> list[Any]:
    return [
        pytest.param((b, m), adapter, id=f"{adapter.name}-{b}-{m}", marks=[pytest.mark.backend(b)])
        for adapter in ADAPTERS
        for b in backends
        for m in adapter.modes
    ]


every_adapter = pytest.mark.parametrize(
    ("backend", "adapter"), adapter_params(), indirect=["backend"]
)


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The records logged at ERROR or above, by any logger."""
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


def stores(name: str) -> Body:
    """A body that stores an item named ``name`` and answers 201."""

    async def body(db: Database[Any]) -> int:
        await insert(db, name)
        return 201

    return body


# -- rule 18: an aborted transaction is never a success (case 3) ----------------------------

FAILING = [
    pytest.param(sa.insert(Item).values(name="kept"), id="duplicate"),
    pytest.param(sa.text("SELECT * FROM no_such_table"), id="missing-table"),
]
DUPLICATE = sa.insert(Item).values(name="kept")


def catches_a_failed_statement(statement: sa.Executable, then: str = "") -> Body:
    """Store 'kept', run ``statement`` (it fails), catch the error, answer 201.

    ``then``: 'rollback' rolls back after catching and stores 'after'; 'savepoint' runs the
    statement inside 'session.begin_nested()' and catches the error outside that block;
    'raw-savepoint' does the same in SQL of its own.
    """

    async def body(db: Database[Any]) -> int:
        await insert(db, "kept")
        try:
            if then == "raw-savepoint":
                await resolve(db.session.execute(sa.text("SAVEPOINT raw_savepoint")))
                try:
                    await resolve(db.session.execute(statement))
                finally:
                    rollback = sa.text("ROLLBACK TO SAVEPOINT raw_savepoint")
                    await resolve(db.session.execute(rollback))
            elif then != "savepoint":
                await resolve(db.session.execute(statement))
            elif db.is_async:
                async with db.session.begin_nested():
                    await db.session.execute(statement)
            else:
                with db.session.begin_nested():
                    db.session.execute(statement)
        except sa.exc.DBAPIError:
            pass
        if then == "rollback":
            await resolve(db.session.rollback())
            await insert(db, "after")
        return 201

    return body


@every_adapter
@pytest.mark.parametrize("statement", FAILING)
async def test_caught_statement_error_gets_the_commit_failure_response(
    adapter: Adapter,
    make_db: DatabaseFactory,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
    statement: sa.Executable,
) -> None:
    """A 2xx after a database error would be a lie: PostgreSQL drops the work at COMMIT, SQLite
    and MariaDB would store only the part before the error (rule 18)."""
    db = make_db()
    outcome = await adapter.run(db, catches_a_failed_statement(statement))
    assert (outcome, rows()) == (adapter.failure, [])
    assert len(errors(caplog)) == 1, errors(caplog)
    assert errors(caplog)[0].exc_info is not None, "logged without its traceback"
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@every_adapter
async def test_explicit_rollback_after_a_caught_error_lets_the_unit_commit(
    adapter: Adapter, make_db: DatabaseFactory, rows: Rows
) -> None:
    """An endpoint that rolled back after the error starts clean: what it writes next is kept."""
    db = make_db()
    outcome = await adapter.run(db, catches_a_failed_statement(DUPLICATE, "rollback"))
    assert (outcome, rows()) == (SUCCESS, ["after"])


@every_adapter
async def test_error_confined_to_a_savepoint_lets_the_unit_commit(
    adapter: Adapter, make_db: DatabaseFactory, rows: Rows
) -> None:
    """A failure inside 'begin_nested()' was undone by its SAVEPOINT; the rest is kept."""
    db = make_db()
    outcome = await adapter.run(db, catches_a_failed_statement(DUPLICATE, "savepoint"))
    assert (outcome, rows()) == (SUCCESS, ["kept"])


@every_adapter
async def test_error_confined_to_a_raw_savepoint_lets_the_unit_commit(
    adapter: Adapter, make_db: DatabaseFactory, rows: Rows
) -> None:
    """A SAVEPOINT written as raw SQL confines a failure as 'begin_nested()' does."""
    db = make_db()
    outcome = await adapter.run(db, catches_a_failed_statement(DUPLICATE, "raw-savepoint"))
    assert (outcome, rows()) == (SUCCESS, ["kept"])


class Rendezvous:
    """Where two units wait for each other: threads for a sync database, tasks for an async one."""

    def __init__(self) -> None:
        self._threads = threading.Barrier(2, timeout=10)
        self._tasks = asyncio.Barrier(2)

    async def meet(self, db: Database[Any]) -> None:
        if db.is_async:
            await self._tasks.wait()
        else:
            self._threads.wait()


def short_lock_waits(dbapi_connection: Any, record: Any) -> None:
    # A lock wait that is not a deadlock fails the test in seconds rather than hanging it.
    cursor = dbapi_connection.cursor()
    cursor.execute("SET SESSION innodb_lock_wait_timeout = 5")
    cursor.close()


def locks_both_rows(
    name: str, order: tuple[int, int], rendezvous: Rendezvous, victims: dict[str, Any]
) -> Body:
    """Store ``name``, lock one parent row, wait for the other unit, lock the other row.

    The deadlock's victim catches the error and writes ``name-after``, which MariaDB runs in
    a new transaction: the whole first one was already rolled back.
    """

    def lock(parent: int) -> sa.Executable:
        return sa.select(Parent.id).where(Parent.id == parent).with_for_update()

    async def body(db: Database[Any]) -> int:
        await resolve(db.session.execute(sa.insert(Item).values(name=name)))
        await resolve(db.session.execute(lock(order[0])))
        await rendezvous.meet(db)
        try:
            await resolve(db.session.execute(lock(order[1])))
        except sa.exc.DBAPIError as error:
            victims[name] = error.orig.args[0] if error.orig is not None else error
            await resolve(db.session.execute(sa.insert(Item).values(name=f"{name}-after")))
        return 201

    return body


@pytest.mark.parametrize(("backend", "adapter"), adapter_params(["mariadb"]), indirect=["backend"])
async def test_caught_deadlock_gets_the_commit_failure_response(
    adapter: Adapter,
    make_db: DatabaseFactory,
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MariaDB rolled the deadlock's victim back already: its 2xx would announce lost data, and
    committing what it wrote after the error would store half of its work (rule 18)."""
    db = make_db()
    event.listen(db.sync_engine, "connect", short_lock_waits)
    with checker.begin() as connection:
        connection.execute(sa.insert(Parent), [{"id": 1}, {"id": 2}])
    rendezvous = Rendezvous()
    victims: dict[str, Any] = {}
    outcomes: dict[str, Outcome] = {}

    async def unit(name: str, order: tuple[int, int]) -> None:
        outcomes[name] = await adapter.run(db, locks_both_rows(name, order, rendezvous, victims))

    with anyio.fail_after(15):
        async with anyio.create_task_group() as group:
            group.start_soon(unit, "a", (1, 2))
            group.start_soon(unit, "b", (2, 1))
    assert list(victims.values()) == [1213], "expected one deadlock (ER_LOCK_DEADLOCK)"
    [loser] = victims
    [winner] = {"a", "b"} - {loser}
    assert (outcomes, rows()) == ({winner: SUCCESS, loser: adapter.failure}, [winner])
    assert len(errors(caplog)) == 1, errors(caplog)


# -- rule 19: stored means success (case 6) -------------------------------------------------


def sync_session_of(db: Database[Any]) -> Session:
    """The current unit's ``Session`` (the one inside it, for an ``AsyncSession``)."""
    session = db.session()
    return session.sync_session if isinstance(session, AsyncSession) else session


def fails_after_the_commit(event_name: str) -> Body:
    """Store 'stored' with a listener for ``event_name`` that raises once, after COMMIT.

    The listener is on the unit's session, so the next unit's session does not have it.
    """

    async def body(db: Database[Any]) -> int:
        session = sync_session_of(db)
        seen: list[str] = []

        def committed(session: Session) -> None:
            seen.append("committed")

        def fail(*args: object) -> None:
            if seen == ["committed"]:
                seen.append("raised")
                raise Boom(f"an {event_name!r} listener failed after the COMMIT")

        # Registered first, so that it runs before 'fail' for 'after_commit' too.
        event.listen(session, "after_commit", committed)
        event.listen(session, event_name, fail)
        await insert(db, "stored")
        return 201

    return body


@every_adapter
@pytest.mark.parametrize("event_name", ["after_transaction_end", "after_commit"])
async def test_listener_that_raises_after_the_commit_keeps_the_success(
    adapter: Adapter,
    make_db: DatabaseFactory,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
    event_name: str,
) -> None:
    """Stored data is a success: a 5xx (or a raising block) would make the client write twice,
    and the error is logged once; the next unit works as usual (rule 19)."""
    db = make_db()
    outcome = await adapter.run(db, fails_after_the_commit(event_name))
    assert (outcome, rows()) == (SUCCESS, ["stored"])
    outcome = await adapter.run(db, stores("next"))
    assert (outcome, rows()) == (SUCCESS, ["stored", "next"])
    assert len(errors(caplog)) == 1, errors(caplog)
    exc_info = errors(caplog)[0].exc_info
    assert exc_info is not None, "logged without its traceback"
    chain: list[BaseException] = []
    error: BaseException | None = exc_info[1]
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, Boom) for e in chain), "the listener's error is not the one logged"


# -- rule 20: no silent loss through misuse (case 5) ----------------------------------------


def closes_the_session_by_hand(flush: bool) -> Body:
    """Add 'x' (and flush it) inside 'with db.session() as s:', then answer 201."""

    async def body(db: Database[Any]) -> int:
        if db.is_async:
            async with db.session() as session:
                session.add(Item(name="x"))
                if flush:
                    await session.flush()
        else:
            with db.session() as session:
                session.add(Item(name="x"))
                if flush:
                    session.flush()
        return 201

    return body


@every_adapter
@pytest.mark.parametrize("flush", [False, True], ids=["added", "flushed"])
async def test_session_closed_by_hand_keeps_its_write_or_fails_loudly(
    adapter: Adapter, make_db: DatabaseFactory, rows: Rows, flush: bool
) -> None:
    """The SQLAlchemy 2.0 idiom 'with db.session() as s:' must not turn a 2xx into lost data:
    either the write is stored with the 2xx, or the caller gets an error (rule 20)."""
    db = make_db()
    outcome = await adapter.run(db, closes_the_session_by_hand(flush))
    stored = rows()
    kept = outcome == SUCCESS and stored == ["x"]
    refused = outcome.status >= 500 and stored == []
    assert kept or refused, (outcome, stored)


async def reads_in_a_closed_block_then_writes(db: Database[Any]) -> int:
    if db.is_async:
        async with db.session() as session:
            await session.execute(sa.select(1))
    else:
        with db.session() as session:
            session.execute(sa.select(1))
    await insert(db, "after")
    return 201


@every_adapter
async def test_session_closed_by_hand_after_a_read_stays_usable(
    adapter: Adapter, make_db: DatabaseFactory, rows: Rows
) -> None:
    """Closing the session after a read loses nothing, so it is no error: the unit's session
    still works afterwards and its later write is stored."""
    db = make_db()
    outcome = await adapter.run(db, reads_in_a_closed_block_then_writes)
    assert (outcome, rows()) == (SUCCESS, ["after"])
