"""The units of work of one database: which one code runs in, its session, and how it ends.

Adapters speak in events and this module decides. An adapter opens a unit (or a binding
that opens one on first use), and reports what happened: the response started with a
status (``end(unit, commit, keep=True)``: commit or roll back what was written so far and
keep the session for the stream), the response is over or the app raised or the request
was cancelled (``end(unit, commit)``: the same, then remove the session). Everything else is
decided here, the same way for every adapter: where the work runs (the event loop only if
it cannot wait, else a worker thread or a task of its own), what a cancellation means, and
when the after-commit callbacks run.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import ScopedRegistry

from . import _streams
from ._compat import connections
from ._isolation import Isolation
from ._sessions import (
    can_wait,
    close_async_session,
    close_session,
    commit_session,
    guard,
    rollback_session,
)
from ._tasks import run_in_task, run_in_thread, run_to_completion
from ._unit import Binding, Cancel, Unit

if TYPE_CHECKING:
    from ._core import Database
    from ._source import Source

__all__ = ["UnitRegistry", "Units"]

logger = logging.getLogger("sessionscope")

# Every database's units, to name the right one when 'db.session' is used in a request that
# another database's middleware handles.
_all_units: weakref.WeakSet[Units] = weakref.WeakSet()


class Units:
    """The units of work of one ``Database``.

    One lock guards a unit's opening through a binding and the store and removal of its
    session (see ``UnitRegistry``): a session is stored only while its unit is live.
    """

    def __init__(self, db: Database[Any]) -> None:
        self.db = db
        self.lock = threading.Lock()
        self.binding: ContextVar[Binding | None] = ContextVar("sessionscope_unit", default=None)
        self.sessions: dict[int, Any] = {}
        self.live: set[Unit] = set()
        self.is_async = False
        # Set while 'sessionscope.testing.isolated()' runs: sessions join one connection.
        self.isolation: Isolation | None = None
        _all_units.add(self)

    # -- opening, binding, finding ----------------------------------------------------------

    def open(
        self,
        streaming: bool = False,
        source: Source | None = None,
        parent: Unit | None = None,
        writes: bool = False,
    ) -> Unit:
        """A new unit of work (no session, no connection until ``db.session`` is used).

        :param source: where its session connects; None for the database's own engine.
        :param parent: the live unit it was opened in, if any.
        :param writes: it is expected to write (a request with an unsafe method).
        """
        unit = Unit(streaming, source, parent, writes)
        self.live.add(unit)
        return unit

    def bind(self, binding: Binding) -> Token[Binding | None]:
        return self.binding.set(binding)

    def unbind(self, token: Token[Binding | None]) -> None:
        try:
            self.binding.reset(token)
        except ValueError:
            # Reset from another context than the one that set it (a test fixture whose
            # setup and teardown run apart): restore what it replaced instead.
            self.binding.set(token.old_value if token.old_value is not Token.MISSING else None)

    def source(self) -> Source | None:
        """Where the running code's unit connects (None: the database's own engine).

        After its unit ended, the binding's: work after a Flask response connects to that
        app's database.
        """
        binding = self.binding.get()
        if binding is None:
            return None
        unit = binding.unit
        return unit.source if unit is not None and not unit.closed else binding.source

    def current(self) -> Unit:
        """The unit the running code belongs to; opens a renewable binding's unit."""
        binding = self.binding.get()
        if binding is not None:
            unit = binding.unit
            if unit is not None and not unit.closed:
                return unit
            if unit is None and binding.renewable:
                return self._renew(binding)
        self.raise_no_unit(binding)

    def _renew(self, binding: Binding) -> Unit:
        with self.lock:
            unit = binding.unit
            if unit is None and binding.renewable:
                unit = binding.unit = self.open(
                    binding.streaming, binding.source, writes=binding.writes
                )
                unit.attempt = binding.attempt
                # Opened while the response streams: its commit comes too late to run again.
                unit.retries_left = binding.retries_left and not binding.streaming
                unit.reads_replica = binding.reads_replica
            if unit is None or unit.closed:
                self.raise_no_unit(binding)
            return unit

    def _running(self) -> Unit | None:
        # The running code's unit, if it has one (no renewal, no error: see 'current').
        binding = self.binding.get()
        return binding.unit if binding is not None else None

    def writing(self) -> bool:
        """Whether the running code's unit is expected to write (``Unit.writes``)."""
        unit = self._running()
        return unit is not None and unit.writes

    def outer_locker(self, every_unit_locks: bool) -> Unit | None:
        """The live unit the running code's unit is nested in whose transaction holds an
        SQLite write lock: one expected to write (``Unit.writes``), or any if
        ``every_unit_locks``; None if there is none (see _sqlite)."""
        unit = self._running()
        outer = unit.parent if unit is not None else None
        while outer is not None:
            if (every_unit_locks or outer.writes) and self._connected(outer):
                return outer
            outer = outer.parent
        return None

    def _connected(self, unit: Unit) -> bool:
        # A transaction holding a connection: one that only add()ed has none yet.
        session = self.sessions.get(unit.key)
        if session is None:
            return False
        if isinstance(session, AsyncSession):
            session = session.sync_session
        root = session.get_transaction()
        return root is not None and bool(connections(root))

    def note_pool_timeout(self) -> None:
        """Record on the running code's unit, and the units it is nested in, that a checkout
        from the pool timed out (see ``_exhaustion``)."""
        unit = self._running()
        while unit is not None:
            unit.exhausted = True
            unit = unit.parent

    def close_binding(self, binding: Binding) -> Unit | None:
        """Stop ``binding`` opening units, and take the unit it holds (opened or opening)."""
        binding.renewable = False
        if self.lock.locked():
            # A thread may be opening its unit right now, under the lock: wait for it, so
            # that its unit is the one taken here.
            with self.lock:
                pass
        unit = binding.unit
        binding.unit = None
        return unit if unit is not None and not unit.closed else None

    def raise_no_unit(self, binding: Binding | None) -> NoReturn:
        if binding is not None:
            raise RuntimeError(
                "The unit of work this code ran in has already finished, so 'db.session'"
                " has no session to give: the request's session was committed or rolled"
                " back and removed. Work that outlives the request must open its own unit"
                " with 'with db.begin() as session:' (or 'async with')."
            )
        for other in list(_all_units):
            outer = other.binding.get()
            if other is not self and outer is not None and outer.owner is not None:
                raise RuntimeError(
                    f"No unit of work of {self.db!r} is active, so 'db.session' has no"
                    f" session to give: this request is handled by a middleware for"
                    f" {other.db!r}, another Database. Pass the database you use to the"
                    f" middleware ('SessionMiddleware(app, db=...)',"
                    f" 'app.add_middleware(SessionMiddleware, db=...)'), or use the"
                    f" Database that the middleware has."
                )
        raise RuntimeError(
            "No unit of work is active, so 'db.session' has no session to give."
            " Install 'SessionMiddleware' (ASGI) or 'WSGISessionMiddleware', call"
            " 'db.init_app(app)' (Flask), or use 'with db.begin() as session:'"
            " ('async with' for an async driver)."
        )

    # -- the session of a unit --------------------------------------------------------------

    def session_of(self, unit: Unit) -> Any:
        """``unit``'s session, or None (no I/O, no creation)."""
        return self.sessions.get(unit.key)

    def in_transaction(self, unit: Unit) -> bool:
        """Whether ``unit`` has a session with a transaction to end (no I/O, no creation)."""
        session = self.sessions.get(unit.key)
        return session is not None and session.in_transaction()

    def _take(self, unit: Unit) -> Any:
        """Mark ``unit`` ended and take its session out of the registry (exactly once)."""
        with self.lock:  # atomic with the registry's insert (see UnitRegistry)
            if unit.closed:
                return None
            unit.closed = True
            self.live.discard(unit)
            _streams.give_back(unit)
            return self.sessions.pop(unit.key, None)

    # -- ending a unit: sync (WSGI, Flask, 'with db.begin()') --------------------------------

    def end(
        self, unit: Unit, commit: bool, *, keep: bool = False, cancel: Cancel | None = None
    ) -> BaseException | None:
        """Commit (if ``commit``) or roll back ``unit``'s transaction, then remove its session
        unless ``keep`` (a stream goes on with it); return the commit's error, if any.

        Ready after-commit callbacks run last, once the connection is back if removed.
        """
        error: BaseException | None = None
        try:
            session = self.sessions.get(unit.key)
            if not (commit or keep):
                unit.callbacks = None  # the close rolls back
            elif session is not None and session.in_transaction():
                assert isinstance(session, Session)
                error = _settle(session, unit, commit, cancel)
        finally:
            if not keep:
                self.remove(unit)
        if unit.ready:
            _run_callbacks(self._ready(unit))
        return error

    def remove(self, unit: Unit) -> None:
        """End ``unit`` and close its session (a transaction left open is rolled back)."""
        session = self._take(unit)
        if session is not None:
            try:
                close_session(session)
            finally:
                if self.isolation is not None:
                    self.isolation.give_back(unit)

    def _ready(self, unit: Unit) -> Sequence[Callable[[], object]]:
        """Take the unit's ready after-commit callbacks: those to run now."""
        callbacks, unit.ready = unit.ready or (), None
        isolation = self.isolation
        if isolation is not None and callbacks:
            return isolation.capture(callbacks)
        return callbacks

    # -- ending a unit: from a coroutine (ASGI, 'async with db.begin()') ---------------------

    async def end_async(
        self, unit: Unit, commit: bool, *, keep: bool = False, inline: bool = True
    ) -> BaseException | None:
        """``end()`` from the event loop, for either kind of database.

        A sync session's end runs on the loop only when it cannot wait (``can_wait``, and
        ``inline`` allows it); otherwise in a worker thread outside the endpoints' limiter.
        An async session's end runs in a task of its own. A cancellation that arrives before
        COMMIT is sent rolls back; one that arrives after it waits for its outcome. With
        ``keep`` the response has started: once this end is done, the unit goes on with
        stream work.
        """
        # The unit's own commit is not a body holding a connection (see _streams): it is
        # stream work only between its ends.
        unit.streaming = False
        try:
            return await self._end_async(unit, commit, keep, inline)
        finally:
            if keep and not unit.closed:
                unit.streaming = True

    async def _end_async(
        self, unit: Unit, commit: bool, keep: bool, inline: bool
    ) -> BaseException | None:
        session = self.sessions.get(unit.key)
        if self.is_async:
            if session is None or not session.in_transaction():
                if not keep:
                    await self.remove_async(unit)
                if unit.ready:
                    await _run_callbacks_async(self._ready(unit))
                return None
            return await run_in_task(lambda cancel: self._end_here(unit, commit, keep, cancel))
        if session is None or not session.in_transaction():
            if not keep:
                self.remove(unit)  # no transaction: closing is bookkeeping, nothing waits
            if unit.ready:
                await run_in_thread(lambda cancel: _run_callbacks(self._ready(unit)))
            return None
        if inline and not can_wait(session, unit):
            return self.end(unit, commit, keep=keep)
        return await run_in_thread(lambda cancel: self.end(unit, commit, keep=keep, cancel=cancel))

    async def _end_here(
        self, unit: Unit, commit: bool, keep: bool, cancel: Cancel
    ) -> BaseException | None:
        error: BaseException | None = None
        try:
            session = self.sessions.get(unit.key)
            if not (commit or keep):
                unit.callbacks = None  # the close rolls back
            elif session is not None and session.in_transaction():
                assert isinstance(session, AsyncSession)
                error = await session.run_sync(
                    lambda sync_session: _settle(sync_session, unit, commit, cancel)
                )
        finally:
            if not keep:
                await self.remove_async(unit)
        if unit.ready:
            await _run_callbacks_async(self._ready(unit))
        return error

    async def remove_async(self, unit: Unit) -> None:
        """``remove()`` from the event loop, for either kind of database."""
        session = self._take(unit)
        if session is None:
            return
        try:
            await self._close_async(session)
        finally:
            if self.isolation is not None:
                self.isolation.give_back(unit)

    async def _close_async(self, session: Session | AsyncSession) -> None:
        if not session.in_transaction():
            # No transaction means no connection: closing only clears the identity map and
            # never awaits (nor waits), so it needs no task or thread of its own.
            close_session(session.sync_session if isinstance(session, AsyncSession) else session)
            return
        if isinstance(session, AsyncSession):
            # Shielded and run to completion: a cancelled request must still give its
            # connection back, and never leave it to the garbage collector.
            await run_to_completion(lambda: close_async_session(session))
        else:
            await run_in_thread(lambda cancel: close_session(session))

    # -- leak checks ------------------------------------------------------------------------

    @property
    def live_units(self) -> int:
        return len(self.live)

    @property
    def live_sessions(self) -> int:
        return len(self.sessions)


def _settle(
    session: Session, unit: Unit, commit: bool, cancel: Cancel | None
) -> BaseException | None:
    if commit and not unit.rollback_only:
        error = commit_session(session, cancel)
        if error is None:
            logger.debug("Unit %s committed", unit.key)
        else:
            unit.callbacks = None
        return error
    rollback_session(session)
    unit.callbacks = None
    logger.debug("Unit %s rolled back", unit.key)
    return None


def _run_callbacks(callbacks: Sequence[Callable[[], object]]) -> None:
    """Run after-commit callbacks in order; one that raises is logged only."""
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


async def _run_callbacks_async(callbacks: Sequence[Callable[[], object]]) -> None:
    """Run after-commit callbacks in order, awaiting those that are coroutines."""
    for callback in callbacks:
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.error("After-commit callback %r raised", callback, exc_info=True)


class UnitRegistry(ScopedRegistry[Any]):
    """The scoped registry's store: a session per live unit, never one for a unit that ended.

    SQLAlchemy's registry builds a missing session and then stores it, in two steps. A
    thread that makes a unit's first ``db.session`` call as the request ends could store
    its session after the unit was removed: an orphan that no one closes, holding its
    connection. Here the store happens under the units' lock, which ``Units`` also holds
    when it ends a unit, so a session is stored only while its unit is live.
    """

    __slots__ = ("_create", "_units")

    def __init__(self, units: Units, create: Callable[[Unit], Any]) -> None:
        super().__init__(lambda: create(units.current()), lambda: units.current().key)
        self._units = units
        self._create = create
        self.registry = units.sessions

    def __call__(self) -> Any:
        units = self._units
        unit = units.current()
        try:
            return self.registry[unit.key]
        except KeyError:
            pass
        return self._store(unit, self._create(unit))

    def has(self) -> bool:
        # 'db.session.remove()' after the unit ended (a Flask teardown after a failed
        # commit) has nothing to remove: not an error.
        binding = self._units.binding.get()
        unit = binding.unit if binding is not None else None
        return unit is not None and not unit.closed and unit.key in self.registry

    def set(self, obj: Any) -> None:
        self._store(self._units.current(), obj)

    def clear(self) -> None:
        # 'db.session.remove()' inside a unit: its close (see guard) kept the writes or reset
        # the session, and the session stays the unit's, for the unit to end. Dropping it
        # here would leave a session that nobody ends (a captured one reconnects on use).
        return None

    def _store(self, unit: Unit, session: Any) -> Any:
        units = self._units
        sync_session = session.sync_session if isinstance(session, AsyncSession) else session
        with units.lock:
            if not unit.closed:
                stored = self.registry.setdefault(unit.key, session)
                if stored is session:
                    guard(sync_session, unit)
                return stored
        # The unit ended while the session was being built: it never had a connection.
        close_session(sync_session)
        units.raise_no_unit(units.binding.get())
