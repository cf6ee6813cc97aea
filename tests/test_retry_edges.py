"""``db.run()`` and ``db.run_async()``, edges: what a nested unit tells the run, what is
logged when a lost race is not run again, which errors count as the lost race, a deadlock
met inside a savepoint, misuse, and a very large ``retries``.

The races are real, as in ``test_retry.py``: a unit reads a row, a plain connection of the
test changes and commits it, then the unit writes it (PostgreSQL SERIALIZABLE: SQLSTATE
40001; MariaDB with ``innodb_snapshot_isolation``: 1020; SQLite in WAL mode under a deferred
``BEGIN``: 517); on SQLite, or a connection of the test holds the write lock. ``make_db``
checks afterwards, with the garbage collector off, that no connection, unit or session was
left behind.
"""

from __future__ import annotations

import gc
import logging
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import Database

from ._models import Item
from ._retry import (
    INCREMENT,
    LONG_WAIT,
    RACE_CODE,
    Counters,
    counter_table,
    driver_code,
    logged,
    lose_race,
    no_connection_out,
    racy_database,
    run_either,
    run_work,
)
from ._units import Rows
from .conftest import Backend, DatabaseFactory, backend_params

pytestmark = pytest.mark.anyio

sqlite_both = pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
sqlite_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["sqlite"], modes=["sync"]), indirect=True
)
mariadb_both = pytest.mark.parametrize(
    "backend", backend_params(backends=["mariadb"]), indirect=True
)

# The fixtures of ``_retry``, found by pytest under these names.
counters = pytest.fixture(counter_table)
racy_db = pytest.fixture(racy_database)


def lose_race_at_commit(session: Session, checker: Engine) -> None:
    """Load the item named "x", let another transaction rename it "theirs" and commit, then
    rename it "ours": the flush inside the unit's commit fails with ``RACE_CODE``."""
    item = session.scalars(sa.select(Item).where(Item.name == "x")).one()
    with checker.begin() as connection:
        connection.execute(sa.text("UPDATE items SET name = 'theirs' WHERE name = 'x'"))
    item.name = "ours"


# -- a db.begin() nested in the run ---------------------------------------------------------


async def test_no_retry_in_a_nested_begin_keeps_the_run_from_running_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A helper that guards its side effect (an e-mail sent) in a unit of its own must keep
    the run around it from repeating that effect when the run loses a race."""
    db = racy_db
    sent: list[int] = []

    def send_mail_sync() -> None:
        with db.begin():
            db.no_retry()
            sent.append(db.attempt)

    async def send_mail_async() -> None:
        async with db.begin():
            db.no_retry()
            sent.append(db.attempt)

    def work(session: Session) -> None:
        send_mail_sync()
        lose_race(session, checker)

    async def work_async(session: AsyncSession) -> None:
        await send_mail_async()
        await session.run_sync(lose_race, checker)

    with caplog.at_level(logging.WARNING, logger="sessionscope"), pytest.raises(DBAPIError):
        await run_either(db, work, work_async, retries=3)
    assert sent == [1], f"the guarded side effect ran for attempts {sent}"
    assert counters() == {1: 1, 2: 0}, "only the other transaction's increment"
    assert logged(caplog, logging.WARNING) == [], "nothing was run again"
    no_connection_out(db)


async def test_a_nested_begin_reads_the_attempt_of_its_run(
    counters: Counters, racy_db: Database[Any], checker: Engine
) -> None:
    """Code in a helper's own ``db.begin()`` must see which attempt of the run it is part
    of (to log it, or to skip what the first attempt did), not always 1."""
    db = racy_db
    seen: list[int] = []

    def note_attempt_sync() -> None:
        with db.begin():
            seen.append(db.attempt)

    async def note_attempt_async() -> None:
        async with db.begin():
            seen.append(db.attempt)

    def work(session: Session) -> str:
        note_attempt_sync()
        if len(seen) == 1:
            lose_race(session, checker)
        session.execute(INCREMENT, {"id": 2})
        return "done"

    async def work_async(session: AsyncSession) -> str:
        await note_attempt_async()
        if len(seen) == 1:
            await session.run_sync(lose_race, checker)
        await session.execute(INCREMENT, {"id": 2})
        return "done"

    assert await run_either(db, work, work_async, retries=3) == "done"
    assert seen == [1, 2]
    assert counters() == {1: 1, 2: 1}
    no_connection_out(db)


# -- a failed commit that is not run again is logged ------------------------------------------


@pytest.mark.parametrize("why", ["no_retry", "committed_itself"])
async def test_a_failed_commit_not_run_again_is_logged_as_an_error(
    backend: Backend,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
    why: str,
) -> None:
    """A commit that lost its race is logged only as the retry it leads to: when no retry
    follows, despite retries left, it must be logged as the failed commit it is."""
    db = racy_db
    with checker.begin() as connection:
        connection.execute(sa.text("INSERT INTO items (name) VALUES ('x')"))
    calls: list[int] = []

    def work(session: Session) -> None:
        calls.append(db.attempt)
        if why == "no_retry":
            db.no_retry()  # e.g. a payment API was called
        else:
            session.add(Item(name="committed"))
            session.commit()
        lose_race_at_commit(session, checker)

    async def work_async(session: AsyncSession) -> None:
        calls.append(db.attempt)
        if why == "no_retry":
            db.no_retry()
        else:
            session.add(Item(name="committed"))
            await session.commit()
        await session.run_sync(lose_race_at_commit, checker)

    with (
        caplog.at_level(logging.WARNING, logger="sessionscope"),
        pytest.raises(DBAPIError) as raised,
    ):
        await run_either(db, work, work_async, retries=2)
    assert driver_code(backend, raised.value) == RACE_CODE[backend.name], "a retryable code"
    assert calls == [1]
    expected = ["theirs", "committed"] if why == "committed_itself" else ["theirs"]
    assert rows() == expected
    assert logged(caplog, logging.WARNING) == [], "nothing was run again"
    errors = logged(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert "Commit failed" in errors[0]
    no_connection_out(db)


# -- which errors are the lost race -----------------------------------------------------------


class Refused(Exception):
    """The application's own decision, taken while handling a lost race."""


@pytest.mark.parametrize("how", ["while_handling", "from_none"])
async def test_an_app_error_raised_while_handling_a_lost_race_is_not_run_again(
    counters: Counters, racy_db: Database[Any], checker: Engine, how: str
) -> None:
    """The app decided what a lost race means here (a refusal, or a bug in its fallback):
    running its work again would repeat that decision, or hide the bug."""
    db = racy_db
    calls: list[int] = []

    def fall_back() -> int:
        if how == "from_none":
            raise Refused("try again later") from None
        fallback: dict[str, int] = {}
        return fallback["missing"]  # a bug in the fallback path

    def work(session: Session) -> int:
        calls.append(db.attempt)
        try:
            lose_race(session, checker)
        except DBAPIError:
            return fall_back()
        return 0

    async def work_async(session: AsyncSession) -> int:
        calls.append(db.attempt)
        try:
            await session.run_sync(lose_race, checker)
        except DBAPIError:
            return fall_back()
        return 0

    with pytest.raises(Refused if how == "from_none" else KeyError):
        await run_either(db, work, work_async, retries=3)
    assert calls == [1]
    assert counters() == {1: 1, 2: 0}
    no_connection_out(db)


async def test_an_app_error_raised_from_a_lost_race_runs_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An app that wraps the driver's error in its own (``raise ... from error``) says the
    lost race is the cause: the work must still run again."""
    db = racy_db
    calls: list[int] = []

    def work(session: Session) -> str:
        calls.append(db.attempt)
        if len(calls) == 1:
            try:
                lose_race(session, checker)
            except DBAPIError as error:
                raise Refused("conflict") from error
        session.execute(INCREMENT, {"id": 1})
        return "done"

    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        assert await run_work(db, work, retries=3) == "done"
    assert calls == [1, 2]
    assert counters() == {1: 2, 2: 0}, "the other transaction's increment, then the retry's"
    assert len(logged(caplog, logging.WARNING)) == 1
    no_connection_out(db)


# -- MariaDB: a deadlock inside a savepoint ---------------------------------------------------


@pytest.fixture
def ten_rows(checker: Engine) -> Iterator[Callable[[], list[int]]]:
    """A table of ten counters (ids 1 to 10, all 0); returns a reader of counters 1 and 2."""
    with checker.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS savepoint_counters"))
        connection.execute(
            sa.text("CREATE TABLE savepoint_counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        )
        values = ", ".join(f"({i}, 0)" for i in range(1, 11))
        connection.execute(sa.text(f"INSERT INTO savepoint_counters (id, n) VALUES {values}"))

    def read() -> list[int]:
        with checker.connect() as connection:
            query = sa.text("SELECT n FROM savepoint_counters WHERE id IN (1, 2) ORDER BY id")
            return [int(n) for n in connection.scalars(query)]

    yield read
    with checker.begin() as connection:
        connection.execute(sa.text("DROP TABLE savepoint_counters"))


LOCK_WAIT_GUARD = sa.text("SET SESSION innodb_lock_wait_timeout = 5")
ADD_TEN = sa.text("UPDATE savepoint_counters SET n = n + 10 WHERE id = :id")


def wait_for_lock_wait(checker: Engine, thread_id: int) -> None:
    """Until the server's connection ``thread_id`` waits for a row lock."""
    query = sa.text(
        "SELECT count(*) FROM information_schema.innodb_trx"
        " WHERE trx_mysql_thread_id = :id AND trx_state = 'LOCK WAIT'"
    )
    deadline = time.monotonic() + LONG_WAIT
    while True:
        with checker.connect() as connection:
            if connection.scalar(query, {"id": thread_id}):
                return
        assert time.monotonic() < deadline, "the other transaction never waited for row 1"
        time.sleep(0.01)


@mariadb_both
async def test_a_deadlock_inside_a_savepoint_runs_again(
    make_db: DatabaseFactory,
    checker: Engine,
    ten_rows: Callable[[], list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deadlock rolls MariaDB's whole transaction back, so leaving the savepoint fails
    too (1305): the lost race behind that failure must still run again."""
    db = make_db()
    attempts: list[int] = []
    other_id: list[int] = []
    other_errors: list[BaseException] = []
    started, proceed = threading.Event(), threading.Event()

    def other() -> None:
        """A bigger transaction (nine rows), so that InnoDB picks the unit as the victim."""
        try:
            with checker.begin() as connection:
                other_id.append(int(connection.scalar(sa.text("SELECT CONNECTION_ID()")) or 0))
                connection.execute(LOCK_WAIT_GUARD)
                connection.execute(sa.text("UPDATE savepoint_counters SET n = n + 1 WHERE id >= 2"))
                started.set()
                proceed.wait(LONG_WAIT)
                # Waits for the unit's row 1: the unit then waits for row 2, a deadlock.
                connection.execute(sa.text("UPDATE savepoint_counters SET n = n + 1 WHERE id = 1"))
        except BaseException as exc:  # pragma: no cover - reported below
            other_errors.append(exc)
            started.set()

    def work(session: Session) -> None:
        attempts.append(db.attempt)
        session.execute(LOCK_WAIT_GUARD)
        session.execute(ADD_TEN, {"id": 1})
        if len(attempts) == 1:
            proceed.set()
            wait_for_lock_wait(checker, other_id[0])
        with session.begin_nested():
            session.execute(ADD_TEN, {"id": 2})

    async def work_async(session: AsyncSession) -> None:
        attempts.append(db.attempt)
        await session.execute(LOCK_WAIT_GUARD)
        await session.execute(ADD_TEN, {"id": 1})
        if len(attempts) == 1:
            proceed.set()
            await anyio.to_thread.run_sync(wait_for_lock_wait, checker, other_id[0])
        async with session.begin_nested():
            await session.execute(ADD_TEN, {"id": 2})

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert await anyio.to_thread.run_sync(started.wait, LONG_WAIT)
        with caplog.at_level(logging.WARNING, logger="sessionscope"):
            await run_either(db, work, work_async, retries=3)
    finally:
        proceed.set()
        await anyio.to_thread.run_sync(thread.join, LONG_WAIT)
    assert other_errors == []
    assert attempts == [1, 2]
    assert ten_rows() == [11, 11], "the other's increments and the retry's, once each"
    warnings_logged = logged(caplog, logging.WARNING)
    assert len(warnings_logged) == 1, warnings_logged
    assert "MySQL 1213" in warnings_logged[0]
    no_connection_out(db)


# -- misuse -------------------------------------------------------------------------------------


@sqlite_sync
def test_a_coroutine_function_given_to_run_is_refused(make_db: DatabaseFactory, rows: Rows) -> None:
    """An ``async def`` given to the sync ``db.run`` would run after its unit ended, or
    never: it must fail at once, name ``run_async``, and leave no "never awaited" warning."""
    db = make_db()
    ran: list[int] = []

    async def work(session: Session) -> None:
        ran.append(1)  # pragma: no cover - never runs
        session.add(Item(name="lost"))  # pragma: no cover

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="run_async"):
            _ = db.run(work)
        gc.collect()  # the coroutine, kept by the traceback until now, is finalized
    never_awaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == []
    assert ran == []
    assert rows() == []
    no_connection_out(db)


# -- a very large retries -----------------------------------------------------------------------


@sqlite_both
async def test_a_very_large_retries_runs_again_until_the_race_is_won(
    counters: Counters, racy_db: Database[Any], checker: Engine
) -> None:
    """A huge ``retries`` ("retry until it works") must behave as a small one: the work
    runs again until it wins, and its result is returned."""
    db = racy_db
    calls: list[int] = []

    def work(session: Session) -> str:
        calls.append(db.attempt)
        if len(calls) <= 2:
            lose_race(session, checker)
        session.execute(INCREMENT, {"id": 1})
        return "done"

    assert await run_work(db, work, retries=10_000) == "done"
    assert calls == [1, 2, 3]
    assert counters() == {1: 3, 2: 0}
    no_connection_out(db)


# Past attempt 1025 an uncapped doubling of the first wait no longer fits in a float.
MANY_LOST_RACES = 1030


@sqlite_sync
def test_backoff_stays_bounded_after_a_thousand_lost_races(
    backend: Backend,
    make_db: DatabaseFactory,
    rows: Rows,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run that loses more than a thousand races must still wait at most a second between
    attempts and finally win, never die of an overflow in its backoff.

    The write lock is held by another connection (SQLite's busy timeout 0: each attempt
    loses at once); the waits are recorded rather than slept, so that the run takes
    seconds, not minutes.
    """
    db = make_db(engine_options={"connect_args": {"timeout": 0}})
    holder = sqlite3.connect(backend.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waits: list[float] = []
    calls: list[int] = []

    def work(session: Session) -> str:
        calls.append(db.attempt)
        if db.attempt > MANY_LOST_RACES:
            holder.execute("ROLLBACK")
        session.add(Item(name="finally"))
        session.flush()
        return "done"

    monkeypatch.setattr(time, "sleep", waits.append)
    try:
        # A WARNING per lost race is what 'test_retry.py' checks: a thousand are not kept.
        with caplog.at_level(logging.ERROR, logger="sessionscope"):
            result = db.run(work, retries=10_000)
    finally:
        monkeypatch.undo()
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
    assert result == "done"
    assert len(calls) == MANY_LOST_RACES + 1
    assert len(waits) == MANY_LOST_RACES
    assert all(0 <= wait <= 1.0 for wait in waits), max(waits)
    assert rows() == ["finally"]
    assert logged(caplog, logging.ERROR) == []
    no_connection_out(db)


# -- typing: run and run_async are typed by the kind of session ---------------------------------


def sync_work(session: Session) -> int:
    return 1  # pragma: no cover - for the type checker only


async def async_work(session: AsyncSession) -> int:
    return 1  # pragma: no cover - for the type checker only


async def _typed_by_the_kind_of_session(
    sync_db: Database[Session], async_db: Database[AsyncSession]
) -> None:  # pragma: no cover - never called: mypy --strict checks it
    """Each wrong call below is an error for mypy --strict, which the ignore says; were it
    accepted, the ignore would be unused, which --strict reports as an error too."""
    sync_result: int = sync_db.run(sync_work)
    async_result: int = await async_db.run_async(async_work)
    async_db.run(sync_work)  # type: ignore[misc]
    await sync_db.run_async(async_work)  # type: ignore[misc]
    del sync_result, async_result
