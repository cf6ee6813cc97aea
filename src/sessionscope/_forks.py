"""Processes (SPEC rule 21): a forked child never uses a connection its parent opened.

Pre-fork servers (``gunicorn --preload``, uWSGI) fork their workers after the app was
imported, and an app that created its tables at import left a connection in its pool. Two
processes on one socket interleave their protocol messages: a worker read another's results,
and rows were stored twice for one success. SQLAlchemy's documented remedy runs in the
child: ``engine.dispose(close=False)`` forgets the pool's connections without closing them
(the parent still uses them) and starts an empty pool.

Every engine a ``Database`` uses gets it, the engines it created and those passed in alike:
in a child they could only be the parent's.
"""

from __future__ import annotations

import os
import weakref

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["protect"]

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def protect(engine: Engine | AsyncEngine) -> None:
    """Give a forked child a pool of its own for ``engine``, without its parent's connections."""
    _engines.add(engine.sync_engine if isinstance(engine, AsyncEngine) else engine)


def _in_child() -> None:
    for engine in list(_engines):
        # Not closed: the sockets are the parent's, which goes on using them.
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_in_child)
