"""Read replicas: a unit that only reads runs on a replica until its first write.

The decision is per unit, never per statement: a unit starts on a replica (a request with
a safe method, or one that asked: ``db.use_replica()``) and moves to the primary, for good,
at the first statement that is not known to only read (a flush, any INSERT, UPDATE or
DELETE, a ``SELECT ... FOR UPDATE``, a ``text()`` statement that is not a plain SELECT, a
bare ``session.connection()``), or when it asks (``db.use_primary()``). From then on
everything it runs, reads included, goes to the primary: it reads its own writes, and its
transaction is one transaction of the primary's. What it read on the replica stays in a
transaction of its own there, ended with the unit.

The routing is the session's ``get_bind``, replaced on each session of a database with
replicas (as ``_sessions.guard`` replaces ``close``), so that a session class of the app's
own (SQLModel's, say) keeps working, and threads and tasks of the unit share its state: it
lives on the unit, not in a ``ContextVar``.

A replica that cannot be reached is left out for a few seconds, and the unit that met it
reads from the primary instead: a replica that is down costs no request. A replica engine
that sessionscope creates pings its connections when it hands them out, so a connection
to a replica that restarted is replaced rather than failing the request's first statement.

A unit that moved holds a transaction on each server, and SQLAlchemy commits them in no
set order. The replica's only read, so its COMMIT failing (the replica went away since)
loses nothing: it is logged, never raised, or the primary's COMMIT, already made, would
be answered with an error (``ends_quietly``, for the connections the routing joined).

A unit that read from a replica and then writes has read what the replica had: the
routing cannot make a read-modify-write of a GET consistent. Such an endpoint should use
an unsafe method, or call ``db.use_primary()`` before it reads.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import CTE, TextualSelect

from ._config import safe_url
from ._tracking import reads_only

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ._unit import Unit

__all__ = [
    "COOKIE",
    "Replicas",
    "committing",
    "cookie_header",
    "ends_quietly",
    "reads",
    "route",
    "wrote_recently",
]

logger = logging.getLogger("sessionscope")

# The cookie that sends a client's requests to the primary for a while after it wrote.
COOKIE = "sessionscope_primary"
_COOKIE_BYTES = COOKIE.encode() + b"="

# Seconds a replica that could not be reached is left out.
DOWN_FOR = 5.0

# Marks a pooled connection's checkout as one the routing joined to a unit's transaction
# (in the connection's info, which the pool keeps per connection: cleared at checkin).
_READS = "sessionscope.replica_reads"
_QUIET = "sessionscope.quiet_commit"


class Replicas:
    """The replica engines of a database (their sync engines), and which are reachable."""

    __slots__ = ("_down", "_lock", "_turns", "engines")

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = tuple(engines)
        self._turns = itertools.cycle(range(len(self.engines)))
        self._down: dict[Engine, float] = {}
        self._lock = threading.Lock()
        for engine in self.engines:
            ends_quietly(engine)
            event.listen(engine, "handle_error", self._failed)
            event.listen(engine.pool, "checkin", _forget)

    def _failed(self, context: ExceptionContext) -> None:
        # The replica went away under a unit (a request reading from it fails once): leave
        # it out, so that the next units read from the primary.
        if context.is_disconnect and context.engine is not None:
            self.leave_out(context.engine, context.original_exception)

    def pick(self) -> Engine | None:
        """The next reachable replica, in turn; None if every one is left out."""
        with self._lock:
            now = time.monotonic()
            for _ in self.engines:
                engine = self.engines[next(self._turns)]
                until = self._down.get(engine)
                if until is None:
                    return engine
                if until <= now:
                    del self._down[engine]  # try it again
                    return engine
            return None

    def leave_out(self, engine: Engine, error: BaseException) -> None:
        """``engine`` could not be reached: give it no unit for ``DOWN_FOR`` seconds."""
        with self._lock:
            if self._down.get(engine, 0.0) > time.monotonic():
                return  # left out already: said once per period
            self._down[engine] = time.monotonic() + DOWN_FOR
        logger.warning(
            "Replica %s cannot be reached (%s); its reads go to the primary for %.0f s.",
            safe_url(engine.url),
            type(error.orig if isinstance(error, DBAPIError) else error).__name__,
            DOWN_FOR,
        )


def committing(connections: Iterable[Connection]) -> list[Connection]:
    """``connections`` but for the read transactions the routing joined on replicas."""
    return [connection for connection in connections if not connection.info.get(_READS)]


def _forget(dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info.pop(_READS, None)


def ends_quietly(engine: Engine) -> None:
    """Make a failed COMMIT of a read transaction the routing joined on ``engine``, a
    replica's, a warning rather than an error.

    Only statements known to read reach a replica through the routing, and a standby
    refuses writes anyway. Other COMMITs on the engine (code of the app's own using it)
    raise as before. The pool's reset of the connection fails in turn as it comes back, and
    the pool replaces it.
    """
    dialect = engine.dialect
    if getattr(dialect, _QUIET.replace(".", "_"), False):
        return  # an engine given twice, or to two databases
    commit = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        try:
            commit(dbapi_connection)
        except Exception:
            if not dbapi_connection.info.get(_READS):
                raise
            logger.warning(
                "Ending a read transaction on the replica %s failed; it only read, so"
                " nothing is lost.",
                safe_url(engine.url),
                exc_info=True,
            )

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    setattr(dialect, _QUIET.replace(".", "_"), True)


def reads(clause: object) -> bool:
    """Whether ``clause`` is a statement known to only read (a replica may run it)."""
    if clause is None:
        return False  # a flush, or a connection asked for: whatever it runs may write
    if isinstance(clause, TextClause):
        return reads_only(clause.text)
    if isinstance(clause, TextualSelect):
        element = clause.element  # the text() it was made from
        return isinstance(element, TextClause) and reads_only(element.text)
    if not getattr(clause, "is_select", False):
        return False
    # 'with_for_update()' keeps its lock there; SQLAlchemy gives it no public reader.
    if getattr(clause, "_for_update_arg", None) is not None:
        return False
    # A SELECT of a CTE that writes ('insert(...).returning(...).cte()').
    return not any(
        isinstance(element, CTE) and isinstance(element.element, UpdateBase)
        for element in visitors.iterate(clause)  # type: ignore[arg-type]
    )


def route(session: Session, unit: Unit, replicas: Replicas) -> None:
    """Give ``session`` (``unit``'s; the sync one of an ``AsyncSession``) its routing."""
    primary_bind: Callable[..., Any] = session.get_bind

    def get_bind(mapper: Any = None, *, clause: Any = None, bind: Any = None, **kw: Any) -> Any:
        replica = unit.replica
        if replica is not None and bind is None:
            if not reads(clause):
                unit.replica = None  # to the primary, for good
            elif _connects(session, replica, replicas):
                return replica
            else:
                unit.replica = None
        return primary_bind(mapper, clause=clause, bind=bind, **kw)

    session.get_bind = get_bind  # type: ignore[method-assign]


def _connects(session: Session, replica: Engine, replicas: Replicas) -> bool:
    """Join ``replica`` to the session's transaction (done once per transaction; a no-op
    after); False if it cannot be reached, which leaves it out for a while."""
    try:
        connection: Connection = session.connection(bind_arguments={"bind": replica})
    except (DBAPIError, OSError, PoolTimeout) as error:
        # OSError: asyncpg's connection errors are not wrapped as DBAPI ones.
        replicas.leave_out(replica, error)
        return False
    connection.info[_READS] = True
    return True


def wrote_recently(cookie_header: bytes | str | None) -> bool:
    """Whether a request's ``Cookie`` header carries the cookie set after a write."""
    if not cookie_header:
        return False
    if isinstance(cookie_header, bytes):
        if _COOKIE_BYTES not in cookie_header:
            return False  # most requests: no need to split the header
        cookie_header = cookie_header.decode("latin-1")
    return any(part.strip().startswith(COOKIE + "=") for part in cookie_header.split(";"))


def cookie_header(window: float) -> str:
    """The ``Set-Cookie`` value that sends the client's next requests to the primary."""
    return f"{COOKIE}=1; Max-Age={math.ceil(window)}; Path=/; HttpOnly; SameSite=Lax"
