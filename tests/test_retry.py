"""``db.run()`` and ``db.run_async()``: work that lost a race with a concurrent transaction
runs again in a new unit, and nothing else does.

The races are real: two threads (sync drivers) or two tasks (async drivers) whose
transactions overlap on the server, met at a barrier so that both have read before either
writes; or, where one unit is enough, a unit that reads a row, lets a plain connection of the
test change and commit it, then writes it (PostgreSQL SERIALIZABLE: SQLSTATE 40001; MariaDB
with ``innodb_snapshot_isolation``: 1020; SQLite in WAL mode under a deferred ``BEGIN``: 517).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from sessionscope import Database

from ._models import Item
from ._retry import (
    INCREMENT,
    LONG_WAIT,
    RACE_CODE,
    READ,
    Counters,
    counter_table,
    driver_code,
    logged,
    lose_race,
    no_connection_out,
    racy_database,
    run_either,
    run_work,
    use_wal,
)
from ._units import Boom, Rows
from .conftest import Backend, DatabaseFactory, backend_params

pytestmark = pytest.mark.anyio

T = TypeVar("T")

postgresql_both = pytest.mark.parametrize(
    "backend", backend_params(backends=["postgresql"]), indirect=True
)
mariadb_both = pytest.mark.parametrize(
    "backend", backend_params(backends=["mariadb"]), indirect=True
)
sqlite_both = pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
servers_both = pytest.mark.parametrize(
    "backend", backend_params(backends=["postgresql", "mariadb"]), indirect=True
)

SET = sa.text("UPDATE retry_counters SET n = :n WHERE id = :id")
COUNT = sa.text("SELECT count(*) FROM items")

# What the log says when a unit of ``racy_db`` loses (the raised error carries ``RACE_CODE``).
RACE_LOG = {"postgresql": "SQLSTATE 40001", "mariadb": "MySQL 1020", "sqlite": "SQLite 517"}

Results = dict[str, Any]
Errors = dict[str, BaseException]

# The fixtures of ``_retry``, found by pytest under these names.
counters = pytest.fixture(counter_table)
racy_db = pytest.fixture(racy_database)


def names_attempt(message: str, attempt: int) -> bool:
    """Whether a log message names the attempt number ``attempt``."""
    return re.search(rf"\b{attempt}\b", message) is not None


# -- two units at once ------------------------------------------------------------------------


def in_two_threads(call: Callable[[str], object]) -> tuple[Results, Errors]:
    """Run ``call("a")`` and ``call("b")`` at once in two threads; what each returned or
    raised."""
    results: Results = {}
    errors: Errors = {}
    with ThreadPoolExecutor(2) as pool:
        futures = {who: pool.submit(call, who) for who in ("a", "b")}
        for who, future in futures.items():
            error = future.exception(LONG_WAIT)
            if error is None:
                results[who] = future.result()
            else:
                errors[who] = error
    return results, errors


async def in_two_tasks(call: Callable[[str], Awaitable[object]]) -> tuple[Results, Errors]:
    """Run ``call("a")`` and ``call("b")`` at once in two tasks; what each returned or
    raised."""
    results: Results = {}
    errors: Errors = {}

    async def one(who: str) -> None:
        try:
            results[who] = await call(who)
        except Exception as exc:
            errors[who] = exc

    with anyio.fail_after(LONG_WAIT):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(one, "a")
            tasks.start_soon(one, "b")
    return results, errors


class Meeting:
    """Where tasks "a" and "b" wait for each other (a barrier of two for one event loop)."""

    def __init__(self) -> None:
        self.arrived = {"a": anyio.Event(), "b": anyio.Event()}

    async def wait(self, who: str) -> None:
        self.arrived[who].set()
        with anyio.fail_after(LONG_WAIT):
            await self.arrived["b" if who == "a" else "a"].wait()


Meet = Callable[[], object]
AsyncMeet = Callable[[], Awaitable[None]]


async def race_of_two(
    db: Database[Any],
    retries: int,
    calls: list[str],
    sync_work: Callable[[Session, str, Meet | None], T],
    async_work: Callable[[AsyncSession, str, AsyncMeet | None], Awaitable[T]],
) -> tuple[Results, Errors]:
    """Units "a" and "b" at once through ``db.run`` (threads) or ``db.run_async`` (tasks);
    each run is noted in ``calls``, and only a unit's first run gets ``meet`` (else ``None``):
    the wait until the other unit has called it too."""
    if not db.is_async:
        barrier = threading.Barrier(2, timeout=LONG_WAIT)

        def run_sync(who: str) -> T:
            def fn(session: Session) -> T:
                first = who not in calls
                calls.append(who)
                return sync_work(session, who, barrier.wait if first else None)

            return db.run(fn, retries=retries)

        return in_two_threads(run_sync)

    meeting = Meeting()

    async def run_async(who: str) -> T:
        async def fn(session: AsyncSession) -> T:
            first = who not in calls
            calls.append(who)
            return await async_work(session, who, partial(meeting.wait, who) if first else None)

        return await db.run_async(fn, retries=retries)

    return await in_two_tasks(run_async)


# -- PostgreSQL: a serialization failure between two SERIALIZABLE units ---------------------


@dataclass
class Race:
    """What the two units of a race returned or raised, who ran ``fn`` each time, and whose
    after-commit callbacks ran."""

    results: Results = field(default_factory=dict)
    errors: Errors = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)


async def increment_race(db: Database[Any], retries: int) -> Race:
    """Two units each read counter 1, wait until the other has read, and set it to what they
    read plus one; each attempt registers an after-commit callback.

    The first UPDATE wins; the second waits for its row lock and, once the first commits,
    fails with SQLSTATE 40001. Only the first run of each waits at the meeting point.
    """
    race = Race()
    lock_timeout = sa.text("SET LOCAL lock_timeout = '5s'")

    def increment_sync(session: Session, who: str, meet: Meet | None) -> int:
        db.after_commit(lambda: race.callbacks.append(who))
        session.execute(lock_timeout)
        read = int(session.execute(READ, {"id": 1}).scalar_one())
        if meet is not None:
            meet()
        session.execute(SET, {"n": read + 1, "id": 1})
        return read + 1

    async def increment_async(session: AsyncSession, who: str, meet: AsyncMeet | None) -> int:
        db.after_commit(lambda: race.callbacks.append(who))
        await session.execute(lock_timeout)
        read = int((await session.execute(READ, {"id": 1})).scalar_one())
        if meet is not None:
            await meet()
        await session.execute(SET, {"n": read + 1, "id": 1})
        return read + 1

    race.results, race.errors = await race_of_two(
        db, retries, race.calls, increment_sync, increment_async
    )
    return race


@postgresql_both
async def test_serialization_failure_runs_again_and_both_increments_are_stored(
    counters: Counters, make_db: DatabaseFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Two increments racing under SERIALIZABLE must both count: the loser re-reads and
    writes again instead of failing the job, and its dropped attempt commits nothing."""
    db = make_db(engine_options={"isolation_level": "SERIALIZABLE"})
    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        race = await increment_race(db, retries=3)

    assert race.errors == {}
    assert sorted(race.results.values()) == [1, 2], "the retry read the winner's value"
    assert counters()[1] == 2
    assert len(race.calls) == 3, f"one retry expected, fn ran for {race.calls}"
    assert sorted(race.callbacks) == ["a", "b"], "only the two successful attempts' callbacks"
    warnings = logged(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "SQLSTATE 40001" in warnings[0]
    assert names_attempt(warnings[0], 1)
    assert logged(caplog, logging.ERROR) == []
    no_connection_out(db)


@postgresql_both
async def test_serialization_failure_without_retries_is_raised(
    counters: Counters, make_db: DatabaseFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With the default ``retries=0`` the losing unit fails as before, with the driver's
    SQLSTATE, and only the winner's increment is stored."""
    db = make_db(engine_options={"isolation_level": "SERIALIZABLE"})
    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        race = await increment_race(db, retries=0)
    assert list(race.results.values()) == [1]
    assert len(race.errors) == 1
    (error,) = race.errors.values()
    assert isinstance(error, DBAPIError)
    assert getattr(error.orig, "sqlstate", None) == "40001"
    assert counters()[1] == 1
    assert len(race.calls) == 2
    assert race.callbacks == list(race.results)
    assert logged(caplog, logging.WARNING) == [], "nothing was run again"
    no_connection_out(db)


# -- PostgreSQL and MariaDB: a deadlock between two units, a lock wait that timed out ------

DEADLOCK_LOG = {"postgresql": "SQLSTATE 40P01", "mariadb": "MySQL 1213"}
# Only a guard: a deadlock is detected long before (PostgreSQL: deadlock_timeout, 1 s).
LOCK_TIMEOUT = {
    "postgresql": "SET LOCAL lock_timeout = '5s'",
    "mariadb": "SET SESSION innodb_lock_wait_timeout = 5",
}


@servers_both
async def test_deadlock_victim_runs_again_and_both_units_are_stored(
    backend: Backend,
    counters: Counters,
    make_db: DatabaseFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two units locking the same rows in opposite orders deadlock; the victim must run again
    rather than fail, so that each row ends up updated by both units exactly once."""
    db = make_db()
    calls: list[str] = []
    order = {"a": (1, 2), "b": (2, 1)}
    timeout = sa.text(LOCK_TIMEOUT[backend.name])

    def lock_both_sync(session: Session, who: str, meet: Meet | None) -> str:
        session.execute(timeout)
        session.execute(INCREMENT, {"id": order[who][0]})
        if meet is not None:
            meet()
        session.execute(INCREMENT, {"id": order[who][1]})
        return who

    async def lock_both_async(session: AsyncSession, who: str, meet: AsyncMeet | None) -> str:
        await session.execute(timeout)
        await session.execute(INCREMENT, {"id": order[who][0]})
        if meet is not None:
            await meet()
        await session.execute(INCREMENT, {"id": order[who][1]})
        return who

    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        results, errors = await race_of_two(db, 3, calls, lock_both_sync, lock_both_async)

    assert errors == {}
    assert results == {"a": "a", "b": "b"}
    assert counters() == {1: 2, 2: 2}
    assert len(calls) == 3, f"one retry expected, fn ran for {calls}"
    warnings = logged(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert DEADLOCK_LOG[backend.name] in warnings[0]
    assert names_attempt(warnings[0], 1)
    no_connection_out(db)


@mariadb_both
async def test_lock_wait_timeout_runs_again(
    counters: Counters,
    make_db: DatabaseFactory,
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A row held by another transaction for longer than the lock wait is a lost race too
    (MySQL 1205): once the other lets go, running the unit again succeeds."""
    db = make_db()
    calls: list[int] = []
    with checker.connect() as holder:
        holder.begin()
        holder.execute(INCREMENT, {"id": 1})  # holds the row's lock until rolled back

        def work(session: Session) -> str:
            calls.append(db.attempt)
            if len(calls) == 2:
                holder.rollback()
            session.execute(sa.text("SET SESSION innodb_lock_wait_timeout = 1"))
            session.execute(INCREMENT, {"id": 1})
            return "done"

        with caplog.at_level(logging.WARNING, logger="sessionscope"):
            result = await run_work(db, work, retries=1)
    assert result == "done"
    assert calls == [1, 2]
    assert counters() == {1: 1, 2: 0}
    warnings = logged(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "MySQL 1205" in warnings[0]
    no_connection_out(db)


# -- SQLite in WAL mode: a stale snapshot upgraded to a write -------------------------------


async def insert_race(db: Database[Any], retries: int) -> Race:
    """Units "a" and "b" each count the items, wait until the other has counted, and add an
    item named after themselves (flushed by the commit). "b" adds its item only once "a" has
    committed, so that its snapshot is stale when it asks for the write lock: SQLite's busy
    snapshot (517), at its COMMIT.
    """
    race = Race()
    a_committed = threading.Event()  # set by an after-commit callback, wherever it runs

    def insert_sync(session: Session, who: str, meet: Meet | None) -> int:
        if who == "a":
            db.after_commit(a_committed.set)
        count = int(session.execute(COUNT).scalar_one())
        if meet is not None:
            meet()
            if who == "b":
                assert a_committed.wait(LONG_WAIT)
        session.add(Item(name=who))
        return count

    async def insert_async(session: AsyncSession, who: str, meet: AsyncMeet | None) -> int:
        if who == "a":
            db.after_commit(a_committed.set)
        count = int((await session.execute(COUNT)).scalar_one())
        if meet is not None:
            await meet()
            if who == "b":
                assert await anyio.to_thread.run_sync(a_committed.wait, LONG_WAIT)
        session.add(Item(name=who))
        return count

    race.results, race.errors = await race_of_two(
        db, retries, race.calls, insert_sync, insert_async
    )
    return race


@sqlite_both
async def test_busy_snapshot_without_retries_is_raised(
    backend: Backend,
    make_db: DatabaseFactory,
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without retries a unit whose snapshot went stale fails at its commit with SQLite's
    busy snapshot code, logged and raised as before, and stores nothing."""
    use_wal(checker)
    db = make_db(sqlite_begin="deferred")
    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        race = await insert_race(db, retries=0)
    assert race.results == {"a": 0}
    assert list(race.errors) == ["b"]
    assert driver_code(backend, race.errors["b"]) == 517
    assert rows() == ["a"]
    assert sorted(race.calls) == ["a", "b"]
    assert logged(caplog, logging.WARNING) == []
    assert len(logged(caplog, logging.ERROR)) == 1, "the failed commit is logged as before"
    no_connection_out(db)


@sqlite_both
async def test_busy_snapshot_runs_again_and_both_rows_are_stored(
    make_db: DatabaseFactory, checker: Engine, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit whose COMMIT failed on a stale snapshot must run again and store its row,
    logged once as a retry, not also as a failed commit with a traceback."""
    use_wal(checker)
    db = make_db(sqlite_begin="deferred")
    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        race = await insert_race(db, retries=2)
    assert race.errors == {}
    assert race.results == {"a": 0, "b": 1}, "the retry counted the row of 'a'"
    assert sorted(rows()) == ["a", "b"]
    assert sorted(race.calls) == ["a", "b", "b"]
    warnings = logged(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "SQLite 517" in warnings[0]
    assert names_attempt(warnings[0], 1)
    assert logged(caplog, logging.ERROR) == [], "a commit that is run again is not an error"
    no_connection_out(db)


# -- one unit losing a race: what a retry is ------------------------------------------------


async def test_lost_race_runs_again_in_a_new_unit(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry is a fresh unit: a new session, the attempt number, the failed attempt's
    after-commit callbacks dropped, one warning naming the code, the result returned."""
    db = racy_db
    attempts: list[int] = []
    sessions: list[Session] = []
    callbacks: list[int] = []

    def work(session: Session) -> str:
        attempt = db.attempt
        attempts.append(attempt)
        sessions.append(session)
        db.after_commit(lambda: callbacks.append(attempt))
        if len(attempts) == 1:
            lose_race(session, checker)
        else:
            session.execute(INCREMENT, {"id": 1})
        return "done"

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        result = await run_work(db, work, retries=3)
    elapsed = time.monotonic() - started

    assert result == "done"
    assert attempts == [1, 2]
    assert sessions[0] is not sessions[1], "the retry got a new session"
    assert callbacks == [2], "the failed attempt's callback was dropped"
    assert counters() == {1: 2, 2: 0}, "the other transaction's increment, then the retry's"
    warnings = logged(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert RACE_LOG[backend.name] in warnings[0]
    assert names_attempt(warnings[0], 1)
    assert elapsed < 1.0, f"the first backoff is well under a second ({elapsed:.2f} s in all)"
    no_connection_out(db)


async def test_last_error_is_raised_once_attempts_run_out(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``retries=2`` means three runs at most: the third failure is raised as the driver's
    error, after one warning per retry, and no attempt's callback runs."""
    db = racy_db
    attempts: list[int] = []
    callbacks: list[int] = []

    def work(session: Session) -> None:
        attempts.append(db.attempt)
        db.after_commit(lambda: callbacks.append(1))
        lose_race(session, checker)

    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="sessionscope"),
        pytest.raises(DBAPIError) as raised,
    ):
        await run_work(db, work, retries=2)
    elapsed = time.monotonic() - started

    assert driver_code(backend, raised.value) == RACE_CODE[backend.name]
    assert attempts == [1, 2, 3]
    assert callbacks == []
    assert counters() == {1: 3, 2: 0}, "only the other transaction's increments"
    assert elapsed < 1.5, f"two short backoffs, not {elapsed:.2f} s in all"
    warnings = logged(caplog, logging.WARNING)
    assert len(warnings) == 2, warnings
    for attempt, message in enumerate(warnings, start=1):
        assert RACE_LOG[backend.name] in message
        assert names_attempt(message, attempt), message
    no_connection_out(db)


# -- what is never run again ----------------------------------------------------------------


async def test_no_retry_keeps_a_lost_race_from_running_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Work that called an external service marks its unit with ``db.no_retry()``: losing a
    race then fails the call instead of repeating the side effect."""
    db = racy_db
    calls: list[int] = []

    def work(session: Session) -> None:
        calls.append(db.attempt)
        db.no_retry()
        lose_race(session, checker)

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(DBAPIError):
        await run_work(db, work, retries=3)
    assert calls == [1]
    assert counters() == {1: 1, 2: 0}
    assert logged(caplog, logging.WARNING) == []
    no_connection_out(db)


async def lose_race_after(
    db: Database[Any],
    checker: Engine,
    first: Callable[[Session], None],
    first_async: Callable[[AsyncSession], Awaitable[None]],
) -> None:
    """Run (``retries=3``) work that does ``first`` (``first_async``), then loses a race."""

    def work(session: Session) -> None:
        first(session)
        lose_race(session, checker)

    async def work_async(session: AsyncSession) -> None:
        await first_async(session)
        await session.run_sync(lose_race, checker)

    await run_either(db, work, work_async, retries=3)


async def test_unit_that_committed_itself_is_not_run_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Work that committed part of itself with ``session.commit()`` cannot be run again
    without storing that part twice: the lost race is raised instead."""
    db = racy_db
    calls: list[int] = []

    def commit(session: Session) -> None:
        calls.append(db.attempt)
        session.add(Item(name="committed"))
        session.commit()

    async def commit_async(session: AsyncSession) -> None:
        calls.append(db.attempt)
        session.add(Item(name="committed"))
        await session.commit()

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(DBAPIError):
        await lose_race_after(db, checker, commit, commit_async)
    assert calls == [1]
    assert rows() == ["committed"]
    assert logged(caplog, logging.WARNING) == []
    no_connection_out(db)


async def test_unit_whose_nested_unit_committed_is_not_run_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``db.begin()`` block nested in the work commits on its own: running the work again
    would store its rows twice, so the lost race is raised instead."""
    db = racy_db
    calls: list[int] = []

    def nested(session: Session) -> None:
        calls.append(db.attempt)
        with db.begin() as inner:
            inner.add(Item(name="nested"))

    async def nested_async(session: AsyncSession) -> None:
        calls.append(db.attempt)
        async with db.begin() as inner:
            inner.add(Item(name="nested"))

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(DBAPIError):
        await lose_race_after(db, checker, nested, nested_async)
    assert calls == [1]
    assert rows() == ["nested"]
    assert logged(caplog, logging.WARNING) == []
    no_connection_out(db)


async def test_unique_violation_is_not_run_again(
    make_db: DatabaseFactory, checker: Engine, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """A duplicate key fails the same way every time: it is raised at once, and logged as a
    failed commit as before, even with retries left."""
    db = make_db()
    with checker.begin() as connection:
        connection.execute(sa.text("INSERT INTO items (name) VALUES ('taken')"))
    calls: list[int] = []

    def add_duplicate(session: Session) -> None:
        calls.append(db.attempt)
        session.add(Item(name="taken"))  # flushed by the commit

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(IntegrityError):
        await run_work(db, add_duplicate, retries=3)
    assert calls == [1]
    assert rows() == ["taken"]
    assert logged(caplog, logging.WARNING) == []
    assert len(logged(caplog, logging.ERROR)) == 1, "the failed commit is logged as before"
    no_connection_out(db)


async def test_application_error_is_not_run_again(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception of the application is a bug, not a lost race: raised at once, with what
    the unit wrote rolled back."""
    db = make_db()
    calls: list[int] = []

    def fail(session: Session) -> None:
        calls.append(db.attempt)
        session.add(Item(name="lost"))
        session.flush()
        raise Boom("the application failed")

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(Boom):
        await run_work(db, fail, retries=3)
    assert calls == [1]
    assert rows() == []
    assert logged(caplog, logging.WARNING) == []
    no_connection_out(db)


STATEMENT_TIMEOUT = {
    "postgresql": ["SET LOCAL statement_timeout = '100ms'", "SELECT pg_sleep(2)"],
    "mariadb": ["SET STATEMENT max_statement_time = 0.1 FOR SELECT SLEEP(2)"],
}


@servers_both
async def test_statement_timeout_is_not_run_again(
    backend: Backend, make_db: DatabaseFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement that ran out of time would run out of time again: raised at once, not
    run again (it is an OperationalError, as a lost race often is)."""
    db = make_db()
    calls: list[int] = []

    def slow(session: Session) -> None:
        calls.append(db.attempt)
        for statement in STATEMENT_TIMEOUT[backend.name]:
            session.execute(sa.text(statement))

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(DBAPIError):
        await run_work(db, slow, retries=3)
    assert calls == [1]
    assert logged(caplog, logging.WARNING) == []
    no_connection_out(db)


@sqlite_both
async def test_pool_timeout_is_not_run_again(make_db: DatabaseFactory) -> None:
    """A unit that got no connection in time is a busy server, not a lost race: running it
    again at once would only queue more work on the pool."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2})
    calls: list[int] = []

    def read(session: Session) -> None:
        calls.append(db.attempt)
        session.execute(COUNT)

    engine = db.engine
    if isinstance(engine, AsyncEngine):
        async with engine.connect():  # the pool's only connection
            with pytest.raises(PoolTimeoutError):
                await run_work(db, read, retries=3)
    else:
        assert isinstance(engine, Engine)
        with engine.connect(), pytest.raises(PoolTimeoutError):
            await run_work(db, read, retries=3)
    assert calls == [1]
    no_connection_out(db)


# -- arguments ------------------------------------------------------------------------------


@sqlite_both
@pytest.mark.parametrize("retries", [-1, 1.5, "2", None])
async def test_retries_must_be_a_whole_number(make_db: DatabaseFactory, retries: Any) -> None:
    """A wrong ``retries`` is refused before the work runs, not read as some other count."""
    db = make_db()
    calls: list[int] = []

    def work(session: Session) -> None:
        calls.append(1)

    with pytest.raises(ValueError, match="retries"):
        await run_work(db, work, retries=retries)
    assert calls == []
    no_connection_out(db)


@sqlite_both
async def test_run_refuses_the_other_kind_of_database(make_db: DatabaseFactory) -> None:
    """``db.run`` cannot drive an async session nor ``db.run_async`` a sync one: the error
    names the call to use instead, and the work does not run."""
    db = make_db()
    calls: list[int] = []

    def sync_fn(session: Session) -> None:
        calls.append(1)

    async def async_fn(session: AsyncSession) -> None:
        calls.append(1)

    if db.is_async:
        with pytest.raises(TypeError, match="run_async"):
            db.run(sync_fn)
    else:
        with pytest.raises(TypeError, match=r"db\.run(?!_async)"):
            await db.run_async(async_fn)
    assert calls == []
    no_connection_out(db)
