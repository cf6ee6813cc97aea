"""``db.begin()``: a unit of work outside any request."""

from __future__ import annotations

from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ._unit import Binding, Unit

if TYPE_CHECKING:
    from ._core import Database

__all__ = ["AsyncBegin", "SyncBegin"]


class _Begin:
    __slots__ = ("_db", "_token", "_unit")

    def __init__(self, db: Database[Any]) -> None:
        self._db = db
        self._unit: Unit | None = None
        self._token: Token[Binding | None] | None = None

    def _open(self) -> Unit:
        if self._unit is not None:
            raise RuntimeError(
                "This 'db.begin()' block was already entered; call 'db.begin()' again."
            )
        units = self._db.units
        outer = units.binding.get()
        parent = outer.unit if outer is not None else None
        # Nested in an app's unit, it connects where that unit does.
        unit = self._unit = units.open(source=units.source(), parent=parent)
        self._token = units.bind(Binding(unit, owner=self))
        return unit

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
