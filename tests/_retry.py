"""What the ``db.run()`` tests share: the counters table, a database whose units really lose
races, the error code a lost race carries, and running work on either kind of database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope import Database

from .conftest import Backend, DatabaseFactory

T = TypeVar("T")

# Waits that only run out in a failed run.
LONG_WAIT = 10.0

READ = sa.text("SELECT n FROM retry_counters WHERE id = :id")
INCREMENT = sa.text("UPDATE retry_counters SET n = n + 1 WHERE id = :id")

# The code the driver gives the error of a unit of ``racy_db`` that lost its race.
RACE_CODE: dict[str, object] = {"postgresql": "40001", "mariadb": 1020, "sqlite": 517}

# What the retry line names when a request of ``racy_database`` loses its race to
# ``lose_race`` (the raised error carries ``RACE_CODE``).
RACE_LOG = {"postgresql": "SQLSTATE 40001", "mariadb": "MySQL 1020", "sqlite": "SQLite 517"}
# ... and when it loses to a concurrent request: SQLite refuses a stale snapshot's write
# (517), or the write of a read transaction while another connection holds the write lock
# (5, at once: SQLite does not wait for it, whatever the busy timeout).
CONCURRENT_LOG = {
    "postgresql": {"SQLSTATE 40001"},
    "mariadb": {"MySQL 1020"},
    "sqlite": {"SQLite 5", "SQLite 517"},
}
DEADLOCK_LOG = {"postgresql": "SQLSTATE 40P01", "mariadb": "MySQL 1213"}

Counters = Callable[[], dict[int, int]]


# -- tables, databases, logs ----------------------------------------------------------------


def counter_table(checker: Engine) -> Iterator[Counters]:
    """A table of two counters (ids 1 and 2, both 0); returns a reader of their values."""
    with checker.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS retry_counters"))
        connection.execute(
            sa.text("CREATE TABLE retry_counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        )
        connection.execute(sa.text("INSERT INTO retry_counters (id, n) VALUES (1, 0), (2, 0)"))

    def read() -> dict[int, int]:
        with checker.connect() as connection:
            found = connection.execute(sa.text("SELECT id, n FROM retry_counters"))
            return {int(key): int(value) for key, value in found}

    yield read
    with checker.begin() as connection:
        connection.execute(sa.text("DROP TABLE retry_counters"))


def use_wal(checker: Engine) -> None:
    """Put the SQLite file in WAL mode (it stays set in the file for every connection)."""
    with checker.connect() as connection:
        mode = connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
    assert mode == "wal"


def racy_database(backend: Backend, make_db: DatabaseFactory, checker: Engine) -> Database[Any]:
    """A database where a unit that read a row another transaction then changed and
    committed fails as soon as it writes that row (see ``lose_race``)."""
    if backend.name == "postgresql":
        return make_db(engine_options={"isolation_level": "SERIALIZABLE"})
    if backend.name == "mariadb":
        snapshot = "SET SESSION innodb_snapshot_isolation = ON"
        return make_db(engine_options={"connect_args": {"init_command": snapshot}})
    use_wal(checker)
    return make_db(sqlite_begin="deferred")


def lose_race(session: Session, checker: Engine) -> None:
    """Read counter 1, let another transaction increment it and commit, then write it: the
    unit's snapshot is stale, so its write fails with the backend's ``RACE_CODE``."""
    session.execute(READ, {"id": 1}).scalar_one()
    with checker.begin() as connection:
        connection.execute(INCREMENT, {"id": 1})
    session.execute(INCREMENT, {"id": 1})


def driver_code(backend: Backend, error: BaseException) -> object:
    """The code the driver gave ``error``: the SQLSTATE on PostgreSQL, SQLite's extended
    result code, MySQL's error number (pymysql also sets a ``sqlstate``, often HY000)."""
    assert isinstance(error, DBAPIError), f"not a DBAPIError: {error!r}"
    orig = error.orig
    assert orig is not None
    if backend.name == "postgresql":
        return getattr(orig, "sqlstate", None)
    if backend.name == "sqlite":
        return getattr(orig, "sqlite_errorcode", None)
    return orig.args[0]


def logged(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The messages the library logged at exactly ``level``."""
    return [
        r.getMessage() for r in caplog.records if r.name == "sessionscope" and r.levelno == level
    ]


def no_connection_out(db: Database[Any]) -> None:
    """No connection of ``db`` is checked out, and no unit or session of it is alive."""
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert db.live_units == 0
    assert db.live_sessions == 0


# -- running work the same way on either kind of database -----------------------------------


async def run_either(
    db: Database[Any],
    sync_fn: Callable[[Session], T],
    async_fn: Callable[[AsyncSession], Awaitable[T]],
    retries: int,
) -> T:
    """``db.run(sync_fn)`` or ``await db.run_async(async_fn)``, by the database's driver."""
    if db.is_async:
        return await db.run_async(async_fn, retries=retries)
    return db.run(sync_fn, retries=retries)


async def run_work(db: Database[Any], work: Callable[[Session], T], retries: int) -> T:
    """``run_either`` with the same work, given the ``AsyncSession``'s sync session there."""

    async def in_async(session: AsyncSession) -> T:
        return await session.run_sync(work)

    return await run_either(db, work, in_async, retries)
