"""Where a unit's end runs off the request's own task: a task of its own, or a worker thread.

Both wait for the work to finish even when the request is cancelled meanwhile, and tell
the work about the cancellation through a ``Cancel``, so that a COMMIT not yet sent is
rolled back instead, and one already sent is awaited (rule 17).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio import CapacityLimiter

from ._unit import Cancel

__all__ = ["run_in_task", "run_in_thread", "run_to_completion"]

T = TypeVar("T")


async def run_to_completion(work: Callable[[], Awaitable[T]], cancel: Cancel | None = None) -> T:
    """Await ``work()`` to its end even if the awaiting task is cancelled meanwhile.

    The work runs in a task of its own, which a cancellation of the caller never reaches: a
    native ``Task.cancel()`` (uvicorn's graceful-shutdown timeout, ``asyncio.timeout``) or an
    anyio cancel scope is passed to ``cancel`` instead, the caller goes on waiting, shielded,
    and raises the cancellation once the work is done.
    """
    task = asyncio.ensure_future(work())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise
        if cancel is not None:
            cancel.request()
        await _outlast(task)
        # The caught cancellation itself: an anyio cancel scope knows its own by it.
        raise


async def run_in_task(work: Callable[[Cancel], Awaitable[T]]) -> T:
    """Await ``work(cancel)`` in a task of its own, as an async unit's COMMIT or ROLLBACK runs.

    The separate task, awaited through ``asyncio.shield`` (the shape of SQLAlchemy's own
    ``async with session.begin()``), keeps SQLAlchemy's asyncio pool fair under contention.
    With the COMMIT inline, newly arrived requests took returned connections without waiting
    while earlier waiters waited hundreds of milliseconds (benchmarks/, PostgreSQL with
    asyncpg, 32 clients on the default pool, reads: 0.69x the hand-written baseline inline,
    1.01-1.23x in a task of its own).

    A cancellation of the caller (``Task.cancel()`` or an anyio cancel scope) before the
    work set ``cancel.committing`` interrupts it where it waits (the pool, the flush), and
    it rolls back; after that, the COMMIT is on its way and is awaited to its outcome. Either
    way the caller waits, shielded, for the task to finish, then raises the cancellation.
    """
    cancel = Cancel()
    task = asyncio.ensure_future(work(cancel))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise
        cancel.request()
        if not cancel.committing:
            task.cancel()
        await _outlast(task)
        raise


async def _outlast(task: asyncio.Future[Any]) -> None:
    """Wait, shielded from any cancellation, until ``task`` is done.

    Its outcome no longer changes the caller's (it is cancelled), and the work logs its own
    failures.
    """
    with anyio.CancelScope(shield=True):
        while not task.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(task)


_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CapacityLimiter]
_limiters = weakref.WeakKeyDictionary()


def _limiter() -> CapacityLimiter:
    # Never the endpoints' limiter, and never a bounded one: endpoints waiting for a
    # connection can hold every endpoint thread, and a session that only add()ed checks out
    # its connection inside the commit, so a bounded cleanup pool can fill with commits that
    # wait for the pool while the sessions holding every connection wait for a cleanup
    # thread. With no bound, a session that holds a connection can always finish.
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = CapacityLimiter(math.inf)
    return limiter


async def run_in_thread(work: Callable[[Cancel], T]) -> T:
    """Run ``work(cancel)`` in a worker thread and wait for it to finish, even if cancelled."""
    limiter = _limiter()
    cancel = Cancel()
    return await run_to_completion(
        lambda: anyio.to_thread.run_sync(work, cancel, limiter=limiter), cancel
    )
