"""What every benchmark app shares, ASGI and WSGI alike: the table and the JSON shapes.

This module imports only SQLAlchemy, so that the Starlette helpers (``common``) and the
Flask helpers (``wsgi_common``) both build on it, in the project's virtual environment and
in the peers' own.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import Pool

__all__ = [
    "FAIL_NAME",
    "NOOP_BODY",
    "NOT_FOUND_BODY",
    "SEED_ROWS",
    "Base",
    "BenchFailure",
    "Item",
    "item_json",
    "use_sqlite_pragmas",
]

SEED_ROWS = 10_000
"""Rows seeded before a run; ids above this were written by a run."""
FAIL_NAME = "fail"
"""The name ``GET /fail`` writes; no row may ever keep it."""
NOOP_BODY = {"ok": True}
"""What ``GET /noop`` answers."""
NOT_FOUND_BODY = {"detail": "not found"}
"""What ``GET /items/{id}`` answers, with a 404, for an id that does not exist."""


class Base(DeclarativeBase):
    """Declarative base of the benchmark tables."""


class Item(Base):
    """The one benchmark table: an integer primary key and a short name."""

    __tablename__ = "bench_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))


class BenchFailure(RuntimeError):
    """Raised by ``GET /fail`` after its write, so that the write must be rolled back."""


def item_json(item: Item) -> dict[str, Any]:
    """The JSON shape of one item."""
    return {"id": item.id, "name": item.name}


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    # The listener is on the Pool class, so it also sees the connections of any other
    # database this process opens (the micro-benchmark runs PostgreSQL apps after SQLite).
    if "sqlite" not in type(dbapi_connection).__module__:
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def use_sqlite_pragmas(url: str) -> None:
    """Give every SQLite connection of this process WAL and ``synchronous=NORMAL``.

    Listening on the ``Pool`` class reaches the engines a peer creates itself too, so that
    every variant runs on identically configured SQLite connections.
    """
    if url.startswith("sqlite") and not event.contains(Pool, "connect", _sqlite_pragmas):
        event.listen(Pool, "connect", _sqlite_pragmas)
