"""Pool exhaustion: a request that got no connection in time is told to come back later.

When every pooled connection is taken, SQLAlchemy's pool waits ``pool_timeout`` seconds (30
by default) and raises ``sqlalchemy.exc.TimeoutError``. That is not a bug of the request
but a busy server, so the adapters answer ``503 Service Unavailable`` with ``Retry-After``
instead of a 500 with a traceback, whether the error escaped the app, the app's own error
handling turned it into a 500, or the commit met it.

An app may catch the error and answer something else, so the adapters cannot rely on seeing
it: the pool reports every timeout to the unit of work it happened in (``Unit.exhausted``).
The pool has no event for a timeout; the engine's ``raw_connection()``, the one way a
connection leaves its pool, is wrapped per engine instead.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

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

_LISTENERS = "sessionscope.pool_timeout_listeners"


def watch(engine: Engine | AsyncEngine, on_timeout: Callable[[], None]) -> None:
    """Call ``on_timeout()`` (a bound method, held weakly: a Database sharing an engine with
    others must not be kept alive by it) in the code whose checkout from ``engine``'s pool
    timed out."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    listeners: list[weakref.WeakMethod[Callable[[], None]]] | None
    listeners = sync_engine.__dict__.get(_LISTENERS)
    if listeners is None:
        listeners = sync_engine.__dict__[_LISTENERS] = []
        _wrap(sync_engine, listeners)
    if not any(listener() == on_timeout for listener in listeners):
        listeners.append(weakref.WeakMethod(on_timeout))


def _wrap(engine: Engine, listeners: list[weakref.WeakMethod[Callable[[], None]]]) -> None:
    # Every connection of the engine comes from 'raw_connection()' (a Connection calls it).
    # Wrapped on the engine object, it outlives the pools that 'dispose()' replaces. Not an
    # engine event: any engine-level listener sends every statement through SQLAlchemy's
    # event-aware paths, which cost a read unit about 145k instructions (callgrind).
    raw_connection = engine.raw_connection

    def raw_connection_or_report() -> Any:
        try:
            return raw_connection()
        except PoolTimeout:
            for listener in list(listeners):
                method = listener()
                if method is not None:
                    method()
            raise

    engine.raw_connection = raw_connection_or_report  # type: ignore[method-assign]


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
        if isinstance(current, BaseExceptionGroup):
            # A task group's: every error in it is a pool timeout.
            return current.split(PoolTimeout)[1] is None
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
