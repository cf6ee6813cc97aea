"""Running the library's own blocking cleanup (sync commit, rollback, close) off the loop."""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from typing_extensions import TypeVarTuple, Unpack

from ._unit import run_to_completion

__all__ = ["run_blocking"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

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


async def run_blocking(func: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
    """Run ``func(*args)`` in a worker thread and wait for it to finish, even if cancelled."""
    limiter = _limiter()
    return await run_to_completion(lambda: anyio.to_thread.run_sync(func, *args, limiter=limiter))
