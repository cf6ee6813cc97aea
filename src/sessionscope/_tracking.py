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

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection

__all__ = ["KEY", "Record", "failed", "record_of", "watch", "wrote"]

KEY = "sessionscope.record"
_WATCHED = "sessionscope.watched"


class Record:
    """What one connection's current transaction did."""

    __slots__ = ("failed_at", "savepoints", "wrote")

    def __init__(self) -> None:
        self.wrote = False
        # The savepoints open now, by name, and how deep the first failed statement was
        # (None: none failed).
        self.savepoints: list[str] = []
        self.failed_at: int | None = None

    @property
    def depth(self) -> int:
        return len(self.savepoints)


def record_of(connection: Connection | PoolProxiedConnection) -> Record:
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
    dispatch = dialect.dispatch
    if (
        any(True for _ in dispatch.do_execute)
        or any(True for _ in dispatch.do_executemany)
        or any(True for _ in dispatch.do_execute_no_params)
    ):
        # A listener of the app's may execute a statement itself, and then the dialect's
        # listeners after it never see it: this engine's statements are seen before them.
        event.listen(sync_engine, "before_cursor_execute", _before_cursor_execute)
        return True
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


def _before_cursor_execute(connection: Connection, cursor: Any, statement: str, *args: Any) -> None:
    _seen(connection, statement)


def _seen(connection: Connection, statement: str) -> None:
    try:
        record = record_of(connection)
    except NotImplementedError:
        return  # the dialect's first connect (it reads the server's version): no unit's
    if not record.wrote and not reads_only(statement):
        record.wrote = True
    if record.wrote and statement.lstrip()[:1] in _SAVEPOINT_STARTS:
        _savepoint_statement(record, statement)


# Savepoints, as SQLAlchemy sends them ('begin_nested()') or as the app writes them. Read
# by name: a ROLLBACK TO or RELEASE of a savepoint not seen opened forgives nothing.
_SAVEPOINT_STARTS = frozenset("SsRr/-")
_COMMENTS = re.compile(r"\s*(?:/\*.*?\*/|--[^\n]*(?:\n|$))", re.DOTALL)


def _savepoint_statement(record: Record, statement: str) -> None:
    position = 0
    while match := _COMMENTS.match(statement, position):
        position = match.end()  # a comment is never empty: this always moves on
    words = statement[position:].split(None, 4)[:4]
    keywords = [word.upper() for word in words]
    if len(words) >= 2 and keywords[0] == "SAVEPOINT":
        record.savepoints.append(_name(words[1]))
        return
    if keywords[:2] == ["ROLLBACK", "TO"]:
        rest = words[3:4] if keywords[2:3] == ["SAVEPOINT"] else words[2:3]
        if rest:
            _rollback_savepoint(record, _name(rest[0]))
    elif keywords[:1] == ["RELEASE"]:
        rest = words[2:3] if keywords[1:2] == ["SAVEPOINT"] else words[1:2]
        if rest:
            _release_savepoint(record, _name(rest[0]))


def _name(word: str) -> str:
    word = word.rstrip(";")
    if word[:1] in '"`[':
        return word.strip('"`[]')
    return word.lower()  # an unquoted name is case-insensitive


# Row locks: a transaction that took one gets a transaction id, and on PostgreSQL its COMMIT
# then waits for a synchronous standby like any write's.
# And a SELECT ... INTO writes: a new table (PostgreSQL), a file or variables (MySQL). Any
# whitespace between the words; a word "into" in a string literal errs the safe way.
_NOT_READS = re.compile(
    r"\bFOR\s+(?:NO\s+KEY\s+UPDATE|KEY\s+SHARE|UPDATE|SHARE)\b"
    r"|\bLOCK\s+IN\s+SHARE\s+MODE\b|\bINTO\b",
    re.IGNORECASE,
)


def reads_only(statement: str) -> bool:
    """Whether ``statement`` is a SELECT that takes no row lock and writes nothing.

    Judged on the SQL sent, whatever built it: a data-modifying CTE starts with WITH, and
    counts as a write. A SELECT that calls a function with side effects is the one case
    this cannot see.
    """
    head = statement.lstrip()[:6]
    if head.upper() != "SELECT":
        return False
    upper = statement.upper()
    if "FOR" not in upper and "LOCK" not in upper and "INTO" not in upper:
        return True  # most SELECTs: no need for the pattern's slower search
    return _NOT_READS.search(statement) is None


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


def _opened_at(record: Record, name: str) -> int | None:
    """How deep the savepoint ``name`` was opened (1: outermost), or None if it was not."""
    for index in range(len(record.savepoints) - 1, -1, -1):
        if record.savepoints[index] == name:
            return index + 1
    return None


def _rollback_savepoint(record: Record, name: str) -> None:
    depth = _opened_at(record, name)
    if depth is None:
        return
    if record.failed_at is not None and record.failed_at >= depth:
        record.failed_at = None  # the failure was confined to this savepoint
    del record.savepoints[depth - 1 :]


def _release_savepoint(record: Record, name: str) -> None:
    depth = _opened_at(record, name)
    if depth is None:
        return
    del record.savepoints[depth - 1 :]
    if record.failed_at is not None and record.failed_at > record.depth:
        record.failed_at = record.depth  # released: the failure now belongs to the outer level
