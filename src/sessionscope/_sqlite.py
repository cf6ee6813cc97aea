"""SQLite with real transactions: the engines sessionscope creates send their own BEGIN.

pysqlite and aiosqlite keep a transaction control of their own: no transaction for a plain
SELECT (two reads of one unit may see two states of the file), and DDL committed at once (a
rolled-back unit keeps its ``CREATE TABLE``); a SAVEPOINT outside a transaction starts one
that its RELEASE commits. The remedy SQLAlchemy documents: every transaction begins with an
explicit ``BEGIN`` (see ``use_transactions`` for how it is sent here).

In WAL mode a deferred transaction that read and then writes fails at once with "database
is locked" (SQLITE_BUSY_SNAPSHOT, whatever the busy timeout) if another connection wrote in
between. A unit that will write therefore begins with ``BEGIN IMMEDIATE``: it takes the write
lock at its first statement, waiting for it up to the busy timeout, and then cannot fail so.
Which units will write is a guess made per unit (``Unit.writes``: a request whose method is
not a safe one), or the database's choice for every unit (``sqlite_begin``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection, SingletonThreadPool, StaticPool

from ._tracking import record_of

__all__ = [
    "BEGIN_MODES",
    "SqliteBegin",
    "can_use_transactions",
    "check_mode",
    "sends_begin",
    "use_transactions",
]

SqliteBegin = Literal["auto", "deferred", "immediate"]
BEGIN_MODES: tuple[SqliteBegin, ...] = ("auto", "deferred", "immediate")

_SENDS_BEGIN = "sessionscope.sends_begin"


def check_mode(mode: object, url: str | URL | None) -> SqliteBegin:
    """``mode`` if it is one of ``BEGIN_MODES`` and applies to ``url``; else a ValueError."""
    if mode not in BEGIN_MODES:
        raise ValueError(f"'sqlite_begin' must be 'auto', 'deferred' or 'immediate', not {mode!r}.")
    if mode != "auto" and url is not None and make_url(url).get_backend_name() != "sqlite":
        raise ValueError(
            f"'sqlite_begin={mode!r}' applies to SQLite databases only; remove it for"
            f" {make_url(url).render_as_string(hide_password=True)!r}."
        )
    return mode


def can_use_transactions(engine: Engine | AsyncEngine) -> bool:
    """Whether ``engine`` is SQLite with a connection per unit.

    A pool that shares one connection among units at once (``StaticPool``, as for an
    in-memory aiosqlite database, or ``SingletonThreadPool``) would send a second unit's
    BEGIN inside the first's transaction: such an engine keeps the driver's handling.
    """
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    return sync_engine.dialect.name == "sqlite" and not isinstance(
        sync_engine.pool, StaticPool | SingletonThreadPool
    )


def use_transactions(
    engine: Engine | AsyncEngine,
    mode: SqliteBegin,
    writes: Callable[[], bool],
    outer_locker: Callable[[bool], object | None],
) -> None:
    """Make ``engine`` (SQLite) begin every transaction itself.

    :param mode: ``"deferred"``: always ``BEGIN``; ``"immediate"``: always ``BEGIN
        IMMEDIATE``; ``"auto"``: ``BEGIN IMMEDIATE`` when ``writes()`` says the running code's
        unit will write, else ``BEGIN``.
    :param outer_locker: the live unit the running code's unit is nested in whose
        transaction holds the write lock (given whether every unit takes it), if any: a
        transaction of the nested unit would wait for that lock until the busy timeout.
    """
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    sync_engine.__dict__[_SENDS_BEGIN] = True

    def do_begin(dbapi_connection: PoolProxiedConnection) -> None:
        if dbapi_connection.dbapi_connection.isolation_level is None:  # type: ignore[union-attr]
            # AUTOCOMMIT (SQLAlchemy keeps the driver out for it), asked for on this
            # connection or for the whole engine: no transaction wanted.
            return
        if mode != "deferred":
            holder = outer_locker(mode == "immediate")
            if holder is not None:
                raise RuntimeError(_NESTED_WAITS.format(holder=holder, mode=mode))
        immediate = mode == "immediate" or (mode == "auto" and writes())
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        finally:
            cursor.close()
        if immediate:
            # It holds the write lock: outside WAL mode its COMMIT waits for the readers to go
            # even if it wrote nothing, so its end never runs on the event loop (rule 16).
            record_of(dbapi_connection).wrote = True

    # The dialect's own 'do_begin' (SQLAlchemy calls it as every transaction begins; for
    # SQLite it does nothing), replaced on this engine's dialect object only. Not the
    # engine's "begin" event of SQLAlchemy's recipe: any engine-level listener sends every
    # statement through SQLAlchemy's event-aware paths, and BEGIN through
    # 'exec_driver_sql' costs a statement's machinery: a read unit cost 915k instructions
    # that way, 698k this way, against 666k with the driver's own handling (in-process
    # callgrind, 'db.begin()' read units on an SQLite file). A failed BEGIN ("database is
    # locked" after the busy timeout) is raised as SQLAlchemy's error, with the driver's
    # code. The driver's transaction
    # handling stays on: a transaction this BEGIN opened is one it neither opens again
    # before a write nor commits before DDL, and its commit() sends COMMIT.
    sync_engine.dialect.do_begin = do_begin  # type: ignore[method-assign]


_NESTED_WAITS = (
    "This unit of work is nested in {holder!r}, whose SQLite transaction holds the write"
    " lock (it began with BEGIN IMMEDIATE: sqlite_begin={mode!r}, which gives it to the"
    " requests whose method is not a safe one), and SQLite lets one transaction write at a"
    " time: this one would wait for a lock released only after it ends. Write in the outer"
    " unit's own session ('db.session'), open this unit after the outer one ended, or"
    " create the Database with sqlite_begin='deferred'."
)


def sends_begin(engine: Engine) -> bool:
    """Whether ``engine`` begins its transactions itself (``use_transactions``)."""
    return bool(engine.__dict__.get(_SENDS_BEGIN))
