"""What a transaction did on its connections, seen through the engine's events.

Three questions decide how a unit of work ends, and SQLAlchemy answers none of them
publicly: did the transaction write (a COMMIT of one that did not cannot wait on a lock),
did a statement fail inside it without a rollback (PostgreSQL then answers COMMIT with a
silent ROLLBACK, and a MariaDB deadlock has already rolled everything back), and did its
COMMIT succeed (a listener that raises afterwards must not turn stored data into an error).
Listeners on the engine keep the answers in a ``Record`` per connection, reset when the
connection begins a transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.selectable import CompoundSelect, Select

__all__ = ["Record", "committed", "failed", "record_of", "records", "watch", "wrote"]

_KEY = "sessionscope.record"
_WATCHED = "sessionscope.watched"


class Record:
    """What one connection's current transaction did."""

    __slots__ = ("commit_failed", "commit_sent", "depth", "failed_at", "wrote")

    def __init__(self) -> None:
        self.wrote = False
        # Savepoints open now, and how deep the first failed statement was (None: none failed).
        self.depth = 0
        self.failed_at: int | None = None
        self.commit_sent = False
        self.commit_failed = False


def record_of(connection: Connection) -> Record:
    """The record of ``connection``'s current transaction (a fresh one if it has none)."""
    info = connection.info
    record: Record | None = info.get(_KEY)
    if record is None:
        record = info[_KEY] = Record()
    return record


def watch(engine: Engine | AsyncEngine) -> None:
    """Keep a ``Record`` for every transaction of ``engine`` (once per engine)."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if sync_engine.__dict__.get(_WATCHED):
        return
    sync_engine.__dict__[_WATCHED] = True
    event.listen(sync_engine, "begin", _begin)
    event.listen(sync_engine, "before_cursor_execute", _before_execute)
    event.listen(sync_engine, "handle_error", _error)
    event.listen(sync_engine, "commit", _commit)
    event.listen(sync_engine, "savepoint", _savepoint)
    event.listen(sync_engine, "rollback_savepoint", _rollback_savepoint)
    event.listen(sync_engine, "release_savepoint", _release_savepoint)


def records(connections: Iterable[Connection]) -> list[Record | None]:
    """The records of these connections' transactions; None for one closed or invalidated
    (a disconnect): what its transaction did is gone with it.
    """
    return [
        None if connection.closed or connection.invalidated else record_of(connection)
        for connection in connections
    ]


def wrote(connections: Iterable[Connection]) -> bool:
    """Whether anything but a plain SELECT ran in these connections' transactions."""
    return any(record is None or record.wrote for record in records(connections))


def failed(connections: Iterable[Connection]) -> bool:
    """Whether a statement failed in these transactions, outside a savepoint rolled back since."""
    return any(record is None or record.failed_at is not None for record in records(connections))


def committed(taken: list[Record | None]) -> bool:
    """Whether the database acknowledged the COMMIT of every transaction ``records()`` took.

    Taken before the COMMIT: by the time ``commit()`` has raised, its connections may be
    back in the pool.
    """
    return bool(taken) and all(
        record is not None and record.commit_sent and not record.commit_failed for record in taken
    )


# -- the listeners --------------------------------------------------------------------------


def _begin(connection: Connection) -> None:
    connection.info[_KEY] = Record()


def _before_execute(
    connection: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    record = record_of(connection)
    if record.wrote:
        return
    compiled = getattr(context, "compiled", None)
    # Only a SELECT built with SQLAlchemy counts as a read: text() and driver SQL may be
    # anything. A SELECT that calls a function with side effects is the one blind spot.
    if compiled is None or not isinstance(compiled.statement, Select | CompoundSelect):
        record.wrote = True


def _error(context: ExceptionContext) -> None:
    connection = context.connection
    if connection is None or context.sqlalchemy_exception is None:
        return  # not the database's error (a cancellation, a bug in a listener)
    record = record_of(connection)
    if record.commit_sent:
        record.commit_failed = True
    elif record.failed_at is None or record.depth < record.failed_at:
        record.failed_at = record.depth


def _commit(connection: Connection) -> None:
    record_of(connection).commit_sent = True


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
