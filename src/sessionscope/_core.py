"""The ``Database``: one engine, its session factory, and a registry keyed per unit of work."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, overload

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from typing_extensions import TypeVar

from . import _config, _tracking
from ._units import UnitRegistry, Units

if TYPE_CHECKING:
    from ._begin import AsyncBegin, SyncBegin

__all__ = ["Database"]

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
        self.units = Units(self)
        """The units of work: what the adapters open and end (see ``_units``)."""
        if given:
            # Explicit configuration fails here, at start-up, rather than on the first request.
            self._setup()

    # -- configuration ------------------------------------------------------------------

    def configure(
        self,
        url: str | URL | None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Fill in what the constructor left open (used by ``init_app``)."""
        with self.units.lock:
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
        with self.units.lock:
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
            assert self._engine is not None
            _tracking.watch(self._engine)
            units = self.units
            registry: scoped_session[Session] | async_scoped_session[AsyncSession]
            if isinstance(factory, async_sessionmaker):
                registry = async_scoped_session(factory, scopefunc=lambda: units.current().key)
            else:
                registry = scoped_session(factory, scopefunc=lambda: units.current().key)
            registry.registry = UnitRegistry(units, registry.registry.createfunc)
            units.is_async = isinstance(registry, async_scoped_session)
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
        return self.units.is_async

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

    @property
    def live_units(self) -> int:
        """How many units of work are open now (for tests and leak checks)."""
        return self.units.live_units

    @property
    def live_sessions(self) -> int:
        """How many sessions the registry holds now (for tests and leak checks)."""
        return self.units.live_sessions

    def after_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback()`` after the current unit commits successfully.

        Callbacks run in the order they were registered and only if the commit succeeded;
        a rollback drops them. One that raises is logged and changes neither the response
        nor the next unit. With an async database a callback may be a coroutine function.

        A callback runs once the commit that covers it has succeeded: the unit's own
        commit, or one the app made itself (``db.session.commit()``), even if the unit
        then rolls back what it wrote after it. Callbacks run when the unit settles (as
        the response starts, at the end of a stream, at the end of a ``db.begin()`` block),
        after its session was removed when it is removed; for a synchronous database
        under ``SessionMiddleware`` in a worker thread, never on the event loop.
        """
        unit = self.units.current()
        if unit.callbacks is None:
            unit.callbacks = [callback]
        else:
            unit.callbacks.append(callback)

    def set_rollback_only(self) -> None:
        """Mark the current unit so that it rolls back whatever the response status.

        For dry runs and for validation that fails after writes were flushed.
        """
        self.units.current().rollback_only = True

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
