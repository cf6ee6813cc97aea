"""``db.begin()`` and ``db.run()``: a unit of work outside any request."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._retry import backoff, check_retries, log_retry, retry_code
from ._unit import Binding, Unit

if TYPE_CHECKING:
    from ._core import Database

__all__ = ["AsyncBegin", "SyncBegin", "run", "run_async"]

T = TypeVar("T")


class _Begin:
    __slots__ = ("_attempt", "_db", "_retries_left", "_token", "_unit")

    def __init__(
        self, db: Database[Any], attempt: int | None = None, retries_left: bool = False
    ) -> None:
        self._db = db
        self._unit: Unit | None = None
        self._token: Token[Binding | None] | None = None
        self._attempt = attempt
        self._retries_left = retries_left

    def _open(self) -> Unit:
        if self._unit is not None:
            raise RuntimeError(
                "This 'db.begin()' block was already entered; call 'db.begin()' again."
            )
        units = self._db.units
        outer = units.binding.get()
        parent = outer.unit if outer is not None else None
        if parent is None and outer is not None and outer.renewable:
            # A request that has not used 'db.session' yet: its unit opens now (no session,
            # no connection), so that what happens in this block is known to it (a pool
            # timeout, a commit that forbids running the request again).
            parent = units.current()
        # Nested in an app's unit, it connects where that unit does.
        unit = self._unit = units.open(source=units.source(), parent=parent)
        if outer is not None:
            unit.opened_in = outer  # see Binding.stored_inside
        # A plain 'db.begin()' is part of the attempt of the unit it is nested in.
        unit.attempt = self._attempt or (parent.attempt if parent is not None else 1)
        unit.retries_left = self._retries_left
        self._token = units.bind(Binding(unit, owner=self))
        return unit

    def may_run_again(self, error: BaseException) -> str | None:
        """The driver's code if the unit failed with ``error`` for losing a race and nothing
        of it was stored (nor of a unit nested in it), so that it may run again."""
        unit = self._unit
        if unit is None or unit.commits or unit.no_retry:
            return None
        return retry_code(error, self._db.uses_engine)

    def _close_binding(self) -> None:
        assert self._token is not None
        self._db.units.unbind(self._token)

    def _session(self) -> Any:
        """The unit's session; if it cannot be made, the unit ends here (no exit follows)."""
        try:
            return self._db.session()
        except BaseException:
            assert self._unit is not None
            try:
                self._db.units.remove(self._unit)  # it has no session: nothing to wait for
            finally:
                self._close_binding()
            raise


class SyncBegin(_Begin):
    """``with db.begin() as session:`` for a database with a synchronous driver."""

    __slots__ = ()

    def __enter__(self) -> Session:
        self._open()
        session = self._session()
        assert isinstance(session, Session)
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._unit is not None
        try:
            error = self._db.units.end(self._unit, commit=exc_type is None)
        finally:
            self._close_binding()
        if error is not None:
            raise error

    async def __aenter__(self) -> Session:
        raise TypeError(
            f"{self._db!r} uses a synchronous driver: use 'with db.begin() as session:'."
            " For 'async with', give an async driver such as 'sqlite+aiosqlite' or"
            " 'postgresql+asyncpg'."
        )

    async def __aexit__(self, *exc_info: object) -> None:  # pragma: no cover - unreachable
        return None


class AsyncBegin(_Begin):
    """``async with db.begin() as session:`` for a database with an asyncio driver."""

    __slots__ = ()

    async def __aenter__(self) -> AsyncSession:
        self._open()
        session = self._session()
        assert isinstance(session, AsyncSession)
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._unit is not None
        try:
            error = await self._db.units.end_async(self._unit, commit=exc_type is None)
        finally:
            self._close_binding()
        if error is not None:
            raise error

    def __enter__(self) -> AsyncSession:
        raise TypeError(
            f"{self._db!r} uses an async driver: use 'async with db.begin() as session:'."
        )

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - unreachable
        return None


def run(db: Database[Any], fn: Callable[[Session], T], retries: int) -> T:
    """``db.run()``: ``fn(session)`` in a unit of its own, run again if it loses a race."""
    attempts = check_retries(retries) + 1
    for attempt in range(1, attempts + 1):
        begin = SyncBegin(db, attempt, retries_left=attempt < attempts)
        try:
            with begin as session:
                result = fn(session)
                if inspect.isawaitable(result):
                    _refuse_awaitable(result)
                return result
        except Exception as error:
            code = begin.may_run_again(error) if attempt < attempts else None
            if code is None:
                raise
            log_retry(_name(fn), code, attempt, attempts)
        time.sleep(backoff(attempt))
    raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises


async def run_async(
    db: Database[Any], fn: Callable[[AsyncSession], Awaitable[T]], retries: int
) -> T:
    """``db.run_async()``: ``run`` for an async database."""
    attempts = check_retries(retries) + 1
    for attempt in range(1, attempts + 1):
        begin = AsyncBegin(db, attempt, retries_left=attempt < attempts)
        try:
            async with begin as session:
                return await fn(session)
        except Exception as error:
            code = begin.may_run_again(error) if attempt < attempts else None
            if code is None:
                raise
            log_retry(_name(fn), code, attempt, attempts)
        await anyio.sleep(backoff(attempt))
    raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns or raises


def _refuse_awaitable(result: object) -> None:
    if inspect.iscoroutine(result):
        result.close()  # never to be awaited: no "never awaited" warning later
    raise TypeError(
        "'db.run(fn)' got an awaitable from 'fn': the unit would end before it runs. Give a"
        " plain function, or use 'await db.run_async(fn)' with an async database."
    )


def _name(fn: Callable[..., object]) -> str:
    return repr(getattr(fn, "__qualname__", fn))
