"""What a transaction did on its connections, seen through the engine's events.

Two questions decide how a unit of work ends, and SQLAlchemy answers neither publicly: did
the transaction only read (only then can its COMMIT or ROLLBACK not wait, on any backend),
and did a statement fail inside it without a rollback since (PostgreSQL then answers COMMIT
with a silent ROLLBACK, and a MariaDB deadlock has already rolled everything back).
Listeners keep the answers in a ``Record`` per connection, made anew when the connection is
checked out of the pool (a unit's session checks its connection out for each transaction
and gives it back at its end).

The listeners are the dialect's (``do_execute``: every statement, savepoints included, as
the SQL sent) and the pool's, not the engine's: any listener on the engine sends every
statement through SQLAlchemy's event-aware paths, which cost a read unit about a sixth of
its instructions (957k against 784k per ``db.begin()`` read on SQLite, in-process callgrind).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["KEY", "Record", "failed", "record_of", "watch", "wrote"]

KEY = "sessionscope.record"
_WATCHED = "sessionscope.watched"


class Record:
    """What one connection's current transaction did."""

    __slots__ = ("depth", "failed_at", "wrote")

    def __init__(self) -> None:
        self.wrote = False
        # Savepoints open now, and how deep the first failed statement was (None: none failed).
        self.depth = 0
        self.failed_at: int | None = None


def record_of(connection: Connection) -> Record:
    """The record of ``connection``'s current transaction (a fresh one if it has none)."""
    info = connection.info
    record: Record | None = info.get(KEY)
    if record is None:
        record = info[KEY] = Record()
    return record


def watch(engine: Engine | AsyncEngine) -> bool:
    """Keep a ``Record`` for every transaction of ``engine``; False if it was watched already."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if sync_engine.__dict__.get(_WATCHED):
        return False
    sync_engine.__dict__[_WATCHED] = True
    event.listen(sync_engine.pool, "checkout", _checkout)
    dialect = sync_engine.dialect
    event.listen(dialect, "do_execute", _execute)
    event.listen(dialect, "do_execute_no_params", _execute_no_params)
    event.listen(dialect, "do_executemany", _execute)
    return True


def _records(connections: Iterable[Connection]) -> list[Record | None]:
    # None for a connection that was closed or invalidated (a disconnect): what its
    # transaction did is gone with it.
    return [
        None if connection.closed or connection.invalidated else record_of(connection)
        for connection in connections
    ]


def wrote(connections: Iterable[Connection]) -> bool:
    """Whether anything but a plain SELECT ran in these connections' transactions."""
    return any(record is None or record.wrote for record in _records(connections))


def failed(connections: Iterable[Connection]) -> bool:
    """Whether a statement failed in these transactions, outside a savepoint rolled back since."""
    return any(record is None or record.failed_at is not None for record in _records(connections))


# -- the listeners --------------------------------------------------------------------------


def _checkout(dbapi_connection: Any, pool_record: Any, proxy: Any) -> None:
    pool_record.info[KEY] = Record()


def _execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    _seen(context.root_connection, statement)
    return False  # not executed here: the dialect executes it as always


def _execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
    _seen(context.root_connection, statement)
    return False


def _seen(connection: Connection, statement: str) -> None:
    try:
        info = connection.info
    except NotImplementedError:
        return  # the dialect's first connect (it reads the server's version): no unit's
    record: Record | None = info.get(KEY)
    if record is None:
        record = info[KEY] = Record()
    if not record.wrote and not reads_only(statement):
        record.wrote = True
    if record.wrote:
        # Savepoints, as SQLAlchemy sends them ('begin_nested()') or as the app does.
        head = statement.lstrip()[:24].upper()
        if head.startswith("SAVEPOINT "):
            _savepoint(record)
        elif head.startswith("ROLLBACK TO "):
            _rollback_savepoint(record)
        elif head.startswith("RELEASE "):
            _release_savepoint(record)


# Row locks: a transaction that took one gets a transaction id, and on PostgreSQL its COMMIT
# then waits for a synchronous standby like any write's.
_LOCKS = ("FOR UPDATE", "FOR SHARE", "FOR NO KEY UPDATE", "FOR KEY SHARE", "LOCK IN SHARE MODE")


def reads_only(statement: str) -> bool:
    """Whether ``statement`` is a SELECT that takes no row lock.

    Judged on the SQL sent, whatever built it: a data-modifying CTE starts with WITH, and
    counts as a write. A SELECT that calls a function with side effects is the one case
    this cannot see.
    """
    head = statement.lstrip()[:6]
    if head.upper() != "SELECT":
        return False
    upper = statement.upper()
    return not any(lock in upper for lock in _LOCKS)


# On the Engine class, not on each engine: SQLAlchemy calls class-level handlers first, and
# a handler of the app's that raises (to translate the error) ends the chain.
@event.listens_for(Engine, "handle_error")
def _error(context: ExceptionContext) -> None:
    connection = context.connection
    if (
        connection is None
        # Only the database's own errors: not a cancellation, not a value that failed to
        # convert before it was sent.
        or not isinstance(context.sqlalchemy_exception, DBAPIError)
        or not context.engine.__dict__.get(_WATCHED)
    ):
        return
    record = record_of(connection)
    if record.failed_at is None or record.depth < record.failed_at:
        record.failed_at = record.depth


def _savepoint(record: Record) -> None:
    record.depth += 1


def _rollback_savepoint(record: Record) -> None:
    if record.failed_at is not None and record.failed_at >= record.depth:
        record.failed_at = None  # the failure was confined to this savepoint
    record.depth = max(record.depth - 1, 0)


def _release_savepoint(record: Record) -> None:
    record.depth = max(record.depth - 1, 0)
    if record.failed_at is not None and record.failed_at > record.depth:
        record.failed_at = record.depth  # released: the failure now belongs to the outer level
