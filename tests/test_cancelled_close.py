"""A cancellation that lands while an async unit's session rolls back or closes.

The ROLLBACK of a unit's end is awaited on the driver; a request cancelled right then (a
client gone, a server's shutdown timeout) must still leave every connection back in the
pool, on every supported SQLAlchemy (2.0 lacks a fix of 2.1.6 for a connection left to the
garbage collector when an async close is cancelled). The ``make_db`` fixture runs each test
with the garbage collector off and warnings as errors, so such a connection fails the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from sessionscope import Database
from sessionscope._sessions import close_async_session

from ._models import Item
from ._units import Boom, Rows, add, run_unit
from .conftest import DatabaseFactory, backend_params

ASYNC_BACKENDS = backend_params(backends=["sqlite", "postgresql"], modes=["async"])


def assert_clean(db: Database[Any]) -> None:
    assert db.live_units == 0
    assert db.live_sessions == 0
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def cancel_at_first_rollback(db: Database[Any], cancel: Callable[[], object]) -> list[bool]:
    """Call ``cancel`` as ``db``'s first ROLLBACK is sent, so that the cancellation lands
    while the driver awaits it. Returns a list that then holds ``True``."""
    fired: list[bool] = []

    def fire(connection: object) -> None:
        if not fired:
            fired.append(True)
            cancel()

    event.listen(db.sync_engine, "rollback", fire)
    return fired


async def run_cancelled(
    db: Database[Any], work: Callable[[], Awaitable[None]], how: str
) -> list[bool]:
    """Run ``work`` in a task of its own and cancel it, the asyncio way or the anyio way, at
    ``db``'s first ROLLBACK; the cancellation must reach the caller."""
    if how == "task.cancel":
        task = asyncio.ensure_future(work())
        fired = cancel_at_first_rollback(db, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        return fired
    scope = anyio.CancelScope()
    fired = cancel_at_first_rollback(db, scope.cancel)
    finished: list[bool] = []

    async def run() -> None:
        with scope:
            await work()
            finished.append(True)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
    assert scope.cancelled_caught
    assert finished == []
    return fired


async def write_then(db: Database[Any], end: str) -> None:
    """A unit that writes, then ends in a rollback: its body raises, or it is rollback-only."""
    async with db.begin() as session:
        assert isinstance(session, AsyncSession)
        session.add(Item(name="rolled back"))
        await session.flush()
        if end == "raises":
            raise Boom("the application failed")
        db.set_rollback_only()


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
@pytest.mark.parametrize("end", ["raises", "rollback-only"])
@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True)
async def test_unit_cancelled_during_its_rollback_returns_the_connection(
    make_db: DatabaseFactory, rows: Rows, end: str, how: str
) -> None:
    """A request cancelled while its unit rolls back must not cost the pool a connection."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    with anyio.fail_after(20):
        fired = await run_cancelled(db, lambda: write_then(db, end), how)
    assert fired == [True]
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["next"]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
@pytest.mark.parametrize("backend", ASYNC_BACKENDS, indirect=True)
async def test_close_cancelled_during_its_rollback_returns_the_connection(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """The close of an async session, itself cancelled as its ROLLBACK awaits the driver (a
    task cancelled by the loop's shutdown, say), must still give the connection back."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    engine = db.engine
    assert isinstance(engine, AsyncEngine)

    async def close_after_a_write() -> None:
        session = AsyncSession(engine)
        session.add(Item(name="rolled back"))
        await session.flush()
        await close_async_session(session)

    with anyio.fail_after(20):
        fired = await run_cancelled(db, close_after_a_write, how)
    assert fired == [True]
    assert_clean(db)
    await run_unit(db, add("next"))
    assert rows() == ["next"]
