"""Running work in a ``db.begin()`` unit the same way for sync and async databases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import await_

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


def hold_first_commit(db: Database[Any]) -> tuple[anyio.Event, list[bool]]:
    """Make the first COMMIT of an async ``db`` wait forever, so that it can be cancelled.

    Returns the event set once that COMMIT is reached, and a list that then holds ``True``.
    """
    reached = anyio.Event()
    never = anyio.Event()
    held: list[bool] = []

    def hold(connection: object) -> None:
        if not held:
            held.append(True)
            reached.set()
            await_(never.wait())

    event.listen(db.sync_engine, "commit", hold)
    return reached, held
