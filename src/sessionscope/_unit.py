"""Units of work: the key a session is registered under, and how it ends."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from sqlalchemy.exc import IllegalStateChangeError, InterfaceError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionState

__all__ = ["Binding", "Unit", "default_commit_on", "run_in_task", "run_to_completion"]

logger = logging.getLogger("sessionscope")

T = TypeVar("T")

# Tokens are never reused: a key left behind by a failed cleanup can never be handed to a
# later unit, unlike id() of a request, task or thread.
_tokens = itertools.count(1)


class Unit:
    """One unit of work: a request, a background job, a ``db.begin()`` block.

    The unit's ``key`` is what the session registry is keyed by. A unit holds no session and
    no connection until the code running inside it touches ``db.session``.
    """

    __slots__ = ("callbacks", "closed", "key", "rollback_only")

    def __init__(self) -> None:
        self.key = next(_tokens)
        self.rollback_only = False
        self.closed = False
        self.callbacks: list[Callable[[], object]] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Unit {self.key} {state}>"


class Binding:
    """What a ``ContextVar`` holds for the code running inside a unit.

    It is a mutable holder, created before the app runs, so that every child context
    (worker threads, tasks, inner middleware) sees the same object, and an adapter can swap
    the unit it points to (work after the response gets a fresh unit) or clear it (the
    request is over) without setting the ``ContextVar`` again in a context it does not own.
    """

    __slots__ = ("owner", "renewable", "unit")

    def __init__(self, unit: Unit | None, owner: object, renewable: bool = False) -> None:
        self.unit = unit
        self.owner = owner
        # When true and ``unit`` is None, the next use of ``db.session`` opens a fresh unit
        # (the request's own, or work after the response); nothing is created for requests
        # that never need one.
        self.renewable = renewable

    def handling_request(self) -> bool:
        """Whether a middleware (ASGI or WSGI) is handling a request or socket through this.

        Another middleware of the same database meeting it is installed twice. Adapters
        that open requests mark themselves with ``_opens_requests``; the ASGI request
        binding answers for itself (its unit opens on first use).
        """
        unit = self.unit
        return (
            getattr(self.owner, "_opens_requests", False) and unit is not None and not unit.closed
        )


def transaction_committed(root: SessionTransaction | None) -> bool:
    """Tell whether a ``commit()`` that raised had already committed in the database.

    SQLAlchemy marks the transaction committed right after the database's COMMIT, before
    it runs the ``after_commit`` listeners; a listener that raises stops ``commit()`` there.
    A failure before or during COMMIT (a flush error, a ``before_commit`` listener, the
    COMMIT itself) never reaches that state. SQLAlchemy offers no public accessor for it.
    """
    return getattr(root, "_state", None) is SessionTransactionState.COMMITTED


def reset_failed_connections(root: SessionTransaction | None, discard: bool = False) -> None:
    """Roll back, at the driver, connections whose COMMIT failed.

    SQLAlchemy marks the transaction inactive whether or not COMMIT succeeded, so it never
    rolls it back and the pool takes the connection back as it is; on SQLite a failed COMMIT
    leaves the transaction open, and the next unit to get that connection would run inside
    it. A connection that cannot be rolled back is invalidated instead, and so is every one
    when ``discard`` is true: the driver refused to send the COMMIT at all (an
    ``InterfaceError``, such as asyncpg's "another operation is in progress"), so what the
    connection holds is unknown, and a driver that forgot its transaction on the way (asyncpg
    again) would take a ROLLBACK for a no-op and leave the server inside the transaction.
    """
    if root is None:
        return
    for connection in root.connections:
        if connection.closed or connection.invalidated:
            continue
        transaction = connection.get_transaction()
        if transaction is None or transaction.is_active:
            # Nothing open, or an active transaction that close() will roll back itself.
            continue
        if discard:
            connection.invalidate()
            continue
        try:
            connection.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
        except Exception:
            logger.warning("Rolling back after a failed commit failed", exc_info=True)
            connection.invalidate()


def commit_session(session: Session) -> BaseException | None:
    """Commit ``session``; on failure log once, clean the connection, and return the error."""
    root = session.get_transaction()
    try:
        session.commit()
    except Exception as exc:
        if transaction_committed(root):
            logger.error(
                "The commit succeeded, but an 'after_commit' listener raised; the data is"
                " stored and the response stands.",
                exc_info=True,
            )
            return None
        logger.error("Commit failed; the unit of work was rolled back.", exc_info=True)
        reset_failed_connections(root, discard=isinstance(exc, InterfaceError))
        return exc
    return None


def rollback_session(session: Session) -> None:
    """Roll back ``session`` and keep it open; a failure is logged, ``close()`` ends it."""
    try:
        session.rollback()
    except Exception:
        logger.warning("Rollback failed; the session will be closed", exc_info=True)


def discard_connections(root: SessionTransaction | None) -> None:
    """Invalidate the connections of ``root`` that a failed ``close()`` left checked out.

    ``close()`` detaches the transaction from the session before it rolls back and returns
    each connection; when a ROLLBACK fails with an error that is not a disconnect (the driver
    refusing it while another task's query runs on the connection, say), that connection is
    left checked out, owned by nothing but the garbage collector. Its state is unknown, so
    it is closed and the pool opens a fresh one in its place.
    """
    if root is None:
        return
    for connection in root.connections:
        if not connection.closed:
            connection.invalidate()
            connection.close()


def close_session(session: Session) -> None:
    """Close ``session``; an error (a dead connection, a raising listener) is logged only,
    and a connection the failed close left checked out is discarded.
    """
    root = session.get_transaction()
    try:
        # A commit interrupted by a cancellation or another BaseException left its connection
        # in a transaction that close() would not roll back (see reset_failed_connections).
        reset_failed_connections(root)
        session.close()
    except Exception:
        logger.warning("Closing the session failed", exc_info=True)
        discard_connections(root)


# How long the close of an AsyncSession waits for another task still inside it (SQLAlchemy's
# default pool timeout: that task may be waiting for a connection).
CLOSE_WAIT = 30.0


async def close_async_session(session: AsyncSession) -> None:
    """Close ``session`` as ``close_session`` does, waiting for a task still inside it.

    Using one ``AsyncSession`` from several tasks at once is an error that SQLAlchemy reports
    to one of them; the others keep running, one may be checking out a connection, and
    ``close()`` refuses to run meanwhile. Giving up there would leave that connection to the
    garbage collector, so the close is retried until the other task is out.
    """
    deadline: float | None = None
    while True:
        root = session.sync_session.get_transaction()
        try:
            await session.run_sync(lambda _, root: reset_failed_connections(root), root)
            await session.close()
        except IllegalStateChangeError:
            now = time.monotonic()
            if deadline is None:
                logger.warning(
                    "Another task is still using the session (one 'AsyncSession' was used"
                    " by several tasks at once); closing it once that task is out",
                    exc_info=True,
                )
                deadline = now + CLOSE_WAIT
            elif now > deadline:
                logger.error("Gave up closing a session another task kept using")
                return
            await asyncio.sleep(0.005)
        except Exception:
            logger.warning("Closing the session failed", exc_info=True)
            await session.run_sync(lambda _, root: discard_connections(root), root)
            return
        else:
            return


def run_callbacks_sync(unit: Unit) -> None:
    """Run the unit's after-commit callbacks in order; one that raises is logged only."""
    callbacks, unit.callbacks = unit.callbacks or (), None
    for callback in callbacks:
        try:
            result = callback()
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    # Never to be awaited: close it now rather than leave the garbage
                    # collector a "coroutine was never awaited" warning for a later request.
                    result.close()
                raise TypeError(
                    f"After-commit callback {callback!r} returned an awaitable, but this"
                    " database is synchronous. Register a plain function instead."
                )
        except Exception:
            logger.error("After-commit callback %r raised", callback, exc_info=True)


async def run_callbacks_async(unit: Unit) -> None:
    """Run the unit's after-commit callbacks in order, awaiting those that are coroutines."""
    callbacks, unit.callbacks = unit.callbacks or (), None
    for callback in callbacks:
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.error("After-commit callback %r raised", callback, exc_info=True)


async def run_to_completion(work: Callable[[], Awaitable[T]]) -> T:
    """Await ``work()`` to its end even if the awaiting task is cancelled meanwhile.

    An anyio shield keeps anyio cancel scopes out, but not a native ``Task.cancel()``
    (uvicorn's graceful-shutdown timeout, ``asyncio.timeout``), so the work runs in a task
    of its own that the caller waits for until it is done; a cancellation that arrived
    meanwhile is raised afterwards.
    """
    task = asyncio.ensure_future(work())
    cancelled = False
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    raise
                cancelled = True
                continue
            break
    if cancelled:
        raise asyncio.CancelledError
    return result


async def run_in_task(work: Callable[[], Awaitable[T]]) -> T:
    """Await ``work()`` in a task of its own; a cancellation of the caller interrupts it once.

    This is how a unit's COMMIT or ROLLBACK runs. The separate task, awaited through
    ``asyncio.shield`` (the shape of SQLAlchemy's own ``async with session.begin()``), keeps
    SQLAlchemy's asyncio pool fair under contention. With the COMMIT inline, newly arrived
    requests took returned connections without waiting while earlier waiters waited
    hundreds of milliseconds, and the pool opened and closed overflow connections
    (benchmarks/, PostgreSQL with asyncpg, 32 clients on the default pool, reads: 0.69x the
    hand-written baseline inline, 1.01-1.23x in a task of its own).

    A cancellation of the caller (``Task.cancel()`` or an anyio cancel scope) is passed on
    to the task, so a COMMIT stuck on a lock stops as it would have inline; the caller then
    waits, shielded, for the task's own cleanup to finish, and raises the cancellation.
    """
    task = asyncio.ensure_future(work())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise
        task.cancel()
        with anyio.CancelScope(shield=True):
            while not task.done():
                # Its outcome no longer matters: the caller is cancelled, and the task logs
                # its own failures.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(task)
        raise


def default_commit_on(status: int) -> bool:
    """The default commit predicate: commit below 400, roll back from 400."""
    return status < 400
