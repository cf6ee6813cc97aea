"""What a transaction did on its connections, seen through the engine's events.

Two questions decide how a unit of work ends, and SQLAlchemy answers neither publicly: did
the transaction only read (only then can its COMMIT or ROLLBACK not wait, on any backend),
and did a statement fail inside it without a rollback since (PostgreSQL then answers COMMIT
with a silent ROLLBACK, and a MariaDB deadlock has already rolled everything back).
Listeners on the engine keep the answers in a ``Record`` per connection, made anew when the
connection begins a transaction.
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
    event.listen(sync_engine, "begin", _begin)
    event.listen(sync_engine, "before_cursor_execute", _before_execute)
    event.listen(sync_engine, "savepoint", _savepoint)
    event.listen(sync_engine, "rollback_savepoint", _rollback_savepoint)
    event.listen(sync_engine, "release_savepoint", _release_savepoint)
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


def _begin(connection: Connection) -> None:
    connection.info[KEY] = Record()


def _before_execute(
    connection: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    record = record_of(connection)
    if not record.wrote and not reads_only(statement):
        record.wrote = True


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


def _savepoint(connection: Connection, name: str | None) -> None:
    record_of(connection).depth += 1


def _rollback_savepoint(connection: Connection, name: str, context: object) -> None:
    record = record_of(connection)
    if record.failed_at is not None and record.failed_at >= record.depth:
        record.failed_at = None  # the failure was confined to this savepoint
    record.depth = max(record.depth - 1, 0)


def _release_savepoint(connection: Connection, name: str, context: object) -> None:
    record = record_of(connection)
    record.depth = max(record.depth - 1, 0)
    if record.failed_at is not None and record.failed_at > record.depth:
        record.failed_at = record.depth  # released: the failure now belongs to the outer level
