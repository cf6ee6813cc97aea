"""Isolation: every unit's session joins one connection's outer transaction, in turns.

``sessionscope.testing.isolated(db)`` installs an ``Isolation`` on a database's units for
the length of a test. Each engine the units use gets one connection, inside a transaction
that is rolled back at the end. A unit's session joins it with a SAVEPOINT
(``join_transaction_mode="create_savepoint"``): its commit releases the SAVEPOINT and its
rollback rolls back to it, so what one request stored is seen by the next one of the same
test and is gone after the test.

Savepoints on one connection must end in the reverse order they began, so units take
turns: a unit takes the connection when its session first needs it and gives it back once
the session is closed; another unit waits for it meanwhile. A unit nested in the one that
has the connection (a ``db.begin()`` block inside a request) takes it from its parent and
ends first, as savepoints need.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool import Pool
from sqlalchemy.util.concurrency import await_only, greenlet_spawn, in_greenlet

from ._sqlite import sends_begin
from ._unit import Unit

__all__ = ["Isolation", "begin_outer", "begin_outer_async", "end_outer", "end_outer_async"]

# How often a unit waiting for its turn looks again.
_POLL = 0.002


class Isolation:
    """The connections of an isolated database, whose turn it is, and the callbacks seen.

    :param run_callbacks: run ``db.after_commit`` callbacks when a unit's SAVEPOINT is
        released, as after a commit; they are recorded in ``callbacks`` either way.
    :param wait: seconds a unit waits for its turn before it fails.
    """

    def __init__(self, *, run_callbacks: bool = True, wait: float = 10.0) -> None:
        self.run_callbacks = run_callbacks
        self.wait = wait
        self.callbacks: list[Callable[[], object]] = []
        """Every after-commit callback whose unit committed (released its SAVEPOINT)."""
        self.connections: dict[Engine | AsyncEngine, Connection | AsyncConnection] = {}
        self._lock = threading.Lock()
        # The units that have the connection, with the thread each took it in: the last
        # one's turn, each one nested in the one before it.
        self._turns: list[tuple[Unit, int]] = []

    # -- sessions ---------------------------------------------------------------------------

    def session(self, unit: Unit, factory: Any) -> Session | AsyncSession:
        """A session of ``factory`` for ``unit``, joined to the engine's outer transaction."""
        engine = factory.kw.get("bind")
        if not isinstance(engine, Engine | AsyncEngine):
            raise RuntimeError(
                "isolated() needs a session factory bound to one engine, to give each unit"
                f" a session on that engine's shared connection; this one is bound to"
                f" {engine!r}. Bind it with 'sessionmaker(engine)' (no 'binds')."
            )
        connection = self.connections.get(engine)
        if connection is None:
            connection = self._connect(engine)
        session: Session | AsyncSession = factory(
            bind=connection, join_transaction_mode="create_savepoint"
        )
        sync_session = session.sync_session if isinstance(session, AsyncSession) else session
        asynchronous = isinstance(session, AsyncSession)
        get_bind = sync_session.get_bind

        def take_turn_then_bind(*args: Any, **kwargs: Any) -> Any:
            # Every statement asks for its bind; the SAVEPOINT that starts the unit's work
            # is made right after it is given.
            if not asynchronous or in_greenlet():
                self.take_turn(unit)
            return get_bind(*args, **kwargs)

        def give_back(session: Session, transaction: SessionTransaction) -> None:
            # Its SAVEPOINT is released or rolled back: nothing of it is left open.
            if transaction.parent is None:
                self.give_back(unit)

        sync_session.get_bind = take_turn_then_bind  # type: ignore[method-assign]
        event.listen(sync_session, "after_transaction_end", give_back)
        return session

    def _connect(self, engine: Engine | AsyncEngine) -> Connection:
        if isinstance(engine, AsyncEngine):
            raise RuntimeError(
                "An async engine's connection is opened when 'async with isolated(db):'"
                " starts; this unit uses another async engine, which isolated() cannot open"
                " from here."
            )
        with self._lock:
            connection = self.connections.get(engine)
            if connection is None:
                connection = self.connections[engine] = begin_outer(engine)
        assert isinstance(connection, Connection)
        return connection

    # -- turns ------------------------------------------------------------------------------

    def take_turn(self, unit: Unit) -> None:
        """Wait until ``unit`` may use the connection.

        It may when no unit has it, when it has it, when the one that has it is its parent,
        and when the one that has it is a unit of the same thread of a synchronous database
        (a test's app context or ``db.begin()`` block around a test client's request): that
        unit waits for this one to end, so its SAVEPOINT closes first, as on a stack.
        """
        turns = self._turns
        if turns and turns[-1][0] is unit:
            return
        greenlet = in_greenlet()
        thread = threading.get_ident()
        deadline = time.monotonic() + self.wait
        while True:
            with self._lock:
                if unit.closed:
                    raise RuntimeError(
                        "This unit of work ended while it waited for its turn on the"
                        " isolated connection; it cannot use it any more."
                    )
                holder, holder_thread = turns[-1] if turns else (None, 0)
                if (
                    holder is None
                    or _nested_in(unit, holder)
                    or (not greenlet and holder_thread == thread and not _on_event_loop())
                ):
                    turns.append((unit, thread))
                    return
                if any(turn is unit for turn, _ in turns):
                    # Its own unit nested in it has the turn (a 'db.begin()' block of its
                    # code): its statements go inside that block's SAVEPOINT meanwhile.
                    return
            if not greenlet and _on_event_loop():
                raise RuntimeError(
                    f"Inside isolated(), every unit of work shares one connection and they"
                    f" take turns, and {holder!r} has it now. This unit uses a synchronous"
                    " session on the event loop (an 'async def' endpoint), where waiting"
                    " would stop the loop that the other unit needs to finish. Send the"
                    " test's requests one at a time, use 'def' endpoints, or an async driver."
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Inside isolated(), every unit of work shares one connection and they"
                    f" take turns: this one waited {self.wait:g} s for {holder!r}, which"
                    " still has it. A unit has the connection from its first statement until"
                    " its transaction ends (a commit, a rollback, the end of the unit): an"
                    " app context or 'db.begin()' block of another thread, an open websocket"
                    " or an unfinished streaming response that used the database, or a"
                    " request waiting for another one, holds it. End that unit first, or"
                    " mark the test to run without isolation."
                )
            if greenlet:
                await_only(asyncio.sleep(_POLL))
            else:
                time.sleep(_POLL)

    def give_back(self, unit: Unit) -> None:
        """``unit``'s transaction on the connection is over: the next unit may have it."""
        with self._lock:
            self._turns[:] = [turn for turn in self._turns if turn[0] is not unit]

    @property
    def holders(self) -> list[Unit]:
        """The units that have the connection now (the last one's turn)."""
        return [unit for unit, _ in self._turns]

    # -- callbacks --------------------------------------------------------------------------

    def capture(self, callbacks: Sequence[Callable[[], object]]) -> Sequence[Callable[[], object]]:
        """Record ``callbacks`` (their unit committed); return those to run."""
        self.callbacks.extend(callbacks)
        return callbacks if self.run_callbacks else ()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _nested_in(unit: Unit, holder: Unit) -> bool:
    parent: Unit | None = unit
    while parent is not None:
        if parent is holder:
            return True
        parent = parent.parent
    return False


# -- the outer transaction ---------------------------------------------------------------------
#
# pysqlite and aiosqlite start no transaction until a statement that writes, and a SAVEPOINT
# outside a transaction begins one of its own, which its RELEASE commits to the file. On the
# shared connection the driver is told to keep out (isolation_level None) and the outer
# transaction begins with an explicit BEGIN; the driver's setting is put back at the end. An
# engine sessionscope created does both itself (see _sqlite).


_SAVED = "sessionscope_isolation_level"
_POOL = "sessionscope_pool"


def begin_outer(engine: Engine) -> Connection:
    """A connection of ``engine`` inside a transaction that ``end_outer`` rolls back."""
    connection = engine.connect()
    try:
        _begin(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def end_outer(connection: Connection) -> None:
    """Roll back everything done on ``connection`` and give it back to its pool."""
    engine, pool = connection.engine, _pool_of(connection)
    try:
        _rollback(connection)
    finally:
        connection.close()
        _dispose_if_replaced(engine, pool)


async def begin_outer_async(engine: AsyncEngine) -> AsyncConnection:
    """``begin_outer`` for an async engine."""
    connection = await engine.connect()
    try:
        await connection.run_sync(_begin)
    except BaseException:
        await connection.close()
        raise
    return connection


async def end_outer_async(connection: AsyncConnection) -> None:
    """``end_outer`` for an async connection."""
    engine, pool = connection.engine.sync_engine, _pool_of(connection.sync_connection)
    try:
        await connection.run_sync(_rollback)
    finally:
        await connection.close()
        await greenlet_spawn(_dispose_if_replaced, engine, pool)


def _begin(connection: Connection) -> None:
    connection.info[_POOL] = connection.engine.pool
    connection.begin()
    if connection.engine.dialect.name == "sqlite" and not sends_begin(connection.engine):
        dbapi_connection: Any = connection.connection.dbapi_connection
        connection.info[_SAVED] = dbapi_connection.isolation_level
        dbapi_connection.isolation_level = None
        connection.exec_driver_sql("BEGIN")


def _rollback(connection: Connection) -> None:
    if connection.closed:
        return
    transaction = connection.get_transaction()
    if transaction is not None:
        transaction.rollback()
    if _SAVED in connection.info and not connection.invalidated:
        dbapi_connection: Any = connection.connection.dbapi_connection
        dbapi_connection.isolation_level = connection.info.pop(_SAVED)


def _pool_of(connection: Connection | None) -> Pool | None:
    if connection is None or connection.closed:
        return None
    pool: Pool = connection.info.pop(_POOL)
    return pool


def _dispose_if_replaced(engine: Engine, pool: Pool | None) -> None:
    # The engine was disposed while the block held its connection (an app's lifespan
    # shutdown does it): the connection went back to the pool the engine dropped, which
    # would leave it to the garbage collector. Close that pool's connections now.
    if pool is not None and engine.pool is not pool:
        pool.dispose()
