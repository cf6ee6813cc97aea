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

A pool's connections are its size plus its overflow. The unit's own commits and rollbacks
run outside the endpoints' limiter and are never counted.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref

from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from ._unit import Unit

__all__ = ["give_back", "take"]

_lock = threading.Lock()
_held: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()


def _forget_in_child() -> None:
    # A forked child has none of its parent's requests: nothing of theirs is held there.
    global _lock
    _lock = threading.Lock()
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _limit(engine: Engine) -> int | None:
    """How many connections of ``engine`` sync bodies may hold; None: no limit."""
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return None  # NullPool, StaticPool, SingletonThreadPool: no one waits for them
    # SQLAlchemy publishes the pool's size but not its overflow limit, which it keeps as
    # '_max_overflow' (-1: unbounded, as a pool_size of 0 makes it). Read only, here only.
    overflow = getattr(pool, "_max_overflow", 0)
    size = pool.size()
    if size <= 0 or overflow < 0:
        return None
    return (size + overflow) // 2


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
    limit = _limit(engine)
    if limit is None or not _in_worker_thread():
        return None
    with _lock:
        holds = unit.holds
        if unit.closed or (holds is not None and engine in holds):
            return None
        held = _held.get(engine, 0)
        if held >= limit:
            return _refusal(limit)
        _held[engine] = held + 1
        if holds is None:
            unit.holds = [engine]
        else:
            holds.append(engine)
        if unit.closed:
            # The unit ended meanwhile (a thread of the app's still using its session), and
            # give_back may have found nothing to give back: do it here.
            _held[engine] -= 1
            unit.holds.remove(engine)
    return None


def give_back(unit: Unit) -> None:
    """``unit`` has ended: the connections its sync body held are free again."""
    if unit.holds is None:
        return  # nothing held, or a take() running now sees the unit closed and undoes it
    with _lock:
        engines, unit.holds = unit.holds or (), None
        for engine in engines:
            _held[engine] -= 1


def _refusal(limit: int) -> str:
    return (
        f"Too many sync streaming bodies use the database at once: the limit is {limit}"
        " connections, half of the pool's. A sync body holds its connection until its"
        " final message and needs a worker thread for each chunk; if sync bodies held every"
        " connection while the endpoints waiting for one held every thread, the server would"
        " stall. Write from an 'async def' generator body (it needs no thread), make the"
        " writes before the response starts (they are committed as it leaves), or give the"
        " pool more connections ('max_overflow')."
    )
