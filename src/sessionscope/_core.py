"""The ``Database``: one engine, its session factory, and a registry keyed per unit of work."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Generic, NoReturn, overload

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.util import ScopedRegistry
from typing_extensions import TypeVar

from . import _config
from ._unit import (
    Binding,
    Unit,
    close_async_session,
    close_session,
    commit_session,
    rollback_session,
    run_callbacks_async,
    run_callbacks_sync,
    run_in_task,
    run_to_completion,
)

if TYPE_CHECKING:
    from ._begin import AsyncBegin, SyncBegin

__all__ = ["Database"]

logger = logging.getLogger("sessionscope")

SessionT = TypeVar("SessionT", Session, AsyncSession, default=Any)  # type: ignore[misc]


class _SessionProperty:
    """``db.session``: typed by the kind of session the database hands out."""

    @overload
    def __get__(self, db: None, owner: type[Any]) -> _SessionProperty: ...
    @overload
    def __get__(
        self, db: Database[AsyncSession], owner: type[Any]
    ) -> async_scoped_session[AsyncSession]: ...
    @overload
    def __get__(self, db: Database[Session], owner: type[Any]) -> scoped_session[Session]: ...
    @overload
    def __get__(self, db: Database[Any], owner: type[Any]) -> Any: ...
    def __get__(self, db: Database[Any] | None, owner: type[Any]) -> Any:
        if db is None:
            return self
        registry = db._registry
        return registry if registry is not None else db._setup()


class _BeginProperty:
    """``db.begin()``: an independent unit of work for scripts, CLI commands, jobs and tests.

    ``with db.begin() as session:`` (``async with`` for an async driver) commits when the
    block ends normally, rolls back when it raises, and always removes the session. Inside
    the block ``db.session`` is that session. Nested inside another unit it is a separate
    unit with its own session and transaction.
    """

    @overload
    def __get__(self, db: None, owner: type[Any]) -> _BeginProperty: ...
    @overload
    def __get__(self, db: Database[AsyncSession], owner: type[Any]) -> Callable[[], AsyncBegin]: ...
    @overload
    def __get__(self, db: Database[Session], owner: type[Any]) -> Callable[[], SyncBegin]: ...
    @overload
    def __get__(self, db: Database[Any], owner: type[Any]) -> Any: ...
    def __get__(self, db: Database[Any] | None, owner: type[Any]) -> Any:
        if db is None:
            return self
        return db._begin


class Database(Generic[SessionT]):
    """One database: its engine, its session factory, and the session of each unit of work.

    A unit of work is an HTTP request (opened by ``SessionMiddleware``,
    ``WSGISessionMiddleware`` or ``db.init_app(app)``) or a ``db.begin()`` block. Inside a unit,
    ``db.session`` is that unit's session, created on first use; it is committed or rolled
    back when the unit ends, and always removed.

    :param url: a SQLAlchemy URL. ``None`` reads ``DATABASE_URL``, else uses an SQLite file
        named ``sessionscope.sqlite3`` in the working directory (WAL mode).
    :param engine: an ``Engine`` or ``AsyncEngine`` you created; it stays yours to dispose.
    :param session_factory: a ``sessionmaker`` or ``async_sessionmaker`` you configured.
    :param engine_options: passed unchanged to ``create_engine()``. For an SQLite file
        the pool keeps every connection it opens (``pool_size=15, max_overflow=0``: the
        same limit as SQLAlchemy's default, none closed when it comes back) unless these
        options set ``pool_size``, ``max_overflow``, ``poolclass`` or ``pool``.
    :param session_options: passed unchanged to ``sessionmaker()``; sessions built here
        default to ``expire_on_commit=False``.

    The driver decides between ``Session`` and ``AsyncSession``: ``sqlite+aiosqlite``,
    ``postgresql+asyncpg`` or ``mysql+aiomysql`` give an ``AsyncSession``.

    ```python
    db = Database("postgresql+psycopg://app@localhost/app")
    with db.begin() as session:
        session.add(Item(name="first"))
    ```
    """

    session = _SessionProperty()
    begin = _BeginProperty()

    @overload
    def __init__(
        self: Database[AsyncSession],
        url: None = None,
        *,
        engine: AsyncEngine,
        session_options: Mapping[str, Any] | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: Database[Session],
        url: None = None,
        *,
        engine: Engine,
        session_options: Mapping[str, Any] | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: Database[AsyncSession],
        url: None = None,
        *,
        session_factory: async_sessionmaker[AsyncSession],
    ) -> None: ...
    @overload
    def __init__(
        self: Database[Session],
        url: None = None,
        *,
        session_factory: sessionmaker[Session],
    ) -> None: ...
    @overload
    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None: ...
    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: Engine | AsyncEngine | None = None,
        session_factory: sessionmaker[Session] | async_sessionmaker[AsyncSession] | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        given = [name for name, value in (("url", url), ("engine", engine),
                 ("session_factory", session_factory)) if value is not None]  # fmt: skip
        if len(given) > 1:
            raise TypeError(f"Give only one of 'url', 'engine' or 'session_factory', not {given}.")
        if engine_options and url is None and (engine or session_factory):
            raise TypeError(
                "'engine_options' only applies when sessionscope creates the engine from a"
                " URL; configure the engine you pass yourself."
            )
        if session_options and session_factory is not None:
            raise TypeError(
                "'session_options' does not apply to a 'session_factory' you built;"
                " configure the sessionmaker itself."
            )
        self._url = url
        self._engine_options: Mapping[str, Any] = dict(engine_options or {})
        self._session_options: Mapping[str, Any] = dict(session_options or {})
        self._engine = engine
        self._session_factory = session_factory
        self._owns_engine = False
        self._embedded = False
        self._registry: scoped_session[Session] | async_scoped_session[AsyncSession] | None
        self._registry = None
        self._async = False
        # Guards the one-time setup, a unit's opening through a binding, and the store and
        # removal of a unit's session (see _UnitRegistry).
        self._lock = threading.Lock()
        self._binding: ContextVar[Binding | None] = ContextVar("sessionscope_unit", default=None)
        self._units: set[Unit] = set()
        if given:
            # Explicit configuration fails here, at start-up, rather than on the first request.
            self._setup()

    # -- configuration ------------------------------------------------------------------

    def _configure(
        self,
        url: str | URL | None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Fill in what the constructor left open (used by ``init_app``)."""
        with self._lock:
            if self._registry is not None:
                raise RuntimeError(
                    f"{self!r} is already in use, so its URL and options can no longer"
                    " change. Configure it before the first request or 'db.session' call."
                )
            if self._url is None and self._engine is None and self._session_factory is None:
                self._url = url
            if engine_options:
                self._engine_options = {**self._engine_options, **engine_options}
            if session_options:
                self._session_options = {**self._session_options, **session_options}

    @property
    def is_configured(self) -> bool:
        """Whether the engine and session factory exist already."""
        return self._registry is not None

    def _setup(self) -> scoped_session[Session] | async_scoped_session[AsyncSession]:
        with self._lock:
            if self._registry is not None:
                return self._registry
            factory = self._session_factory
            if factory is None:
                engine = self._engine
                if engine is None:
                    url = self._url
                    if url is None:
                        url = _config.default_url()
                        self._embedded = url.startswith("sqlite:///") and url.endswith(
                            _config.DEFAULT_FILENAME
                        )
                    engine = _config.make_engine(url, self._engine_options, embedded=self._embedded)
                    self._owns_engine = True
                    self._engine = engine
                factory = _config.make_session_factory(engine, self._session_options)
                self._session_factory = factory
            elif self._engine is None:
                bind = factory.kw.get("bind")
                if not isinstance(bind, Engine | AsyncEngine):
                    raise TypeError(
                        "The 'session_factory' has no engine bound. Create it as"
                        " 'sessionmaker(engine)' or 'async_sessionmaker(engine)'."
                    )
                self._engine = bind
            registry: scoped_session[Session] | async_scoped_session[AsyncSession]
            if isinstance(factory, async_sessionmaker):
                registry = async_scoped_session(factory, scopefunc=self._scopefunc)
            else:
                registry = scoped_session(factory, scopefunc=self._scopefunc)
            registry.registry = _UnitRegistry(self, registry.registry.createfunc)
            self._async = isinstance(registry, async_scoped_session)
            self._registry = registry
            return registry

    @property
    def engine(self) -> Engine | AsyncEngine:
        """The engine; created on first use when sessionscope builds it from a URL."""
        self.session  # noqa: B018 - builds the engine
        assert self._engine is not None
        return self._engine

    @property
    def sync_engine(self) -> Engine:
        """The synchronous ``Engine``, also for an async database (its ``sync_engine``)."""
        engine = self.engine
        return engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @property
    def is_async(self) -> bool:
        """Whether ``db.session`` is an ``AsyncSession`` (an asyncio driver)."""
        if self._registry is None:
            self._setup()
        return self._async

    @property
    def url(self) -> str:
        """The database URL with the password hidden."""
        if self._registry is None and self._engine is None:
            url = self._url if self._url is not None else _config.default_url()
            return _config.safe_url(url)
        return _config.safe_url(self.sync_engine.url)

    def __repr__(self) -> str:
        return f"<Database {self.url}>"

    # -- units of work ------------------------------------------------------------------

    def _scopefunc(self) -> int:
        return self._current().key

    def _raise_no_unit(self, binding: Binding | None) -> NoReturn:
        if binding is not None:
            raise RuntimeError(
                "The unit of work this code ran in has already finished, so 'db.session'"
                " has no session to give: the request's session was committed or rolled"
                " back and removed. Work that outlives the request must open its own unit"
                " with 'with db.begin() as session:' (or 'async with')."
            )
        raise RuntimeError(
            "No unit of work is active, so 'db.session' has no session to give."
            " Install 'SessionMiddleware' (ASGI) or 'WSGISessionMiddleware', call"
            " 'db.init_app(app)' (Flask), or use 'with db.begin() as session:'"
            " ('async with' for an async driver)."
        )

    def _open_unit(self) -> Unit:
        unit = Unit()
        self._units.add(unit)
        return unit

    def _bind(self, binding: Binding) -> Token[Binding | None]:
        return self._binding.set(binding)

    def _unbind(self, token: Token[Binding | None]) -> None:
        try:
            self._binding.reset(token)
        except ValueError:
            # Reset from another context than the one that set it (a test fixture whose
            # setup and teardown run apart): restore what it replaced instead.
            self._binding.set(token.old_value if token.old_value is not Token.MISSING else None)

    def _current(self) -> Unit:
        binding = self._binding.get()
        if binding is not None:
            unit = binding.unit
            if unit is not None and not unit.closed:
                return unit
            if unit is None and binding.renewable:
                return self._renew(binding)
        self._raise_no_unit(binding)

    def _renew(self, binding: Binding) -> Unit:
        """Open the fresh unit a renewable binding hands out on first use."""
        with self._lock:
            unit = binding.unit
            if unit is None and binding.renewable:
                unit = binding.unit = self._open_unit()
            if unit is None or unit.closed:
                self._raise_no_unit(binding)
            return unit

    def _session_of(self, unit: Unit) -> Session | AsyncSession | None:
        registry = self._registry
        if registry is None:
            return None
        session: Session | AsyncSession | None = registry.registry.registry.get(unit.key)
        return session

    def _take_session(self, unit: Unit) -> Session | AsyncSession | None:
        """End ``unit`` and take its session out of the registry (exactly once)."""
        with self._lock:  # atomic with the registry's insert (see _UnitRegistry)
            if unit.closed:
                return None
            unit.closed = True
            self._units.discard(unit)
            registry = self._registry
            if registry is None:
                return None
            session: Session | AsyncSession | None
            session = registry.registry.registry.pop(unit.key, None)
            return session

    def in_transaction(self, unit: Unit) -> bool:
        """Whether ``unit`` has a session with a transaction to end (no I/O, no creation)."""
        session = self._session_of(unit)
        return session is not None and session.in_transaction()

    @property
    def live_units(self) -> int:
        """How many units of work are open now (for tests and leak checks)."""
        return len(self._units)

    @property
    def live_sessions(self) -> int:
        """How many sessions the registry holds now (for tests and leak checks)."""
        registry = self._registry
        return 0 if registry is None else len(registry.registry.registry)

    def after_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback()`` after the current unit commits successfully.

        Callbacks run in the order they were registered and only if the commit succeeded;
        a rollback drops them. One that raises is logged and changes neither the response
        nor the next unit. With an async database a callback may be a coroutine function.
        """
        unit = self._current()
        if unit.callbacks is None:
            unit.callbacks = [callback]
        else:
            unit.callbacks.append(callback)

    def set_rollback_only(self) -> None:
        """Mark the current unit so that it rolls back whatever the response status.

        For dry runs and for validation that fails after writes were flushed.
        """
        self._current().rollback_only = True

    def init_app(self, app: Any, **options: Any) -> None:
        """Manage this database's sessions for a Flask app, as a Flask extension.

        Each request gets a unit of work, committed or rolled back by its final status
        before the status reaches the server, and removed when the response is closed. An
        app context outside a request (CLI commands, ``flask shell``, tests) gets a unit
        of its own, removed when the context is torn down and never committed. A Database
        created without a URL takes it from ``app.config``: ``SQLALCHEMY_DATABASE_URI`` or
        ``DATABASE_URL``, with ``SQLALCHEMY_ENGINE_OPTIONS`` and ``SQLALCHEMY_SESSION_OPTIONS``.

        :param app: the ``flask.Flask`` application.
        :param options: ``commit_on`` and ``on_commit_error``, as for
            ``WSGISessionMiddleware``.

        ```python
        db = Database()

        def create_app() -> Flask:
            app = Flask(__name__)
            db.init_app(app)
            return app
        ```
        """
        # Imported here so that 'import sessionscope' loads no Flask.
        from .adapters.flask import init_app

        init_app(self, app, **options)

    def _begin(self) -> SyncBegin | AsyncBegin:
        from ._begin import AsyncBegin, SyncBegin

        return AsyncBegin(self) if self.is_async else SyncBegin(self)

    # -- ending a unit (sync) -----------------------------------------------------------

    def _settle_sync(self, unit: Unit, commit: bool) -> BaseException | None:
        """Commit or roll back ``unit``'s open transaction and keep its session."""
        session = self._session_of(unit)
        if session is None or not session.in_transaction():
            return None
        assert isinstance(session, Session)
        if commit and not unit.rollback_only:
            error = commit_session(session)
            if error is None:
                logger.debug("Unit %s committed", unit.key)
                run_callbacks_sync(unit)
            return error
        rollback_session(session)
        unit.callbacks = None
        logger.debug("Unit %s rolled back", unit.key)
        return None

    def _finish_sync(self, unit: Unit, commit: bool) -> BaseException | None:
        """Commit or roll back, then remove: the whole end of a unit, in one call."""
        try:
            if commit:
                return self._settle_sync(unit, commit=True)
            return None
        finally:
            self._remove_sync(unit)

    def _remove_sync(self, unit: Unit) -> None:
        session = self._take_session(unit)
        if session is not None:
            assert isinstance(session, Session)
            close_session(session)

    # -- ending a unit (async) ----------------------------------------------------------

    async def _settle_async(self, unit: Unit, commit: bool) -> BaseException | None:
        """Commit or roll back, keeping the session, in a task of its own (``run_in_task``)."""
        return await run_in_task(lambda: self._settle_async_here(unit, commit))

    async def _settle_async_here(self, unit: Unit, commit: bool) -> BaseException | None:
        session = self._session_of(unit)
        if session is None or not session.in_transaction():
            return None
        assert isinstance(session, AsyncSession)
        if commit and not unit.rollback_only:
            error = await session.run_sync(commit_session)
            if error is None:
                logger.debug("Unit %s committed", unit.key)
                await run_callbacks_async(unit)
            return error
        await session.run_sync(rollback_session)
        unit.callbacks = None
        logger.debug("Unit %s rolled back", unit.key)
        return None

    async def _finish_async(self, unit: Unit, commit: bool) -> BaseException | None:
        """Commit or roll back, then remove, in a task of its own (see ``run_in_task``)."""
        return await run_in_task(lambda: self._end_async(unit, commit))

    async def _end_async(self, unit: Unit, commit: bool) -> BaseException | None:
        try:
            if commit:
                return await self._settle_async_here(unit, commit=True)
            return None
        finally:
            await self._remove_async(unit)

    async def _remove_async(self, unit: Unit) -> None:
        session = self._take_session(unit)
        if session is None:
            return
        assert isinstance(session, AsyncSession)
        if not session.in_transaction():
            # No transaction means no connection: closing only clears the identity map and
            # never awaits, so there is nothing for a cancellation to interrupt, and no
            # need for a task of its own.
            close_session(session.sync_session)
            return
        # Shielded and run to completion: a cancelled request must still give its
        # connection back, and never leave it to the garbage collector.
        await run_to_completion(lambda: close_async_session(session))

    # -- engines --------------------------------------------------------------------------

    def dispose(self) -> None:
        """Close the pooled connections of the engine this ``Database`` created.

        An engine you passed in is yours and is left alone. For an async database use
        ``await db.dispose_async()``.
        """
        if not self._owns_engine or self._engine is None:
            return
        if isinstance(self._engine, AsyncEngine):
            raise TypeError("This database uses an async driver; use 'await db.dispose_async()'.")
        self._engine.dispose()

    async def dispose_async(self) -> None:
        """Close the pooled connections of the engine this ``Database`` created (any driver)."""
        if not self._owns_engine or self._engine is None:
            return
        if isinstance(self._engine, AsyncEngine):
            await self._engine.dispose()
        else:
            self._engine.dispose()


class _UnitRegistry(ScopedRegistry[Any]):
    """The scoped registry's store: a session per live unit, never one for a unit that ended.

    SQLAlchemy's registry builds a missing session and then stores it, in two steps. A
    thread that makes a unit's first ``db.session`` call as the request ends could store
    its session after the unit was removed: an orphan that no one closes, holding its
    connection. Here the store happens under the database's lock, which ``_take_session``
    also holds when it ends a unit, so a session is stored only while its unit is live.
    """

    __slots__ = ("_db",)

    def __init__(self, db: Database[Any], createfunc: Callable[[], Any]) -> None:
        super().__init__(createfunc, db._scopefunc)
        self._db = db

    def __call__(self) -> Any:
        db = self._db
        unit = db._current()
        try:
            return self.registry[unit.key]
        except KeyError:
            pass
        return self._store(unit, self.createfunc())

    def set(self, obj: Any) -> None:
        self._store(self._db._current(), obj)

    def _store(self, unit: Unit, session: Any) -> Any:
        db = self._db
        with db._lock:
            if not unit.closed:
                return self.registry.setdefault(unit.key, session)
        # The unit ended while the session was being built: it never had a connection.
        close_session(session.sync_session if isinstance(session, AsyncSession) else session)
        db._raise_no_unit(db._binding.get())
