"""SessionMiddleware and the event loop: where a unit ends, and what ends it (issue 12).

A COMMIT that can wait never runs on the loop (rule 16); a request cancelled before its
COMMIT was sent stores nothing (rule 17); a captured session never reopens after its unit
ended (rule 8); after-commit callbacks of a sync database run off the loop and survive an
explicit commit; a middleware installed twice, or for another database, says so (section 3).
The cases that need a server run under a real uvicorn; the others use the raw driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware
from sessionscope._types import Message
from sessionscope.adapters.starlette import session_dependency

from .._models import Child, Item, Parent
from .._uvicorn import serve, wait_until
from ..conftest import Backend, DatabaseFactory, backend_params, idle_in_transaction
from ._asgi_apps import build_app, nothing_left, resolve, with_route
from ._driver import Exchange, call

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]

PG_SYNC = backend_params(["postgresql"], ["sync"])
SQLITE_SYNC = backend_params(["sqlite"], ["sync"])


def checked_out(db: Database[Any]) -> int:
    return int(db.sync_engine.pool.checkedout())  # type: ignore[attr-defined]


# -- case 1: a COMMIT waiting for a row lock never stalls the loop (rule 16) ---------------------


def lock_waiters(checker: sa.Engine) -> int:
    """Backends of the test database waiting for a lock (a COMMIT checking a deferred FK)."""
    with checker.connect() as connection:
        count = connection.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return int(count or 0)


def end_lock_holders(checker: sa.Engine) -> None:
    """Terminate the backends that block others, so that nothing waits on them any more."""
    with checker.connect() as connection:
        connection.execute(
            sa.text(
                "SELECT pg_terminate_backend(blocker) FROM (SELECT DISTINCT"
                " unnest(pg_blocking_pids(pid)) AS blocker FROM pg_stat_activity"
                " WHERE datname = current_database()) AS blockers"
            )
        )


def parent_and_child_app(
    db: Database[Session], locked: threading.Event, release: threading.Event, **options: Any
) -> Starlette:
    """``/lock`` holds parent 1 FOR UPDATE until ``release``; ``/child`` inserts a child of
    it, whose deferred foreign key is checked at COMMIT and so waits for that lock."""

    def lock_parent(request: Request) -> Response:
        db.session.execute(sa.select(Parent).where(Parent.id == 1).with_for_update())
        locked.set()
        release.wait(10)
        return PlainTextResponse("locked")

    def add_child(request: Request) -> Response:
        db.session.add(Child(parent_id=1))
        db.session.flush()
        return PlainTextResponse("child", status_code=201)

    def ping(request: Request) -> Response:
        return PlainTextResponse("pong")

    app = Starlette(
        routes=[
            Route("/lock", lock_parent, methods=["POST"]),
            Route("/child", add_child, methods=["POST"]),
            Route("/ping", ping),
        ]
    )
    app.add_middleware(SessionMiddleware, db=db, **options)
    return app


@pytest.mark.parametrize("commit_in_thread", [False, True], ids=["default", "commit_in_thread"])
@pytest.mark.parametrize("backend", PG_SYNC, indirect=True)
async def test_commit_waiting_for_a_row_lock_never_stalls_the_server(
    make_db: DatabaseFactory, checker: sa.Engine, commit_in_thread: bool
) -> None:
    """A COMMIT that waits for another request's row lock must not freeze every request."""
    db: Database[Session] = make_db()
    with checker.begin() as connection:
        connection.execute(sa.insert(Parent).values(id=1))
    locked, release = threading.Event(), threading.Event()
    app = parent_and_child_app(db, locked, release, commit_in_thread=commit_in_thread)
    statuses: dict[str, int] = {}
    ping: int | None = None
    async with serve(app) as served, httpx.AsyncClient(base_url=served.url, timeout=10) as http:

        async def post(path: str) -> None:
            statuses[path] = (await http.post(path)).status_code

        try:
            with anyio.fail_after(15):
                async with anyio.create_task_group() as group:
                    group.start_soon(post, "/lock")
                    await wait_until(locked.is_set, 5)
                    group.start_soon(post, "/child")
                    # The child's COMMIT now waits for the parent's row lock.
                    await wait_until(lambda: lock_waiters(checker) == 1, 5)
                    try:
                        ping = (await http.get("/ping", timeout=2)).status_code
                    except httpx.TimeoutException:
                        group.cancel_scope.cancel()
                    release.set()
        finally:
            release.set()
            # A server stuck on the loop stops only once the lock it waits for is gone.
            end_lock_holders(checker)
    assert ping == 200, "/ping got no answer while a COMMIT waited for a row lock"
    assert statuses == {"/lock": 200, "/child": 201}
    with checker.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(Child)) == 1


# -- case 2: a request cancelled before its COMMIT was sent stores nothing (rule 17) -------------


async def hold_the_connection(db: Database[Any]) -> Callable[[], Awaitable[None]]:
    """Check out a connection of ``db``'s pool; return how to give it back (idempotent)."""
    engine = db.engine
    if isinstance(engine, AsyncEngine):
        async_connection = await engine.connect()
        return async_connection.close
    connection = engine.connect()

    async def release() -> None:
        connection.close()

    return release


@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
@pytest.mark.parametrize(
    "backend", backend_params(["sqlite", "postgresql"], ["sync", "async"]), indirect=True
)
async def test_request_cancelled_while_its_commit_waits_for_the_pool_stores_nothing(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """A request that got no response because it was cancelled must leave no data behind."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 30})
    returned = anyio.Event()

    async def add_only(request: Request) -> Response:
        db.session.add(Item(name="cancelled"))
        returned.set()
        return PlainTextResponse("created", status_code=201)

    app = with_route(db, "/add", add_only)
    exchange = Exchange()
    release = await hold_the_connection(db)
    task: asyncio.Future[Exchange] | None = None
    try:
        with anyio.fail_after(15):
            if how == "task.cancel":
                task = asyncio.ensure_future(call(app, "POST", "/add", exchange))
                await returned.wait()
                # The commit now checks out a connection, and waits for ours.
                await anyio.sleep(0.2)
                assert exchange.sent == []
                task.cancel()
                await anyio.sleep(0.1)
                await release()
                await asyncio.wait({task})
                if not task.cancelled():
                    task.result()
            else:
                scope = anyio.CancelScope()

                async def request() -> None:
                    with scope:
                        await call(app, "POST", "/add", exchange)

                async with anyio.create_task_group() as group:
                    group.start_soon(request)
                    await returned.wait()
                    await anyio.sleep(0.2)
                    assert exchange.sent == []
                    scope.cancel()
                    await anyio.sleep(0.1)
                    await release()
            await wait_until(lambda: nothing_left(db) == (0, 0, 0), 5)
    finally:
        await release()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=10)
    assert rows() == []
    assert exchange.status is None, "a cancelled request answered"


# -- case 4: a captured session never reopens after its unit ended (rule 8) ----------------------


def capturing_app(db: Database[Any], outcome: list[object], checked: threading.Event) -> FastAPI:
    """``POST /audit`` hands the request's session to a background task, which uses it once
    the middleware has closed it; what that returned or raised goes to ``outcome``. The task
    then waits for ``checked`` and closes the session, so that a leak never outlives the test.
    """
    app = FastAPI()
    app.add_middleware(SessionMiddleware, db=db)
    session_dep = Depends(session_dependency(db))

    def audit_sync(session: Session) -> None:
        try:
            outcome.append(session.execute(sa.text("SELECT 1")).scalar())
        except Exception as error:
            outcome.append(error)
        finally:
            checked.wait(10)
            session.close()

    async def audit_async(session: AsyncSession) -> None:
        try:
            outcome.append((await session.execute(sa.text("SELECT 1"))).scalar())
        except Exception as error:
            outcome.append(error)
        finally:
            await anyio.to_thread.run_sync(checked.wait, 10)
            await session.close()

    @app.post("/audit", status_code=201)
    async def create(tasks: BackgroundTasks, session: Any = session_dep) -> str:
        session.add(Item(name="audited"))
        tasks.add_task(audit_async if db.is_async else audit_sync, session)
        return "created"

    return app


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
async def test_session_captured_by_background_work_never_reopens(
    make_db: DatabaseFactory, backend: Backend
) -> None:
    """A session used after its unit ended must fail clearly, not hold a connection nobody owns."""
    db = make_db()
    outcome: list[object] = []
    checked = threading.Event()
    async with serve(capturing_app(db, outcome, checked)) as served:
        try:
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as http:
                assert (await http.post("/audit")).status_code == 201
            await wait_until(lambda: bool(outcome), 10)
            left = checked_out(db), idle_in_transaction(backend)
        finally:
            checked.set()
    assert len(outcome) == 1
    assert isinstance(outcome[0], RuntimeError), outcome[0]
    assert "db.begin()" in str(outcome[0])
    assert left == (0, 0), "(connections checked out, backends idle in transaction)"


# -- case 11: after-commit callbacks ------------------------------------------------------------


@pytest.mark.parametrize("writes", ["raw-sql-then-select", "add-only"])
@pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
async def test_after_commit_callback_of_a_sync_database_never_runs_on_the_loop(
    make_db: DatabaseFactory, rows: Rows, writes: str
) -> None:
    """A blocking callback (an SMTP send) on the loop would freeze every request."""
    db: Database[Session] = make_db()
    loop_thread = threading.get_ident()
    ran_on: list[int] = []

    def endpoint(request: Request) -> Response:
        if writes == "add-only":
            db.session.add(Item(name="noted"))
        else:
            # Holds its connection with nothing left to flush: the cheapest commit there is.
            db.session.execute(sa.text("INSERT INTO items (name) VALUES ('noted')"))
            db.session.execute(sa.select(Item.name)).all()
        db.after_commit(lambda: ran_on.append(threading.get_ident()))
        return PlainTextResponse("created", status_code=201)

    app = with_route(db, "/noted", endpoint)
    assert (await call(app, "POST", "/noted")).status == 201
    assert rows() == ["noted"]
    assert len(ran_on) == 1
    assert ran_on[0] != loop_thread, "the after-commit callback ran on the event loop's thread"


@pytest.mark.parametrize("backend", backend_params(), indirect=True)
async def test_after_commit_callback_runs_once_after_an_explicit_commit(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """Data the endpoint committed itself was committed: its callback must not be dropped."""
    db = make_db()
    ran: list[str] = []

    async def endpoint(request: Request) -> Response:
        db.after_commit(lambda: ran.append("ran"))
        db.session.add(Item(name="explicit"))
        await resolve(db.session.commit())
        return PlainTextResponse("created", status_code=201)

    app = with_route(db, "/explicit", endpoint)
    assert (await call(app, "POST", "/explicit")).status == 201
    assert rows() == ["explicit"]
    assert ran == ["ran"]


# -- case 13: misuse found early and named -------------------------------------------------------


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
async def test_middleware_twice_for_one_database_fails_the_lifespan_startup(
    make_db: DatabaseFactory,
) -> None:
    """Found at startup, a doubled middleware never reaches production as a 500 on every route."""
    db = make_db()
    app = build_app(db)
    app.add_middleware(SessionMiddleware, db=db)
    sent: list[Message] = []
    replied = anyio.Event()
    incoming = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        await replied.wait()
        return {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        sent.append(message)
        replied.set()

    # An app may raise after sending 'lifespan.startup.failed' (Starlette's router does).
    with anyio.fail_after(5), contextlib.suppress(Exception):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent, "the app answered nothing to 'lifespan.startup'"
    assert sent[0]["type"] == "lifespan.startup.failed", sent
    assert "installed twice" in sent[0].get("message", "")


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
async def test_session_of_a_database_without_middleware_names_both_databases(
    make_db: DatabaseFactory, tmp_path: Any
) -> None:
    """Two databases, one middleware: the error must say which one is missing and how to add it."""
    served_db = make_db()
    other: Database[Session] = Database(f"sqlite:///{tmp_path / 'other.sqlite3'}")

    async def endpoint(request: Request) -> Response:
        other.session()
        return PlainTextResponse("never")  # pragma: no cover

    app = with_route(served_db, "/other", endpoint)
    try:
        with pytest.raises(RuntimeError) as raised:
            await call(app, "GET", "/other")
    finally:
        other.dispose()
    message = str(raised.value)
    assert repr(other) in message
    assert repr(served_db) in message
    assert "db=" in message


@pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
async def test_rollback_after_a_failed_statement_never_runs_on_the_loop(
    make_db: DatabaseFactory,
) -> None:
    """A driver may follow the ROLLBACK of a failed transaction with statements of its own
    (psycopg deallocates its prepared statements: behind PgBouncer that waits for a server
    connection), so a unit whose statement failed ends off the loop, reads only or not."""
    db: Database[Session] = make_db()
    loop_thread = threading.get_ident()
    rolled_back_on: list[int] = []
    sa.event.listen(
        db.session, "after_rollback", lambda session: rolled_back_on.append(threading.get_ident())
    )

    def endpoint(request: Request) -> Response:
        db.session.execute(sa.select(Item.name)).all()
        with contextlib.suppress(sa.exc.DBAPIError):
            db.session.execute(sa.text("SELECT * FROM no_such_table"))
        return PlainTextResponse("no such thing", status_code=404)

    app = with_route(db, "/missing", endpoint)
    assert (await call(app, "GET", "/missing")).status == 404
    assert rolled_back_on, "the unit was rolled back"
    assert loop_thread not in rolled_back_on, "the rollback ran on the event loop's thread"
    assert nothing_left(db) == (0, 0, 0)
