"""The unit of work under stress: failing commits, raising listeners, dead connections,
concurrency and cancellation. After each, the pool has its connection back, the registry is
empty, and the next unit works (the ``make_db`` fixture checks the leaks at teardown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from sessionscope import Database
from sessionscope._tasks import run_in_task

from ._models import Child, Item
from ._units import Boom, Rows, add, hold_first_commit, run_unit
from .conftest import PG_ADMIN_URL, DatabaseFactory, backend_params


def engine_events(db: Database[Any], *names: str) -> list[str]:
    """Record the named engine or pool events of ``db`` in the order they happen."""
    seen: list[str] = []
    for name in names:
        event.listen(db.sync_engine, name, lambda *args, name=name: seen.append(name))
    return seen


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def assert_clean(db: Database[Any]) -> None:
    assert db.live_units == 0
    assert db.live_sessions == 0
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- outside a unit -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "use",
    [
        lambda db: db.session(),
        lambda db: db.session.info,
        lambda db: db.after_commit(print),
        lambda db: db.set_rollback_only(),
    ],
    ids=["session()", "session.info", "after_commit", "set_rollback_only"],
)
async def test_session_outside_a_unit_names_the_fix_and_creates_nothing(
    make_db: DatabaseFactory, use: Callable[[Database[Any]], object]
) -> None:
    """A script or import-time use of 'db.session' must fail loudly, never get an orphan."""
    db = make_db()
    with pytest.raises(RuntimeError, match="No unit of work is active") as caught:
        use(db)
    message = str(caught.value)
    for fix in ("SessionMiddleware", "db.init_app(app)", "db.begin()"):
        assert fix in message
    assert db.live_sessions == 0


@pytest.mark.anyio
async def test_each_unit_gets_a_fresh_session_that_sees_current_data(
    make_db: DatabaseFactory, checker: Engine
) -> None:
    """A session reused across units would serve stale rows from its identity map."""
    db = make_db()
    await run_unit(db, add("old"))

    def load(session: Session) -> tuple[str, bool]:
        seen_before = "marker" in session.info
        session.info["marker"] = True
        return session.scalars(sa.select(Item)).one().name, seen_before

    assert await run_unit(db, load) == ("old", False)
    with checker.begin() as connection:
        connection.execute(sa.update(Item).values(name="new"))
    assert await run_unit(db, load) == ("new", False)


@pytest.mark.anyio
async def test_unit_whose_flush_failed_is_rolled_back_and_not_handed_on(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A session poisoned by a failed flush must not reach the next unit (finding 04)."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    await run_unit(db, add("taken"))

    def swallow_the_error(session: Session) -> None:
        session.info["poisoned"] = True
        session.add(Item(name="taken"))
        with pytest.raises(sa.exc.IntegrityError):
            session.flush()

    with pytest.raises(sa.exc.PendingRollbackError):
        await run_unit(db, swallow_the_error)

    def write(session: Session) -> None:
        assert "poisoned" not in session.info
        assert session.is_active
        session.add(Item(name="next"))

    await run_unit(db, write)
    assert rows() == ["taken", "next"]


# -- listeners that raise -------------------------------------------------------------------


@pytest.mark.anyio
async def test_after_commit_listener_that_raises_keeps_the_data_and_the_next_unit_clean(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """After a real COMMIT no rollback may be tried; the data is stored (SQLAlchemy #3974)."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    seen = engine_events(db, "commit", "rollback")

    def explode(session: Session) -> None:
        raise Boom("after_commit listener failed")

    def work(session: Session) -> None:
        event.listen(session, "after_commit", explode)
        session.add(Item(name="stored"))

    with caplog.at_level(logging.DEBUG, logger="sessionscope"):
        await run_unit(db, work)
    assert rows() == ["stored"]
    assert seen == ["commit"], "a rollback was attempted after the COMMIT"
    [record] = problems(caplog)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], Boom)
    assert "committed' state" not in caplog.text
    assert_clean(db)

    def write(session: Session) -> None:
        assert session.is_active
        assert not session.in_transaction()
        session.add(Item(name="next"))

    await run_unit(db, write)
    assert rows() == ["stored", "next"]


@pytest.mark.anyio
async def test_before_commit_listener_that_raises_rolls_back_and_the_next_units_commit(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A failing pre-commit hook must abort its unit and leave no wedged transaction."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})

    def explode(session: Session) -> None:
        raise Boom("before_commit listener failed")

    def work(session: Session) -> None:
        event.listen(session, "before_commit", explode)
        session.add(Item(name="lost"))
        session.flush()

    with pytest.raises(Boom):
        await run_unit(db, work)
    assert rows() == []
    assert_clean(db)
    await run_unit(db, add("second"))
    await run_unit(db, add("third"))
    assert rows() == ["second", "third"]


# -- commits that fail ----------------------------------------------------------------------


def _orphan_child(session: Session) -> None:
    # The foreign key is deferred: the INSERT succeeds and the COMMIT itself fails.
    session.add(Child(parent_id=404))
    session.flush()


def _duplicate(session: Session) -> None:
    session.add(Item(name="taken"))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("backend", "failure"),
    [
        *[
            pytest.param(p.values[0], "deferred", id=f"{p.id}-deferred", marks=p.marks)
            for p in backend_params(backends=["sqlite", "postgresql"])
        ],
        *[
            pytest.param(p.values[0], "duplicate", id=f"{p.id}-duplicate", marks=p.marks)
            for p in backend_params()
        ],
    ],
    indirect=["backend"],
)
async def test_failed_commit_is_logged_once_and_leaves_the_pooled_connection_clean(
    make_db: DatabaseFactory,
    rows: Rows,
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """On SQLite a failed COMMIT leaves the transaction open; the next units must not inherit it."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    connects = engine_events(db, "connect")
    if failure == "duplicate":
        await run_unit(db, add("taken"))
    with (
        caplog.at_level(logging.DEBUG, logger="sessionscope"),
        pytest.raises(sa.exc.IntegrityError),
    ):
        await run_unit(db, _orphan_child if failure == "deferred" else _duplicate)
    [record] = problems(caplog)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], sa.exc.IntegrityError)
    assert_clean(db)

    names = [f"after-{n}" for n in range(5)]
    for name in names:
        await run_unit(db, add(name))
    assert connects == ["connect"], "the five units did not reuse the one pooled connection"
    assert rows() == (["taken"] if failure == "duplicate" else []) + names
    with checker.connect() as connection:
        assert connection.scalar(sa.text("SELECT count(*) FROM children")) == 0


@pytest.mark.anyio
async def test_failed_commit_drops_the_after_commit_callbacks(
    make_db: DatabaseFactory,
) -> None:
    """A callback announcing data the database refused must not run."""
    db = make_db()
    await run_unit(db, add("taken"))
    calls: list[str] = []

    def work(session: Session) -> None:
        session.add(Item(name="taken"))
        db.after_commit(lambda: calls.append("ran"))

    with pytest.raises(sa.exc.IntegrityError):
        await run_unit(db, work)
    assert calls == []


# -- a connection that dies -----------------------------------------------------------------


def _terminate(pid: int) -> None:
    """Kill a PostgreSQL backend from outside and wait until it is gone."""
    admin = sa.create_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            deadline = time.monotonic() + 5
            query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            while connection.scalar(query, {"pid": pid}) and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        admin.dispose()


def _write_and_kill(session: Session) -> None:
    session.add(Item(name="lost"))
    session.flush()
    _terminate(session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(backends=["postgresql"]), indirect=True)
async def test_session_whose_close_raises_is_still_removed(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """'close()' raising on a dead connection must not leave the session in the registry."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})

    def kill_then_fail(session: Session) -> None:
        _write_and_kill(session)
        raise Boom("the application failed")

    with caplog.at_level(logging.DEBUG, logger="sessionscope"), pytest.raises(Boom):
        await run_unit(db, kill_then_fail)
    assert any(r.exc_info and isinstance(r.exc_info[1], sa.exc.DBAPIError) for r in caplog.records)
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["next"]


@pytest.mark.anyio
async def test_close_whose_rollback_fails_still_gives_the_connection_back(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """A ROLLBACK at close that fails with an error that is not a disconnect leaves SQLAlchemy
    holding the connection checked out; the close must discard it, not leave it to the GC.
    """
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    failed: list[bool] = []

    def fail_once(connection: object) -> None:
        if not failed:
            failed.append(True)
            raise Boom("the rollback failed")

    event.listen(db.sync_engine, "rollback", fail_once)

    def write_then_fail(session: Session) -> None:
        session.add(Item(name="rolled back"))
        session.flush()
        raise Boom("the application failed")

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(Boom):
        await run_unit(db, write_then_fail)
    assert failed == [True]
    assert [r.getMessage() for r in problems(caplog)] == ["Closing the session failed"]
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["next"]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(backends=["postgresql"]), indirect=True)
async def test_commit_on_a_dead_connection_fails_loudly_and_the_next_unit_works(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A COMMIT that never reached the server must raise, not pass for a success."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    with pytest.raises(sa.exc.DBAPIError):
        await run_unit(db, _write_and_kill)
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["next"]


# -- concurrency ----------------------------------------------------------------------------

UNITS = 50


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
async def test_concurrent_threads_each_get_their_own_session(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """Two requests on two threads must never share a session, its objects or its state."""
    db: Database[Session] = make_db(engine_options={"pool_size": 5, "max_overflow": 0})
    live: list[int] = []
    barrier = threading.Barrier(UNITS, action=lambda: live.append(db.live_sessions), timeout=30)
    sessions: dict[int, Session] = {}
    errors: list[BaseException] = []

    def unit(n: int) -> None:
        try:
            with db.begin() as session:
                assert isinstance(session, Session)
                session.info["unit"] = n
                item = Item(name=f"unit-{n}")
                session.add(item)
                barrier.wait()
                assert db.session() is session
                assert db.session.info["unit"] == n
                assert list(session.new) == [item]
                session.flush()
                assert list(session.identity_map.values()) == [item]
                sessions[n] = session
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=unit, args=(n,)) for n in range(UNITS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert live == [UNITS], "the units were not all open at once"
    assert len({id(session) for session in sessions.values()}) == UNITS
    assert sorted(rows()) == sorted(f"unit-{n}" for n in range(UNITS))


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_concurrent_tasks_each_get_their_own_session(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """Two requests in two tasks on one loop must never share a session or its state."""
    db = make_db(engine_options={"pool_size": 5, "max_overflow": 0})
    all_open = anyio.Event()
    opened: list[int] = []
    live: list[int] = []
    sessions: dict[int, AsyncSession] = {}

    async def unit(n: int) -> None:
        async with db.begin() as session:
            session.info["unit"] = n
            item = Item(name=f"unit-{n}")
            session.add(item)
            opened.append(n)
            if len(opened) == UNITS:
                live.append(db.live_sessions)
                all_open.set()
            await all_open.wait()
            assert db.session() is session
            assert db.session.info["unit"] == n
            assert list(session.new) == [item]
            await session.flush()
            assert list(session.identity_map.values()) == [item]
            sessions[n] = session

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for n in range(UNITS):
                group.start_soon(unit, n)
    assert live == [UNITS]
    assert len({id(session) for session in sessions.values()}) == UNITS
    assert sorted(rows()) == sorted(f"unit-{n}" for n in range(UNITS))


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_one_async_session_used_by_two_tasks_fails_fast_and_is_cleaned_up(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """Concurrent use of one AsyncSession must raise SQLAlchemy's error, not hang or leak."""
    db = make_db()
    with anyio.fail_after(10), discarded_under_a_query():
        with pytest.raises(sa.exc.InvalidRequestError, match="concurrent operations"):
            async with db.begin():
                await asyncio.gather(
                    db.session.execute(sa.text("SELECT 1")),
                    db.session.execute(sa.text("SELECT 1")),
                )
        await asyncio.sleep(0.05)  # let an aborted transport's callbacks run
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["next"]


# A query that runs long enough to still be running when the unit ends.
IN_FLIGHT_QUERY = {
    "postgresql": "SELECT pg_sleep(0.5)",
    "mysql": "SELECT SLEEP(0.5)",
    "mariadb": "SELECT SLEEP(0.5)",
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
    " WHERE x < 500000) SELECT count(*) FROM c",
}


@contextlib.contextmanager
def discarded_under_a_query() -> Iterator[None]:
    """Allow, and only allow, what asyncpg reports when its connection is discarded under a
    query another task still runs: "unexpected connection_lost() call", sent to the loop's
    exception handler from a transport callback (upstream; nothing leaks).
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    assert [
        c for c in reported if str(c.get("exception")) != "unexpected connection_lost() call"
    ] == []


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["commit", "rollback"])
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_a_task_still_querying_when_the_unit_ends_does_not_keep_the_connection(
    make_db: DatabaseFactory, rows: Rows, ending: str
) -> None:
    """A task left running a query on the unit's session when the unit ends (one
    'AsyncSession' used by two tasks) makes the driver refuse the ROLLBACK or COMMIT of the
    end of the unit; the connection must still go back to the pool, and a commit that did
    not happen must not be reported as done.
    """
    db = make_db()
    in_flight = sa.text(IN_FLIGHT_QUERY[db.sync_engine.dialect.name])
    # Set by the driver's greenlet, on the loop's thread.
    started = anyio.Event()

    def mark(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement == in_flight.text:
            started.set()

    event.listen(db.sync_engine, "before_cursor_execute", mark)
    straggler: asyncio.Future[Any] | None = None
    error: BaseException | None = None
    with anyio.fail_after(20), discarded_under_a_query():
        try:
            async with db.begin() as session:
                assert isinstance(session, AsyncSession)
                session.add(Item(name="maybe"))
                await session.flush()
                straggler = asyncio.ensure_future(session.execute(in_flight))
                await started.wait()
                if ending == "rollback":
                    raise Boom
        except Exception as exc:
            error = exc
        assert straggler is not None
        await asyncio.gather(straggler, return_exceptions=True)
        await asyncio.sleep(0.05)  # let the aborted transport's callbacks run
    assert_clean(db)
    if ending == "rollback":
        assert isinstance(error, Boom)
        assert rows() == []
    else:
        # Whether the driver let the COMMIT through or not, what the caller was told holds.
        assert rows() == ([] if error is not None else ["maybe"])
    await run_unit(db, add("next"))
    assert "next" in rows()


# -- cancellation -----------------------------------------------------------------------------


async def _cancel_while(
    db: Database[Any], reached: anyio.Event, unit: Callable[[], Any], how: str
) -> None:
    """Run ``unit`` and cancel it, the asyncio way or the anyio way, once ``reached`` is set."""
    if how == "task.cancel":
        task = asyncio.ensure_future(unit())
        await reached.wait()
        await anyio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return
    scope = anyio.CancelScope()
    finished: list[bool] = []

    async def run() -> None:
        with scope:
            await unit()
            finished.append(True)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await reached.wait()
        await anyio.sleep(0.1)
        scope.cancel()
    assert finished == []


SLOW_QUERY = {
    "postgresql": "SELECT pg_sleep(2)",
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
    " WHERE x < 5000000) SELECT count(*) FROM c",
}


# SQLAlchemy 2.1.9 + aiosqlite: an anyio cancel that lands during the query's invalidation
# orphans the shielded '_terminate_graceful_close()' task; the connection itself is returned.
_AIOSQLITE_ORPHAN = pytest.mark.skip(reason="upstream: aiosqlite terminate leaves a pending task")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("backend", "how"),
    [
        pytest.param(
            p.values[0],
            how,
            id=f"{p.id}-{how}",
            marks=[
                *p.marks,
                *([_AIOSQLITE_ORPHAN] if "sqlite" in p.id and how != "task.cancel" else []),
            ],
        )
        for p in backend_params(backends=["sqlite", "postgresql"], modes=["async"])
        for how in ("task.cancel", "cancel scope")
    ],
    indirect=["backend"],
)
async def test_cancelled_mid_query_returns_the_connection(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """A client that disconnects mid-query must not cost the pool a connection."""
    db = make_db()
    reached = anyio.Event()
    dialect = db.sync_engine.dialect.name
    slow = sa.text(SLOW_QUERY[dialect])

    async def unit() -> None:
        async with db.begin() as session:
            assert isinstance(session, AsyncSession)
            if dialect != "sqlite":
                # Not on SQLite: aiosqlite closes the cancelled connection, but the cursor of
                # the interrupted query keeps it alive with its write lock (left to upstream).
                session.add(Item(name="lost"))
                await session.flush()
            reached.set()
            await session.execute(slow)

    with anyio.fail_after(20):
        await _cancel_while(db, reached, unit, how)
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["next"]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_cancelled_mid_commit_returns_the_connection(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """A unit cancelled once its COMMIT is on its way waits for the outcome (rule 17): the
    data is stored, the cancellation is raised, and the connection is back.
    """
    db = make_db()
    reached, held = hold_first_commit(db)

    async def unit() -> None:
        async with db.begin() as session:
            session.add(Item(name="stored"))

    with anyio.fail_after(20):
        await _cancel_while(db, reached, unit, how)
    assert held == [True]
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["stored", "next"]


async def _interrupted_work(
    caller: asyncio.Task[Any] | None,
    log: list[str],
    started: anyio.Event,
    cleanup_started: anyio.Event,
) -> None:
    """Work that waits until it is cancelled, then runs an awaiting cleanup to its end."""
    log.append("in a task of its own" if asyncio.current_task() is not caller else "inline")
    try:
        started.set()
        await anyio.sleep_forever()
    except asyncio.CancelledError:
        log.append("cancelled")
        cleanup_started.set()
        await asyncio.sleep(0.2)
        log.append("cleaned up")
        raise


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
async def test_run_in_task_interrupts_the_work_once_and_waits_for_its_cleanup(how: str) -> None:
    """A cancelled caller cancels the unit's end once; a second cancellation must not cut
    the cleanup that follows, and the caller raises only once the cleanup is done.
    """
    log: list[str] = []
    started, cleanup_started = anyio.Event(), anyio.Event()
    scope = anyio.CancelScope()
    outcome: list[str] = []

    async def call() -> None:
        me = asyncio.current_task()
        try:
            with scope:
                await run_in_task(
                    lambda cancel: _interrupted_work(me, log, started, cleanup_started)
                )
            outcome.append("scope swallowed the cancellation")
        except asyncio.CancelledError:
            outcome.append(f"cancelled after {log[-1]!r}")
            raise

    with anyio.fail_after(5):
        task = asyncio.ensure_future(call())
        await started.wait()
        (task.cancel if how == "task.cancel" else scope.cancel)()
        await cleanup_started.wait()
        task.cancel()  # a second cancellation, while the cleanup awaits
        with pytest.raises(asyncio.CancelledError):
            await task
    assert log == ["in a task of its own", "cancelled", "cleaned up"]
    assert outcome == ["cancelled after 'cleaned up'"]


@pytest.mark.anyio
async def test_run_in_task_returns_the_result_and_raises_the_error_of_the_work() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise Boom("from the work")

    assert await run_in_task(lambda cancel: answer()) == 42
    with pytest.raises(Boom, match="from the work"):
        await run_in_task(lambda cancel: fail())


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_unit_context_copied_into_a_task_that_outlives_it_is_refused(
    make_db: DatabaseFactory,
) -> None:
    """A task spawned in a unit and still running after it must not get an orphan session."""
    db = make_db()
    unit_over = anyio.Event()
    outcome: list[BaseException] = []

    async def late() -> None:
        await unit_over.wait()
        try:
            db.session()
        except RuntimeError as exc:
            outcome.append(exc)

    async with db.begin():
        task = asyncio.ensure_future(late())
    unit_over.set()
    await task
    assert "has already finished" in str(outcome[0])
    assert db.live_sessions == 0
