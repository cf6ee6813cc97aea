"""Tests that leave the database as they found it: ``isolated(db)``.

Inside ``with isolated(db):`` (``async with`` for an async driver) every unit of work of
``db`` runs on one connection per engine, inside one outer transaction that is rolled back
when the block ends: requests through ``SessionMiddleware``, ``WSGISessionMiddleware`` or
``db.init_app``, ``db.begin()`` blocks, work after the response. A unit's session joins
that transaction with a SAVEPOINT: its commit releases the SAVEPOINT, its rollback rolls
back to it. So a request answered 201 leaves its rows for the next request of the same
test, a request answered 409 leaves none, and after the block nothing of the test is left.

```python
from sessionscope.testing import isolated


def test_create_item(client):
    with isolated(db):
        assert client.post("/items", json={"name": "apple"}).status_code == 201
        assert client.get("/items").json() == ["apple"]
    # rolled back: the next test starts from the same empty table
```

What differs from a real run, because a SAVEPOINT is not a COMMIT:

- Units take turns on the connection: a unit has it from its first statement until it ends,
  and another unit that needs it meanwhile waits (``wait`` seconds at most, then fails
  saying which unit holds it). Concurrent requests of one test are serialized; with a
  synchronous driver, an ``async def`` endpoint that would have to wait fails at once
  instead (waiting would stop the event loop the other request needs).
- A ``db.begin()`` block nested in a request commits into the request's SAVEPOINT: if the
  request then rolls back, so does the block's work.
- Deferred constraints are checked at the outer transaction's end, which never comes: a
  COMMIT that a deferred foreign key would fail succeeds here.
- ``db.after_commit`` callbacks run when their unit's SAVEPOINT is released (as after a
  commit) and are recorded in ``isolation.callbacks``; with ``run_callbacks=False`` they
  are only recorded.

This module imports no web framework and no pytest; the pytest plugin is
``sessionscope.pytest_plugin``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import anyio
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._core import Database
from ._isolation import Isolation, begin_outer_async, end_outer, end_outer_async

__all__ = ["Isolated", "Isolation", "isolated"]


def isolated(db: Database[Any], *, run_callbacks: bool = True, wait: float = 10.0) -> Isolated:
    """Run every unit of ``db`` inside one transaction, rolled back at the end of the block.

    ``with isolated(db) as isolation:`` for a synchronous driver, ``async with`` for an
    async one; ``isolation.callbacks`` lists the ``db.after_commit`` callbacks whose unit
    committed.

    :param run_callbacks: run those callbacks as after a real commit (the default), or
        only record them.
    :param wait: seconds a unit waits for its turn on the shared connection before it
        fails with an error that names the unit holding it.
    """
    return Isolated(db, run_callbacks=run_callbacks, wait=wait)


class Isolated:
    """The context manager ``isolated(db)`` returns (sync or async by the driver)."""

    def __init__(self, db: Database[Any], *, run_callbacks: bool, wait: float) -> None:
        self.db = db
        self.isolation = Isolation(run_callbacks=run_callbacks, wait=wait)

    def _start(self) -> Isolation:
        units = self.db.units
        if units.isolation is not None:
            raise RuntimeError(f"{self.db!r} is already isolated: isolated() does not nest.")
        if units.live_units:
            raise RuntimeError(
                f"isolated() must start before any unit of work of {self.db!r} is open, and"
                f" {units.live_units} is open now (a request still running, an app context"
                " whose 'db.session' was used, a 'db.begin()' block): its session would not"
                " be isolated. Enter isolated() first, for example in a fixture that the"
                " others depend on."
            )
        units.isolation = self.isolation
        return self.isolation

    # -- sync -----------------------------------------------------------------------------

    def __enter__(self) -> Isolation:
        if self.db.is_async:
            raise TypeError(
                f"{self.db!r} uses an async driver: use 'async with isolated(db):' in an"
                " async test, with a client that runs the app on the test's event loop"
                " ('httpx.AsyncClient(transport=httpx.ASGITransport(app))'). Starlette's"
                " 'TestClient' runs the app on an event loop of its own, where the test's"
                " connection cannot be used."
            )
        return self._start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connections = self.isolation.connections
        errors: list[BaseException] = []
        for connection in list(connections.values()):
            assert isinstance(connection, Connection)
            try:
                end_outer(connection)
            except Exception as error:  # the others are still rolled back and returned
                errors.append(error)
        connections.clear()
        self.db.units.isolation = None
        if errors and exc is None:
            raise errors[0]

    # -- async ----------------------------------------------------------------------------

    async def __aenter__(self) -> Isolation:
        if not self.db.is_async:
            raise TypeError(f"{self.db!r} uses a synchronous driver: use 'with isolated(db):'.")
        isolation = self._start()
        engine = self.db.engine
        assert isinstance(engine, AsyncEngine)
        try:
            isolation.connections[engine] = await begin_outer_async(engine)
        except BaseException:
            self.db.units.isolation = None
            raise
        return isolation

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connections = self.isolation.connections
        # A test that failed or was cancelled still rolls back and gives its connection back.
        with anyio.CancelScope(shield=True):
            errors: list[BaseException] = []
            for connection in list(connections.values()):
                assert isinstance(connection, AsyncConnection)
                try:
                    await end_outer_async(connection)
                except Exception as error:
                    errors.append(error)
            connections.clear()
            self.db.units.isolation = None
        if errors and exc is None:
            raise errors[0]
