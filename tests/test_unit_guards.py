"""Guards on how a unit of work ends, from an adversarial review of issue 12's rewrite.

Whether a COMMIT succeeded is known whatever the app's own listeners do (rules 18, 19);
removing or closing the unit's session by hand inside the unit loses nothing and breaks
nothing (rule 20); only a SELECT that takes no row lock, with nothing of the app's running
at the commit, ends on the event loop (rule 16); a thread still waiting for a connection
when its unit ends gets none (rule 8); a cancel scope around a ``send()`` keeps its own
cancellation. Each case runs through ``SessionMiddleware`` with the raw ASGI driver, and
the ``make_db`` fixture (or ``make_db_on_engine``) checks afterwards that nothing was left
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware
from sessionscope._types import ASGIApp, Receive, Scope, Send

from ._models import Child, Item, Parent
from ._units import Rows
from .conftest import (
    Backend,
    DatabaseFactory,
    _sqlite_foreign_keys,
    backend_params,
    idle_in_transaction,
    leak_checked,
)
from .middleware._asgi_apps import insert, resolve, with_route
from .middleware._driver import call

pytestmark = pytest.mark.anyio


def answering(status: int, body: Callable[[], Any]) -> ASGIApp:
    """A raw ASGI app that runs ``body`` (awaiting it if async), then answers ``status``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await resolve(body())
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    return app


async def post(db: Database[Any], body: Callable[[], Any], status: int = 201) -> int | None:
    """POST to ``body`` answering ``status`` under ``SessionMiddleware``; the status sent."""
    with anyio.fail_after(10):
        exchange = await call(SessionMiddleware(answering(status, body), db=db), "POST", "/")
    return exchange.status


# -- 1: a failed COMMIT is never a success, whatever the app's listeners do (rules 18, 19) ----


class Conflict(Exception):
    """What an app's ``handle_error`` listener raises in place of an IntegrityError."""


def translate(context: ExceptionContext) -> None:
    # SQLAlchemy's documented way to replace an error: raise from the listener. It ends the
    # chain, so that no listener after this one sees the error.
    if isinstance(context.sqlalchemy_exception, sa.exc.IntegrityError):
        raise Conflict("that name is taken") from context.sqlalchemy_exception


EngineDatabaseFactory = Callable[[Callable[[sa.Engine], None]], Database[Any]]


@pytest.fixture
async def make_db_on_engine(backend: Backend) -> AsyncIterator[EngineDatabaseFactory]:
    """``make_db`` for ``Database(engine=...)``: ``prepare`` gets the (sync) engine first,
    as an app registers its listeners before it hands the engine over."""
    engines: list[sa.Engine | AsyncEngine] = []
    made: list[Database[Any]] = []

    def make(prepare: Callable[[sa.Engine], None]) -> Database[Any]:
        db: Database[Any]
        if backend.is_async:
            async_engine = create_async_engine(backend.url)
            engines.append(async_engine)
            sync_engine = async_engine.sync_engine
        else:
            sync_engine = sa.create_engine(backend.url)
            engines.append(sync_engine)
        if backend.name == "sqlite":
            event.listen(sync_engine, "connect", _sqlite_foreign_keys)
        prepare(sync_engine)
        db = Database(engine=async_engine) if backend.is_async else Database(engine=sync_engine)
        made.append(db)
        return db

    try:
        with leak_checked(made, backend):
            yield make
    finally:
        for engine in engines:
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()


@pytest.mark.parametrize(
    "backend", backend_params(["sqlite", "postgresql"], ["sync", "async"]), indirect=True
)
async def test_commit_failure_translated_by_a_handle_error_listener_gets_a_500(
    make_db_on_engine: EngineDatabaseFactory, rows: Rows
) -> None:
    """A COMMIT refused by a deferred foreign key, whose error the app's listener translates,
    stored nothing: a 201 would tell the client its data is safe (rule 19)."""
    db = make_db_on_engine(lambda engine: event.listen(engine, "handle_error", translate))

    async def orphan() -> None:
        db.session.add(Item(name="lost"))
        db.session.add(Child(parent_id=999))
        await resolve(db.session.flush())

    assert (await post(db, orphan), rows()) == (500, [])


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
async def test_caught_error_translated_by_a_handle_error_listener_gets_a_500(
    make_db_on_engine: EngineDatabaseFactory, rows: Rows
) -> None:
    """A statement error that the app's listener translates and the endpoint catches still
    aborts the unit: on PostgreSQL its COMMIT stores nothing, so no backend may answer 2xx
    (rule 18)."""
    db = make_db_on_engine(lambda engine: event.listen(engine, "handle_error", translate))

    async def caught() -> None:
        await insert(db, "kept")
        with contextlib.suppress(Conflict):
            await resolve(db.session.execute(sa.insert(Item).values(name="kept")))

    assert (await post(db, caught), rows()) == (500, [])


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
async def test_engine_commit_listener_that_raises_gets_a_500(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An engine 'commit' listener runs before the COMMIT is sent: when it raises nothing was
    stored, and a 201 would lose the data silently (rule 19)."""
    db: Database[Any] = make_db()

    def audit_sink_down(connection: sa.Connection) -> None:
        raise RuntimeError("the audit sink is down")

    event.listen(db.sync_engine, "commit", audit_sink_down)
    assert (await post(db, lambda: insert(db, "lost")), rows()) == (500, [])


# -- 2: 'db.session.remove()' inside a unit (rule 20) -----------------------------------------


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
async def test_session_kept_across_remove_by_hand_stores_its_write(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """Code holding the session (a dependency's) after a helper called 'db.session.remove()'
    must not answer 201 with nothing stored, nor hold a connection nobody ends."""
    db: Database[Any] = make_db()

    async def remove_then_write() -> None:
        session = db.session()
        await resolve(db.session.remove())
        session.add(Item(name="kept"))
        await resolve(session.flush())

    assert (await post(db, remove_then_write), rows()) == (201, ["kept"])


# -- 3/4: only a SELECT that locks nothing, with nothing of the app's, ends on the loop (rule 16)


def commits_on_the_loop(db: Database[Any]) -> list[bool]:
    """For each COMMIT of ``db``'s engine: whether it ran on this (the event loop's) thread."""
    loop_thread = threading.get_ident()
    seen: list[bool] = []
    event.listen(
        db.sync_engine,
        "commit",
        lambda connection: seen.append(threading.get_ident() == loop_thread),
    )
    return seen


SYNC = backend_params(modes=["sync"])


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_plain_select_commits_on_the_loop(make_db: DatabaseFactory) -> None:
    """A session that only ran a plain SELECT ends on the loop: its COMMIT cannot wait, and
    the read path stays free of a thread hop."""
    db: Database[Session] = make_db()
    on_loop = commits_on_the_loop(db)
    read = answering(200, lambda: db.session.execute(sa.select(Item)).all())
    app = SessionMiddleware(read, db=db)
    with anyio.fail_after(10):
        # A GET: on SQLite a POST begins with BEGIN IMMEDIATE, whose COMMIT may wait.
        assert (await call(app, "GET", "/")).status == 200
    assert on_loop == [True]


@pytest.mark.parametrize(
    "backend", backend_params(["postgresql", "mariadb"], ["sync"]), indirect=True
)
async def test_select_for_update_commits_in_a_worker_thread(
    make_db: DatabaseFactory, checker: sa.Engine
) -> None:
    """A row lock gives the transaction an id: its COMMIT waits like a write's (a synchronous
    standby), so it must not run on the loop."""
    db: Database[Session] = make_db()
    with checker.begin() as connection:
        connection.execute(sa.insert(Parent).values(id=1))
    on_loop = commits_on_the_loop(db)

    def lock() -> None:
        db.session.execute(sa.select(Parent).where(Parent.id == 1).with_for_update()).all()

    assert await post(db, lock, 200) == 200
    assert on_loop == [False]


def insert_in_a_cte(name: str) -> sa.Select[Any]:
    """A SELECT whose CTE inserts an item named ``name`` (PostgreSQL): it starts with WITH."""
    return sa.select(sa.insert(Item).values(name=name).returning(Item.id).cte())


@pytest.mark.parametrize("backend", backend_params(["postgresql"], ["sync"]), indirect=True)
async def test_data_modifying_cte_commits_in_a_worker_thread(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A select() around an INSERT CTE is a write: its COMMIT can wait on a lock (a deferred
    foreign key), so it must not run on the loop."""
    db: Database[Session] = make_db()
    on_loop = commits_on_the_loop(db)
    assert await post(db, lambda: db.session.execute(insert_in_a_cte("cte")).all()) == 201
    assert (on_loop, rows()) == ([False], ["cte"])


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_session_with_a_before_commit_listener_commits_in_a_worker_thread(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An app's 'before_commit' listener may write (an outbox) or block, so a read-only
    session that has one still ends off the loop, and the listener's write is stored."""
    db: Database[Session] = make_db()
    on_loop = commits_on_the_loop(db)

    def outbox(session: Session) -> None:
        for name in session.info.pop("outbox", []):
            session.execute(sa.insert(Item).values(name=name))

    event.listen(db.session.session_factory, "before_commit", outbox)

    def read_and_queue() -> None:
        db.session.execute(sa.select(Item)).all()
        db.session.info.setdefault("outbox", []).append("queued")

    assert await post(db, read_and_queue, 200) == 200
    assert (on_loop, rows()) == ([False], ["queued"])


@pytest.mark.parametrize(
    "backend", backend_params(["postgresql"], ["sync", "async"]), indirect=True
)
async def test_data_modifying_cte_in_a_block_closed_by_hand_is_stored(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """'with db.session() as s:' around an INSERT CTE must keep the write, not reset it as a
    read and answer 201 with nothing stored (rule 20)."""
    db: Database[Any] = make_db()

    async def closed_block() -> None:
        if db.is_async:
            async with db.session() as session:
                await session.execute(insert_in_a_cte("cte"))
        else:
            with db.session() as session:
                session.execute(insert_in_a_cte("cte"))

    assert (await post(db, closed_block), rows()) == (201, ["cte"])


# -- 6: closing the unit's session by hand breaks nothing (rule 20) ---------------------------


async def get_starlette(db: Database[Any], endpoint: Callable[[Request], Any]) -> int | None:
    """GET / from a Starlette app with ``endpoint`` under ``SessionMiddleware``."""
    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(SessionMiddleware, db=db)
    with anyio.fail_after(10):
        exchange = await call(app, "GET", "/")
    return exchange.status


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
async def test_http_error_raised_in_a_block_closed_by_hand_stays_itself(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A 404 raised inside 'with db.session() as s:' after a write reaches the client as the
    404 it is, and the write is rolled back with it."""
    db: Database[Any] = make_db()

    def sync_endpoint(request: Request) -> Response:
        with db.session() as session:
            session.add(Item(name="draft"))
            raise HTTPException(404)

    async def async_endpoint(request: Request) -> Response:
        async with db.session() as session:
            session.add(Item(name="draft"))
            raise HTTPException(404)

    status = await get_starlette(db, async_endpoint if db.is_async else sync_endpoint)
    assert (status, rows()) == (404, [])


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
async def test_text_select_in_a_block_closed_by_hand_is_a_read(make_db: DatabaseFactory) -> None:
    """A text() SELECT is a read: closing the session after it is no error (the SQLAlchemy 2.0
    idiom on a read-only request must not fail it)."""
    db: Database[Any] = make_db()
    count = sa.text("SELECT count(*) FROM items")

    def sync_endpoint(request: Request) -> Response:
        with db.session() as session:
            return PlainTextResponse(str(session.execute(count).scalar()))

    async def async_endpoint(request: Request) -> Response:
        async with db.session() as session:
            return PlainTextResponse(str((await session.execute(count)).scalar()))

    assert await get_starlette(db, async_endpoint if db.is_async else sync_endpoint) == 200


# -- 5: a thread still waiting for a connection when its unit ends gets none (rule 8) ---------


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_thread_waiting_for_a_connection_when_the_unit_ends_gets_none(
    make_db: DatabaseFactory, backend: Backend
) -> None:
    """A thread the request started, past 'get_bind' and waiting for the pool as the request
    ends, must fail clearly rather than hold a connection that nobody will end."""
    db: Database[Session] = make_db()
    in_checkout, release = threading.Event(), threading.Event()
    slow = threading.local()

    def slow_checkout(*args: Any) -> None:
        if getattr(slow, "on", False):
            in_checkout.set()
            release.wait(5)

    event.listen(db.sync_engine, "checkout", slow_checkout)
    outcome: list[object] = []

    def use_the_session() -> None:
        slow.on = True
        try:
            outcome.append(db.session.execute(sa.select(sa.literal(1))).all())
        except RuntimeError as error:
            outcome.append(error)

    threads: list[threading.Thread] = []

    def start_and_return(request: Request) -> Response:
        # The thread sees the request's unit through the context it is started with.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(use_the_session,))
        threads.append(thread)
        thread.start()
        in_checkout.wait(5)
        return PlainTextResponse("ok")

    try:
        with anyio.fail_after(10):
            await call(with_route(db, "/start", start_and_return), "GET", "/start")
        # The request ended while the thread waited in the pool (what it answered is the
        # app's own race: SQLAlchemy refuses a session used by two threads at once).
        assert in_checkout.is_set()
    finally:
        release.set()
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join, 5)
    assert len(outcome) == 1
    assert isinstance(outcome[0], RuntimeError), outcome[0]
    assert "has ended" in str(outcome[0])
    assert "db.begin()" in str(outcome[0])
    assert (db.sync_engine.pool.checkedout(), idle_in_transaction(backend)) == (0, 0)  # type: ignore[attr-defined]


# -- 8: a cancel scope around send() keeps its own cancellation (rule 17) ---------------------


@pytest.mark.parametrize("backend", backend_params(["sqlite"], ["sync", "async"]), indirect=True)
async def test_cancel_scope_around_send_recognises_its_own_cancellation(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """'anyio.move_on_after' around a send() whose commit is slow must catch its cancellation
    and let the app go on, not turn it into a CancelledError that kills the request."""
    db: Database[Any] = make_db()

    def slow_insert(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT"):
            time.sleep(0.3)

    event.listen(db.sync_engine, "before_cursor_execute", slow_insert)
    caught: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        db.session.add(Item(name="slow"))
        try:
            with anyio.move_on_after(0.05) as timeout:
                await send({"type": "http.response.start", "status": 201, "headers": []})
        except asyncio.CancelledError:
            caught.append(False)
            raise
        caught.append(timeout.cancelled_caught)
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"timed out"})

    with anyio.fail_after(10):
        exchange = await call(SessionMiddleware(app, db=db), "POST", "/")
    assert caught == [True]
    assert (exchange.status, exchange.complete, rows()) == (503, True, [])


# -- the WSGI side and the tracker's edges (a second review) ----------------------------------

WSGI_SYNC = backend_params(modes=["sync"])


@pytest.mark.parametrize("backend", WSGI_SYNC, indirect=True)
def test_empty_chunk_before_start_response_decides_nothing(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """PEP 3333 lets an app yield empty chunks before its status: the view's writes must
    wait for that status, not be rolled back behind a 201."""
    from werkzeug.test import Client

    from sessionscope import WSGISessionMiddleware

    db = make_db()

    def app(environ: Any, start_response: Any) -> Any:
        session = db.session()
        assert isinstance(session, Session)
        session.add(Item(name="early"))
        session.flush()
        yield b""
        start_response("201 Created", [("Content-Type", "text/plain")])
        yield b"done"

    response = Client(WSGISessionMiddleware(app, db)).get("/")
    assert (response.status_code, response.data) == (201, b"done")
    assert rows() == ["early"]


@pytest.mark.parametrize("backend", WSGI_SYNC, indirect=True)
def test_callback_of_an_explicit_commit_runs_when_a_wsgi_app_then_raises(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """The callback's commit succeeded: its data is stored, so it runs although the unit
    then ends by a rollback."""
    from werkzeug.test import Client

    from sessionscope import WSGISessionMiddleware

    db = make_db()
    ran: list[str] = []

    def app(environ: Any, start_response: Any) -> Any:
        db.after_commit(lambda: ran.append("ran"))
        session = db.session()
        assert isinstance(session, Session)
        session.add(Item(name="committed"))
        session.commit()
        raise RuntimeError("after the commit")

    with pytest.raises(RuntimeError, match="after the commit"):
        Client(WSGISessionMiddleware(app, db)).get("/")
    assert rows() == ["committed"]
    assert ran == ["ran"]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(["sqlite", "postgresql"]), indirect=True)
async def test_value_that_fails_to_convert_does_not_block_the_commit(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A StatementError raised before anything reached the database leaves the transaction
    usable: only the database's own errors block the commit (rule 18)."""
    db = make_db()

    async def endpoint(request: Request) -> Response:
        await insert(db, "kept")
        with contextlib.suppress(sa.exc.StatementError, TypeError):
            # JSON's bind processor fails in Python, before the driver sees the statement.
            statement = sa.insert(Item).values(name=sa.bindparam("name", type_=sa.JSON))
            await resolve(db.session.execute(statement, {"name": object()}))
        return PlainTextResponse("created", status_code=201)

    app = with_route(db, "/convert", endpoint)
    assert (await call(app, "POST", "/convert")).status == 201
    assert rows() == ["kept"]
