"""SQLite with real transactions: the engines sessionscope creates send their own BEGIN.

pysqlite and aiosqlite keep a transaction control of their own: no transaction for a plain
SELECT (two reads of one unit may see two states of the file), and DDL committed at once (a
rolled-back unit keeps its ``CREATE TABLE``); a SAVEPOINT outside a transaction starts one
that its RELEASE commits. SQLAlchemy documents the remedy: the driver is told to keep out
(``isolation_level = None``) and every transaction begins with an explicit ``BEGIN``.

In WAL mode a deferred transaction that read and then writes fails at once with "database
is locked" (SQLITE_BUSY_SNAPSHOT, whatever the busy timeout) if another connection wrote in
between. A unit that will write therefore begins with ``BEGIN IMMEDIATE``: it takes the write
lock at its first statement, waiting for it up to the busy timeout, and then cannot fail so.
Which units will write is a guess made per unit (``Unit.writes``: a request whose method is
not a safe one), or the database's choice for every unit (``sqlite_begin``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, SingletonThreadPool, StaticPool

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
_AUTOCOMMIT = "sessionscope.autocommit"


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
    engine: Engine | AsyncEngine, mode: SqliteBegin, writes: Callable[[], bool]
) -> None:
    """Make ``engine`` (SQLite) begin every transaction itself.

    :param mode: ``"deferred"``: always ``BEGIN``; ``"immediate"``: always ``BEGIN
        IMMEDIATE``; ``"auto"``: ``BEGIN IMMEDIATE`` when ``writes()`` says the running code's
        unit will write, else ``BEGIN``.
    """
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    sync_engine.__dict__[_SENDS_BEGIN] = True
    event.listen(sync_engine, "connect", _keep_driver_out)

    def begin(connection: Connection) -> None:
        if _autocommit(connection):
            return
        dbapi_connection: Any = connection.connection.dbapi_connection
        if dbapi_connection.isolation_level is not None:
            # Reset by SQLAlchemy when a connection that used an isolation level option
            # came back to the pool: keep the driver out again.
            dbapi_connection.isolation_level = None
        immediate = mode == "immediate" or (mode == "auto" and writes())
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    event.listen(sync_engine, "begin", begin)


def sends_begin(engine: Engine) -> bool:
    """Whether ``engine`` begins its transactions itself (``use_transactions``)."""
    return bool(engine.__dict__.get(_SENDS_BEGIN))


def _keep_driver_out(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # The driver already out at connect: the engine was created with
    # 'isolation_level="AUTOCOMMIT"', which SQLAlchemy applied first.
    record.info[_AUTOCOMMIT] = dbapi_connection.isolation_level is None
    dbapi_connection.isolation_level = None


def _autocommit(connection: Connection) -> bool:
    # Asked for on the connection (or its engine's execution options), or for the whole
    # engine: no transaction wanted.
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return True
    return bool(connection.info.get(_AUTOCOMMIT))
