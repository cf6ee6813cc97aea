"""The connections that sync streaming bodies hold between their chunks (SPEC rule 13).

Starlette produces each chunk of a sync (``def``) streaming body in the same worker-thread
limiter as the ``def`` endpoints. A body that used the database keeps its connection from
then until its final message (its work commits or rolls back as a whole), and it needs a
thread for each chunk after that. If such bodies held every connection of a pool while
every thread was an endpoint waiting for one, nothing would move until the pool's timeout:
the bodies wait for a thread, the threads wait for a connection.

So sync bodies may hold at most half of a pool's connections (rounded down). The others go
round the endpoints that hold the threads; they finish and free their threads, and the
bodies get them. One connection left over would be enough to rule out the deadlock, but a
body queues for its thread behind every waiting request at each chunk, so under load the
connections it holds sit idle meanwhile: in the fault soak, bodies holding all but one
connection left the endpoints a trickle of throughput and their own clients waiting for
more than 45 s. A body past the limit fails at once, at its first statement, rather than
wait: it would wait holding a thread. Bodies that run on the event loop (async
generators) need no thread between chunks, and are not counted.

A pool's connections are its size plus its overflow for the engines this library created;
for an engine the app passed in only its ``pool_size`` is known (SQLAlchemy does not
publish the overflow).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from ._unit import Unit

__all__ = ["give_back", "note_pool", "take"]

# QueuePool's defaults, for an engine created without these options.
_POOL_SIZE, _MAX_OVERFLOW = 5, 10

_lock = threading.Lock()
_capacity: weakref.WeakKeyDictionary[Engine, int | None] = weakref.WeakKeyDictionary()
_held: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()


def note_pool(engine: Engine, options: Mapping[str, Any]) -> None:
    """Record the capacity of the pool this library created for ``engine`` from ``options``."""
    if not isinstance(engine.pool, QueuePool):
        return
    size = options.get("pool_size", _POOL_SIZE)
    overflow = options.get("max_overflow", _MAX_OVERFLOW)
    # A pool_size of 0 or a negative overflow lets the pool grow without a bound.
    _capacity[engine] = None if size == 0 or overflow < 0 else size + overflow


def _limit(engine: Engine) -> int | None:
    """How many connections of ``engine`` sync bodies may hold; None: no limit."""
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return None  # NullPool, StaticPool, SingletonThreadPool: no one waits for them
    if engine in _capacity:
        capacity = _capacity[engine]
    else:
        size = pool.size()
        capacity = size if size > 0 else None
    return None if capacity is None else capacity // 2


def _in_worker_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def take(unit: Unit, engine: Engine) -> str | None:
    """A streaming unit's session began a transaction on ``engine``: count its connection
    if a sync body holds it (a worker thread), or return why it may not.
    """
    if unit.holds is not None and engine in unit.holds:
        return None
    limit = _limit(engine)
    if limit is None or not _in_worker_thread():
        return None
    with _lock:
        held = _held.get(engine, 0)
        if held >= limit:
            return _refusal(limit)
        _held[engine] = held + 1
    if unit.holds is None:
        unit.holds = [engine]
    else:
        unit.holds.append(engine)
    return None


def give_back(unit: Unit) -> None:
    """``unit`` has ended: the connections its sync body held are free again."""
    engines, unit.holds = unit.holds, None
    if not engines:
        return
    with _lock:
        for engine in engines:
            _held[engine] -= 1


def _refusal(limit: int) -> str:
    return (
        f"Too many sync streaming bodies use the database at once: {limit} already hold a"
        " connection, half of the pool's. A sync body holds its connection until its"
        " final message and needs a worker thread for each chunk; if sync bodies held every"
        " connection while the endpoints waiting for one held every thread, the server would"
        " stall. Write from an 'async def' generator body (it needs no thread), make the"
        " writes before the response starts (they are committed as it leaves), or give the"
        " pool more connections ('max_overflow')."
    )
