"""Pool exhaustion: a request that got no connection in time is told to come back later.

When every pooled connection is taken, SQLAlchemy's pool waits ``pool_timeout`` seconds (30
by default) and raises ``sqlalchemy.exc.TimeoutError``. That is not a bug of the request
but a busy server, so the adapters answer ``503 Service Unavailable`` with ``Retry-After``
instead of a 500 with a traceback, whether the error escaped the app, the app's own error
handling turned it into a 500, or the commit met it.

An app may catch the error and answer something else, so the adapters cannot rely on seeing
it: the pool reports every timeout to the unit of work it happened in (``Unit.exhausted``).
The pool has no event for a timeout; its ``connect()``, the one way to a pooled connection,
is wrapped per pool instead, and the wrapper is put on the new pool an engine makes when it
is disposed.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

__all__ = [
    "BODY",
    "HEADERS",
    "PoolTimeout",
    "check_retry_after",
    "is_pool_timeout",
    "report",
    "watch",
]

logger = logging.getLogger("sessionscope")

BODY = b"Service Unavailable"
HEADERS = (("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(BODY))))

# The engines watched, each with what to call when its pool times out (weakly: a Database
# sharing an engine with others must not be kept alive by it), and the pools wrapped.
_engines: weakref.WeakKeyDictionary[Engine, list[weakref.WeakMethod[Callable[[], None]]]]
_engines = weakref.WeakKeyDictionary()
_wrapped: weakref.WeakSet[Pool] = weakref.WeakSet()


def watch(engine: Engine | AsyncEngine, on_timeout: Callable[[], None]) -> None:
    """Call ``on_timeout()`` (a bound method) in the code whose checkout from ``engine``'s
    pool timed out."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    listeners = _engines.setdefault(sync_engine, [])
    if not any(listener() == on_timeout for listener in listeners):
        listeners.append(weakref.WeakMethod(on_timeout))
    _wrap_new_pools()


# Any engine's dispose (its own, or of an engine made by 'execution_options()', which shares
# its pool) makes a new pool: wrap every watched engine's pool that is not wrapped yet.
@event.listens_for(Engine, "engine_disposed")
def _disposed(engine: Engine) -> None:
    _wrap_new_pools()


def _wrap_new_pools() -> None:
    for engine, listeners in list(_engines.items()):
        pool = engine.pool
        if pool not in _wrapped:
            _wrapped.add(pool)
            _wrap(pool, listeners)


def _wrap(pool: Pool, listeners: list[weakref.WeakMethod[Callable[[], None]]]) -> None:
    connect = pool.connect

    def connect_or_report() -> Any:
        try:
            return connect()
        except PoolTimeout:
            for listener in list(listeners):
                method = listener()
                if method is not None:
                    method()
            raise

    # An attribute of this pool object only: the pool class and other pools are untouched.
    pool.connect = connect_or_report  # type: ignore[method-assign]


def is_pool_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a pool timeout, or was raised from one (``raise ... from``).

    Not an error merely raised while one was being handled: a bug met after the app
    recovered from a timeout is a bug, and keeps its traceback.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, PoolTimeout):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


def check_retry_after(retry_after: object) -> int:
    """``retry_after`` if it is a whole number of seconds, else a ValueError that says so."""
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ValueError(
            f"'retry_after' must be a whole number of seconds (0 or more), not"
            f" {retry_after!r}: it is sent as the 503's 'Retry-After' header."
        )
    return retry_after


def report(method: str, path: str, url: str, retry_after: int) -> None:
    """Log the 503 once, without a traceback: a busy pool is not a bug of the request."""
    logger.warning(
        "%s %s got no connection to %s within the pool's timeout: answered 503 (Retry-After: %d)."
        " Raise 'pool_size', 'max_overflow' or 'pool_timeout' in 'engine_options' if this"
        " is frequent.",
        method,
        path,
        url,
        retry_after,
    )
