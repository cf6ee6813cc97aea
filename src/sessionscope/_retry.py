"""Retrying a unit of work that lost a race with a concurrent transaction.

A serialization failure or a deadlock is not a bug of the unit: the database chose it as
the one to give up so that another could go on, and the same work run again usually
succeeds. Which errors those are is read from the driver's error code, never from the
exception's class (asyncpg's arrive as a plain ``DBAPIError``; a MariaDB deadlock and a
duplicate key are both an ``OperationalError`` or ``IntegrityError`` by driver whim).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError

if TYPE_CHECKING:
    from ._unit import Unit

__all__ = [
    "DEFAULT_BODY_LIMIT",
    "backoff",
    "check_body_limit",
    "check_retries",
    "log_retry",
    "rerun_code",
    "retry_code",
]

logger = logging.getLogger("sessionscope")

# PostgreSQL: serialization failure, deadlock detected.
_SQLSTATES = frozenset({"40001", "40P01"})
# MySQL and MariaDB: deadlock, lock wait timeout, record changed since the snapshot
# (MariaDB 11.6's snapshot isolation).
_MYSQL_CODES = frozenset({1213, 1205, 1020})
# SQLite primary result codes: busy (extended: busy snapshot 517, busy recovery 261...) and
# locked. The extended code's low byte is the primary one.
_SQLITE_CODES = frozenset({5, 6})

# Full jitter (a random wait between 0 and the bound), the bound doubling per attempt.
_FIRST_BOUND = 0.05
_LAST_BOUND = 1.0

# The request body a middleware keeps to hand to another attempt, in bytes.
DEFAULT_BODY_LIMIT = 1024 * 1024

# Set on a database error as it is raised (SQLAlchemy's, and the driver's it wraps): the
# engine it came from, and whether its connection committed each statement at once
# (AUTOCOMMIT: a unit that ran one stored it).
_ORIGIN = "sessionscope_origin"

# Set by a middleware in the request's scope or environ once its unit stored something: a
# middleware of another database around it must not run the request again.
STORED = "sessionscope.stored"

Ours = Callable[[Engine], bool]


@event.listens_for(Engine, "handle_error", insert=True)
def _note_origin(context: ExceptionContext) -> None:
    # On the Engine class, first: it runs before an app's own handlers (which may raise a
    # translated error 'from' the driver's, and end the chain), and costs nothing until an
    # error.
    error = context.sqlalchemy_exception
    if isinstance(error, DBAPIError) and context.engine is not None:
        connection = context.connection
        origin = (context.engine, connection is not None and _autocommits(connection))
        for raised in (error, context.original_exception):
            try:
                setattr(raised, _ORIGIN, origin)
            except (AttributeError, TypeError):  # an exception class without a __dict__
                continue


def _autocommits(connection: Connection) -> bool:
    level = connection.get_execution_options().get("isolation_level")
    if level is None:
        # 'create_engine(isolation_level=...)' is kept by the dialect, which gives it no
        # public reader.
        level = getattr(connection.dialect, "_on_connect_isolation_level", None)
    return level == "AUTOCOMMIT"


def rerun_code(unit: Unit | None, error: BaseException, ours: Ours | None = None) -> str | None:
    """The driver's code if ``unit`` failed with ``error`` for losing a race and will run
    again: runs remain for it, and nothing of it (nor of a unit nested in it) was stored.

    :param ours: whether an engine is one of the unit's database (an error of another
        database's, which may have stored something, is not this unit's race); None: the
        error came from the unit's own session.
    """
    if unit is None or not unit.retries_left or unit.no_retry or unit.commits:
        return None
    return retry_code(error, ours)


def retry_code(error: BaseException, ours: Ours | None = None) -> str | None:
    """The driver's code if ``error`` (or what it was raised from, or every error of a group
    of them) lost a race that running the unit again may win, for the log; else None."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup):
            # Tasks of the app's own (a task group) that all lost races.
            codes = [retry_code(inner, ours) for inner in current.exceptions]
            return codes[0] if all(codes) else None
        origin: tuple[Engine, bool] | None = getattr(current, _ORIGIN, None)
        if not isinstance(current, DBAPIError) and origin is None:
            # Raised from a lost race ('raise ... from'); an error merely met while handling
            # one (a bug in the app's fallback) is not run again.
            pending.append(current.__cause__)
            continue
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return None  # a disconnect: during a COMMIT its outcome is unknown
        if origin is not None and origin[1]:
            return None  # each statement was committed as it ran
        if ours is not None and (origin is None or not ours(origin[0])):
            return None  # another database's race
        # A DBAPIError, or the driver's own error it wraps (what an app's 'handle_error'
        # listener that translates errors raises its error from).
        code = _code_of(current.orig if isinstance(current, DBAPIError) else current)
        if code is not None:
            return code
        # A database error met while cleaning up after a lost race: MariaDB rolls a whole
        # transaction back on a deadlock, so the ROLLBACK TO SAVEPOINT that follows fails,
        # and its driver error was raised while the deadlock was being handled.
        for failed in (current, getattr(current, "orig", None)):
            if failed is not None and not failed.__suppress_context__:
                pending.append(failed.__context__)
    return None


def _code_of(orig: BaseException | None) -> str | None:
    if orig is None:
        return None
    args = getattr(orig, "args", ())
    if args and type(args[0]) is int:
        # pymysql, aiomysql and mysqlclient put the server's error number first (pymysql
        # also gives a SQLSTATE, HY000 for most: the number is what tells).
        return f"MySQL {args[0]}" if args[0] in _MYSQL_CODES else None
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str):
        return f"SQLSTATE {sqlstate}" if sqlstate in _SQLSTATES else None
    sqlite_code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(sqlite_code, int):
        return f"SQLite {sqlite_code}" if sqlite_code & 0xFF in _SQLITE_CODES else None
    return None


def check_retries(retries: object) -> int:
    """``retries`` if it is a whole number (0 or more), else a ValueError that says so."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(
            f"'retries' must be a whole number (0 or more) of times to run the work again,"
            f" not {retries!r}."
        )
    return retries


def check_body_limit(limit: object) -> int:
    """``limit`` if it is a whole number of bytes (0 or more), else a ValueError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(
            f"'retry_body_limit' must be a whole number of bytes (0 or more), not {limit!r}."
        )
    return limit


def backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: full jitter, bounded."""
    bound = min(_LAST_BOUND, _FIRST_BOUND * 2 ** min(attempt - 1, 16))
    return random.uniform(0, bound)


def log_retry(what: str, code: str, attempt: int, attempts: int) -> None:
    logger.warning(
        "%s lost a race with a concurrent transaction (%s) on attempt %d of %d;"
        " rolled back, running it again.",
        what,
        code,
        attempt,
        attempts,
    )
