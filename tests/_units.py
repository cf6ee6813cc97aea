"""Running work in a ``db.begin()`` unit the same way for sync and async databases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

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
