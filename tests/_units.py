"""Running work in a ``db.begin()`` unit the same way for sync and async databases."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from sessionscope import Database

from ._models import Item

T = TypeVar("T")

Rows = Callable[[], list[str]]


class Boom(Exception):
    """An error raised by application code or a listener inside a unit."""


async def run_unit(db: Database[Any], work: Callable[[Session], T]) -> T:
    """Run ``work`` on the session of a new ``db.begin()`` unit, whatever the driver."""
    if db.is_async:
        async with db.begin() as session:
            assert isinstance(session, AsyncSession)
            return await session.run_sync(work)
    with db.begin() as session:
        assert isinstance(session, Session)
        return work(session)


def add(name: str) -> Callable[[Session], None]:
    """Work that adds one item named ``name``."""

    def work(session: Session) -> None:
        session.add(Item(name=name))

    return work


def hold_first_commit(
    db: Database[Any], release_after: float = 0.3
) -> tuple[anyio.Event, list[bool]]:
    """Make the first COMMIT of an async ``db`` wait on its way out, so that it can be cancelled.

    Returns the event set once that COMMIT is reached, and a list that then holds ``True``.
    The COMMIT goes on ``release_after`` seconds later: once it is on its way its outcome is
    awaited, whatever cancels the unit meanwhile (rule 17).
    """
    reached = anyio.Event()
    release = anyio.Event()
    held: list[bool] = []

    def hold(connection: object) -> None:
        if not held:
            held.append(True)
            reached.set()
            asyncio.get_running_loop().call_later(release_after, release.set)
            await_only(release.wait())

    event.listen(db.sync_engine, "commit", hold)
    return reached, held
