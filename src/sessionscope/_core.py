"""The ``Database``: one engine, its session factory, and a registry keyed per unit of work."""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, overload

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from typing_extensions import TypeVar

from . import _config, _exhaustion, _forks, _replicas, _sqlite, _tracking
from ._source import Source
from ._sqlite import SqliteBegin
from ._units import UnitRegistry, Units

if TYPE_CHECKING:
    from ._begin import AsyncBegin, SyncBegin
    from ._unit import Unit

__all__ = ["Database"]

SessionT = TypeVar("SessionT", Session, AsyncSession, default=Any)  # type: ignore[misc]
T = TypeVar("T")


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


class _EngineProperty:
    """``db.engine``: created on first use when sessionscope builds it from a URL.

    An ``Engine`` for a synchronous database, an ``AsyncEngine`` for an async one. Inside a
    unit of a Flask app with a database of its own (``db.init_app``), that app's engine.
    """

    @overload
    def __get__(self, db: None, owner: type[Any]) -> _EngineProperty: ...
    @overload
    def __get__(self, db: Database[AsyncSession], owner: type[Any]) -> AsyncEngine: ...
    @overload
    def __get__(self, db: Database[Session], owner: type[Any]) -> Engine: ...
    @overload
    def __get__(self, db: Database[Any], owner: type[Any]) -> Any: ...
    def __get__(self, db: Database[Any] | None, owner: type[Any]) -> Any:
        if db is None:
            return self
        return db._current_engine()


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
    :param pgbouncer: the database is reached through PgBouncer in transaction pooling
        mode: the driver prepares no statement on the server (psycopg 3, asyncpg; psycopg2
        never does). Other drivers, and URLs that are not PostgreSQL, are refused.
    :param sqlite_begin: how the transactions of an SQLite engine created here begin. Such
        an engine runs real transactions (sessionscope sends ``BEGIN`` itself; the driver
        would commit DDL at once and read outside any transaction), and a file is put in
        WAL mode. ``"auto"`` (the default): ``BEGIN IMMEDIATE`` for the units of requests
        whose method is not GET, HEAD, OPTIONS or TRACE (they take the write lock at their
        first statement, so a read that turns into a write cannot fail with "database is
        locked"), ``BEGIN`` for every other unit; ``"deferred"``: always ``BEGIN``;
        ``"immediate"``: always ``BEGIN IMMEDIATE``.
    :param replicas: read replicas of the database, as URLs (engines are created with the
        same ``engine_options``, and ping their connections as they hand them out) or
        engines of yours. A unit starts on one (in turn, among those reachable) when it is
        a request with a safe method (GET, HEAD, OPTIONS, TRACE) or calls
        ``db.use_replica()``, and moves to the primary, for good, at its first statement
        that is not known to only read (a flush, INSERT, UPDATE, DELETE, ``SELECT ... FOR
        UPDATE``, a ``text()`` that is not a plain SELECT) or at ``db.use_primary()``. A
        replica that cannot be reached is left out for a few seconds; its unit reads from
        the primary.
    :param read_your_writes: seconds during which a client whose request committed a
        write reads from the primary (a cookie set on the response), so that it sees what it
        just saved; 0 sets no cookie. Only with ``replicas``.

    The driver decides between ``Session`` and ``AsyncSession``: ``sqlite+aiosqlite``,
    ``postgresql+asyncpg`` or ``mysql+aiomysql`` give an ``AsyncSession``.

    ```python
    db = Database("postgresql+psycopg://app@localhost/app")
    with db.begin() as session:
        session.add(Item(name="first"))
    ```
    """

    session = _SessionProperty()
    engine = _EngineProperty()
    begin = _BeginProperty()

    @overload
    def __init__(
        self: Database[AsyncSession],
        url: None = None,
        *,
        engine: AsyncEngine,
        session_options: Mapping[str, Any] | None = None,
        replicas: Sequence[str | URL | Engine | AsyncEngine] = (),
        read_your_writes: float = 15,
    ) -> None: ...
    @overload
    def __init__(
        self: Database[Session],
        url: None = None,
        *,
        engine: Engine,
        session_options: Mapping[str, Any] | None = None,
        replicas: Sequence[str | URL | Engine | AsyncEngine] = (),
        read_your_writes: float = 15,
    ) -> None: ...
    @overload
    def __init__(
        self: Database[AsyncSession],
        url: None = None,
        *,
        session_factory: async_sessionmaker[AsyncSession],
        replicas: Sequence[str | URL | Engine | AsyncEngine] = (),
        read_your_writes: float = 15,
    ) -> None: ...
    @overload
    def __init__(
        self: Database[Session],
        url: None = None,
        *,
        session_factory: sessionmaker[Session],
        replicas: Sequence[str | URL | Engine | AsyncEngine] = (),
        read_your_writes: float = 15,
    ) -> None: ...
    @overload
    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        pgbouncer: bool = False,
        sqlite_begin: SqliteBegin = "auto",
        replicas: Sequence[str | URL | Engine | AsyncEngine] = (),
        read_your_writes: float = 15,
    ) -> None: ...
    def __init__(
        self,
        url: str | URL | None = None,
        *,
        engine: Engine | AsyncEngine | None = None,
        session_factory: sessionmaker[Session] | async_sessionmaker[AsyncSession] | None = None,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        pgbouncer: bool = False,
        sqlite_begin: SqliteBegin = "auto",
        replicas: Sequence[str | URL | Engine | AsyncEngine] = (),
        read_your_writes: float = 15,
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
        if pgbouncer and (engine or session_factory):
            raise TypeError(
                "'pgbouncer=True' applies when sessionscope creates the engine from a URL."
                " Give the engine you create the driver settings yourself: psycopg"
                " connect_args={'prepare_threshold': None}; asyncpg connect_args="
                "{'statement_cache_size': 0, 'prepared_statement_cache_size': 0,"
                " 'prepared_statement_name_func': <a function returning unique names>}."
            )
        if pgbouncer and url is not None:
            _config.pgbouncer_options(url, {})  # a URL it cannot make safe fails here
        if sqlite_begin != "auto" and (engine or session_factory):
            raise TypeError(
                "'sqlite_begin' applies when sessionscope creates the engine from a URL;"
                " an engine you pass keeps its own transaction handling."
            )
        self._sqlite_begin = _sqlite.check_mode(sqlite_begin, url)
        self._replica_specs = _check_replicas(replicas, read_your_writes, named=bool(given))
        self.read_your_writes = float(read_your_writes) if replicas else 0.0
        """Seconds a client reads from the primary after a write (0: no cookie is set)."""
        self._replicas: _replicas.Replicas | None = None
        self._owned_replicas: list[Engine | AsyncEngine] = []
        if session_options and session_factory is not None:
            raise TypeError(
                "'session_options' does not apply to a 'session_factory' you built;"
                " configure the sessionmaker itself."
            )
        self._url = url
        # What the constructor was given (not what was built from the default since).
        self._named = bool(given)
        # The default URL read when the registry was made, so that a 'DATABASE_URL' set
        # later cannot give an async engine to sync sessions.
        self._default_url: str | None = None
        self._engine_options: Mapping[str, Any] = dict(engine_options or {})
        self._pgbouncer = pgbouncer
        self._session_options: Mapping[str, Any] = dict(session_options or {})
        self._engine = engine
        self._session_factory = session_factory
        self._owns_engine = False
        self._embedded = False
        # Databases of other apps this one serves ('add_source'), disposed with it.
        self._sources: weakref.WeakSet[Source] = weakref.WeakSet()
        # Set for good by the first 'add_source': code outside any app is then refused,
        # also once the apps and their sources are gone.
        self._serves_apps = False
        self._registry: scoped_session[Session] | async_scoped_session[AsyncSession] | None
        self._registry = None
        self.units = Units(self)
        """The units of work: what the adapters open and end (see ``_units``)."""
        if given:
            # Explicit configuration fails here, at start-up, rather than on the first request.
            self._setup()

    # -- configuration ------------------------------------------------------------------

    @property
    def names_database(self) -> bool:
        """Whether a URL, engine or session factory was given (else ``init_app`` takes each
        Flask app's database from its config, and other code gets ``DATABASE_URL``'s)."""
        return self._named

    def _setup(
        self, sync: bool = False
    ) -> scoped_session[Session] | async_scoped_session[AsyncSession]:
        with self.units.lock:
            if self._registry is not None:
                return self._registry
            factory: sessionmaker[Session] | async_sessionmaker[AsyncSession]
            lazy = False
            if not self._named:
                self._default_url = _config.default_url()
                lazy = sync or not _config.is_async_url(self._default_url)
            if lazy:
                # Nothing names the database yet: the session class exists now (listeners may
                # be registered on 'db.session' at import), the engine only once a unit needs
                # it, and never if every unit connects to an app's own ('db.init_app').
                options = {**_config.DEFAULT_SESSION_OPTIONS, **self._session_options}
                factory = sessionmaker(**options)
            else:
                factory = self._build()
            units = self.units
            registry: scoped_session[Session] | async_scoped_session[AsyncSession]
            if isinstance(factory, async_sessionmaker):
                registry = async_scoped_session(factory, scopefunc=lambda: units.current().key)
            else:
                registry = scoped_session(factory, scopefunc=lambda: units.current().key)
            registry.registry = UnitRegistry(units, self._new_session)
            units.is_async = isinstance(registry, async_scoped_session)
            self._registry = registry
            return registry

    def _build(
        self, session_class: type[Session] | None = None
    ) -> sessionmaker[Session] | async_sessionmaker[AsyncSession]:
        """Create the engine (from the URL) and the session factory of the database's own."""
        factory = self._session_factory
        if factory is None:
            engine = self._engine
            if engine is None:
                url = self._url
                if url is None:
                    url = self._default_url or _config.default_url()
                    if url != _config.default_url():
                        raise RuntimeError(
                            f"'DATABASE_URL' changed after 'db.session' was first used: it"
                            f" was {_config.safe_url(url)!r} then, and the sessions were made"
                            " for it. Set 'DATABASE_URL' before the first use of"
                            " 'db.session' (load '.env' first), or give the Database its URL."
                        )
                    self._embedded = _config.is_embedded(url)
                    _sqlite.check_mode(self._sqlite_begin, url)  # the URL it was given for
                engine = _config.make_engine(
                    url, self._engine_options, embedded=self._embedded, pgbouncer=self._pgbouncer
                )
                self._owns_engine = True
                self._engine = engine
                self._prepare(engine)
            options = self._session_options
            if session_class is not None:
                options = {"class_": session_class, **options}
            factory = _config.make_session_factory(engine, options)
            self._session_factory = factory
        elif self._engine is None:
            bind = factory.kw.get("bind")
            if isinstance(bind, Connection | AsyncConnection):
                # Sessions that join a connection the caller manages (a test's outer
                # transaction): the engine is that connection's.
                bind = bind.engine
            if not isinstance(bind, Engine | AsyncEngine):
                raise TypeError(
                    f"The 'session_factory' is bound to {bind!r}, not to an engine or a"
                    " connection, so sessionscope cannot tell which database its units use."
                    " Create it as 'sessionmaker(engine)' or 'async_sessionmaker(engine)'"
                    " (or bound to a Connection)."
                )
            self._engine = bind
        assert self._engine is not None
        if not self._owns_engine:
            self._prepare(self._engine, created=False)
        if self._replica_specs and self._replicas is None:
            self._replicas = self._make_replicas(self._engine)
        return factory

    def _make_replicas(self, primary: Engine | AsyncEngine) -> _replicas.Replicas:
        engines: list[Engine] = []
        for spec in self._replica_specs:
            if isinstance(spec, Engine | AsyncEngine):
                engine = spec
                if engine is primary or _sync(engine).dialect is _sync(primary).dialect:
                    raise ValueError(
                        "A replica is the primary's own engine: give each replica an engine"
                        " (or a URL) of its own, or no 'replicas' at all."
                    )
                self._prepare(engine, created=False)
            else:
                options = {"pool_pre_ping": True, **self._engine_options}
                engine = _config.make_engine(
                    spec, options, embedded=False, pgbouncer=self._pgbouncer
                )
                self._owned_replicas.append(engine)
                self._prepare(engine)
            if isinstance(engine, AsyncEngine) != isinstance(primary, AsyncEngine):
                kind = "an async" if isinstance(primary, AsyncEngine) else "a synchronous"
                raise TypeError(
                    f"The replica {_config.safe_url(engine.url)!r} does not use {kind} driver"
                    " as the primary does: give every replica the primary's driver (for"
                    " example 'postgresql+asyncpg://' beside an asyncpg primary)."
                )
            engines.append(_sync(engine))
        return _replicas.Replicas(engines)

    def uses_engine(self, engine: Engine) -> bool:
        """Whether ``engine`` (a sync engine: an async one's ``sync_engine``) is one this
        database's units connect to: its own, an app's (``add_source``), a replica."""
        own = self._engine
        if own is not None and engine is _sync(own):
            return True
        if self._replicas is not None and engine in self._replicas.engines:
            return True
        return any(source.built_engine is engine for source in list(self._sources))

    @property
    def reads_replicas(self) -> bool:
        """Whether this database has read replicas (``replicas=``)."""
        return bool(self._replica_specs)

    def _prepare(self, engine: Engine | AsyncEngine, created: bool = True) -> None:
        """What every engine of this database gets; ``created``: one sessionscope made."""
        _tracking.watch(engine)
        _forks.protect(engine)
        _exhaustion.watch(engine, self.units.note_pool_timeout)
        if created and _sqlite.can_use_transactions(engine):
            _sqlite.use_transactions(
                engine, self._sqlite_begin, self.units.writing, self.units.outer_locker
            )

    def _own_factory(self) -> sessionmaker[Session] | async_sessionmaker[AsyncSession]:
        factory = self._session_factory
        if factory is not None:
            return factory
        registry = self.session
        with self.units.lock:
            if self._session_factory is not None:
                return self._session_factory
            if self._serves_apps:
                raise RuntimeError(
                    f"{self!r} was created without a URL and takes its database from the"
                    " config of each Flask app it serves, but this code runs outside any app:"
                    " it cannot tell which app's database to use. Run it inside"
                    " 'with app.app_context():' (or a request), or give the Database a URL."
                )
            session_class = registry.session_factory.class_
            assert issubclass(session_class, Session)
            return self._build(session_class)

    def _new_session(self, unit: Unit) -> Session | AsyncSession:
        source = unit.source
        factory = source.factory() if source is not None else self._own_factory()
        isolation = self.units.isolation
        if isolation is not None:
            return isolation.session(unit, factory)
        session = factory()
        replicas = self._replicas
        if replicas is not None:
            unit.routed = True
            if unit.reads_replica:
                unit.replica = replicas.pick()
            sync_session = session.sync_session if isinstance(session, AsyncSession) else session
            _replicas.route(sync_session, unit, replicas)
        return session

    def add_source(
        self,
        url: str | URL,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> Source:
        """A database other than this one's own, for the units an adapter opens with it.

        ``db.init_app`` adds one per Flask app whose config names a database. The engine is
        created on first use; sessions are of this database's session class, so listeners
        registered on ``db.session`` apply to them. Only for a synchronous Database created
        without a URL, engine or session factory.
        """
        registry = self._setup(sync=True)
        if self._named:
            raise RuntimeError(
                f"{self!r} already names its database, so it cannot take another one: create"
                " it as 'Database()', without a URL, to take one per app."
            )
        if self.units.is_async:
            raise RuntimeError(
                f"{self!r} hands out async sessions: 'DATABASE_URL' named an async driver"
                " when 'db.session' was first used, so it cannot take a database with"
                " synchronous sessions. Register the apps before using 'db.session'."
            )
        if _config.is_async_url(url):
            raise RuntimeError(
                f"{_config.safe_url(url)!r} names an async driver, but {self!r} hands out"
                " synchronous sessions. Give a sync driver."
            )
        session_class = registry.session_factory.class_
        assert issubclass(session_class, Session)
        engine_options = engine_options or {}
        if self._pgbouncer:
            engine_options = _config.pgbouncer_options(url, engine_options)
        _sqlite.check_mode(self._sqlite_begin, url)
        source = Source(url, engine_options, session_options or {}, session_class, self._prepare)
        self._sources.add(source)
        self._serves_apps = True
        return source

    def _current_engine(self) -> Engine | AsyncEngine:
        source = self.units.source()
        if source is not None:
            return source.engine
        if self._engine is None:
            self._own_factory()
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
        source = self.units.source()
        if source is not None:
            return _config.safe_url(source.url)
        if self._engine is None:
            url = self._url or self._default_url or _config.default_url()
            return _config.safe_url(url)
        engine = self._engine
        return _config.safe_url(
            engine.sync_engine.url if isinstance(engine, AsyncEngine) else engine.url
        )

    def __repr__(self) -> str:
        if self._serves_apps and self.units.source() is None:
            return "<Database of each Flask app's own database>"
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
        :param options: ``commit_on``, ``on_commit_error``, ``retry_after``, ``retries``
            and ``retry_body_limit``, as for ``WSGISessionMiddleware``.

        ```python
        db = Database()

        def create_app() -> Flask:
            app = Flask(__name__)
            db.init_app(app)
            return app
        ```
        """
        try:
            # Imported here so that 'import sessionscope' loads no Flask.
            from .adapters.flask import init_app
        except ModuleNotFoundError as exc:
            if exc.name not in ("flask", "werkzeug", "blinker"):
                raise
            raise RuntimeError(
                f"'db.init_app' is for Flask apps, and Flask is not installed ({exc})."
                " Install it with pip install 'sessionscope[flask]'. For an ASGI app, add"
                " 'SessionMiddleware' instead; for another WSGI app, 'WSGISessionMiddleware'."
            ) from exc

        init_app(self, app, **options)

    def run(self: Database[Session], fn: Callable[[Session], T], *, retries: int = 0) -> T:
        """Run ``fn(session)`` in a unit of work of its own and return what it returns.

        The unit commits when ``fn`` returns and rolls back if it raises, as
        ``with db.begin() as session:`` does; unlike a ``with`` block, it can be run again.
        When the unit loses a race with a concurrent transaction (a serialization failure,
        a deadlock, a lock wait timeout, a busy SQLite file: read from the driver's error
        code) and nothing of it was stored, it is rolled back, its after-commit callbacks
        are dropped, and ``fn`` runs again in a new unit after a short random wait, up to
        ``retries`` more times; each retry is logged once at WARNING. Constraint
        violations, disconnects, timeouts and other errors are raised at once, as is the
        last attempt's error. A unit that committed something itself (``session.commit()``,
        or a ``db.begin()`` nested in it) or called ``db.no_retry()`` is not run again.

        For an async database use ``await db.run_async(fn)``.

        ```python
        def transfer(session: Session) -> None:
            ...

        db.run(transfer, retries=3)
        ```
        """
        from ._begin import run

        if self.is_async:
            raise TypeError(
                f"{self!r} uses an async driver: use 'await db.run_async(fn)', with 'fn' a"
                " coroutine function."
            )
        return run(self, fn, retries)

    async def run_async(
        self: Database[AsyncSession],
        fn: Callable[[AsyncSession], Awaitable[T]],
        *,
        retries: int = 0,
    ) -> T:
        """``db.run()`` for an async database: ``await fn(session)`` in a unit of its own."""
        from ._begin import run_async

        if not self.is_async:
            raise TypeError(f"{self!r} uses a synchronous driver: use 'db.run(fn)'.")
        return await run_async(self, fn, retries)

    @property
    def attempt(self) -> int:
        """Which run of the current unit's work this is: 1, then 2 on its first retry (of
        ``db.run()``, or of a request under a middleware given ``retries``)."""
        return self.units.current().attempt

    def no_retry(self) -> None:
        """Never run the current unit's work again, even if it loses a race.

        For work with effects outside the database (an e-mail sent, a payment API called)
        that running again would repeat.
        """
        unit: Unit | None = self.units.current()
        while unit is not None:  # a unit nested in the one that would run again
            unit.no_retry = True
            unit = unit.parent

    def use_primary(self) -> None:
        """Run the rest of the current unit on the primary, reads included.

        For a unit that started on a read replica (a GET, say) and must see the latest
        data, or run something the routing cannot tell is a write (a function called in a
        SELECT, a SELECT whose CTE writes). It stays on the primary to its end.
        """
        unit = self.units.current()
        unit.reads_replica = False
        unit.replica = None

    def use_replica(self) -> None:
        """Let the current unit read from a read replica until it writes.

        For a ``db.begin()`` block, a job or a request with an unsafe method that mostly
        reads. Call it before the unit's first statement; a database without ``replicas``
        refuses it.
        """
        replicas = self._replicas
        if not self._replica_specs:
            raise RuntimeError(
                f"{self!r} has no read replicas: give 'Database(..., replicas=[...])'."
            )
        unit = self.units.current()
        session = self.units.sessions.get(unit.key)
        if session is not None:
            sync_session = session.sync_session if isinstance(session, AsyncSession) else session
            if sync_session.in_transaction():
                raise RuntimeError(
                    "'db.use_replica()' came after the unit's first statement: its transaction"
                    " is on the primary already. Call it before the unit uses 'db.session'."
                )
            if replicas is not None:
                unit.replica = replicas.pick()
        unit.reads_replica = True

    def _begin(self) -> SyncBegin | AsyncBegin:
        from ._begin import AsyncBegin, SyncBegin

        return AsyncBegin(self) if self.is_async else SyncBegin(self)

    # -- engines --------------------------------------------------------------------------

    def dispose(self) -> None:
        """Close the pooled connections of the engines this ``Database`` created.

        That is its own and those of the apps it serves with a database of their own. An
        engine you passed in is yours and is left alone. For an async database use
        ``await db.dispose_async()``.
        """
        for source in list(self._sources):
            source.dispose()
        for replica in self._owned_replicas:
            if isinstance(replica, AsyncEngine):
                raise TypeError(
                    "This database uses an async driver; use 'await db.dispose_async()'."
                )
            replica.dispose()
        if not self._owns_engine or self._engine is None:
            return
        if isinstance(self._engine, AsyncEngine):
            raise TypeError("This database uses an async driver; use 'await db.dispose_async()'.")
        self._engine.dispose()

    async def dispose_async(self) -> None:
        """Close the pooled connections of the engines this ``Database`` created (any driver)."""
        for source in list(self._sources):
            source.dispose()
        if self._owns_engine and self._engine is not None:
            if isinstance(self._engine, AsyncEngine):
                await self._engine.dispose()
            else:
                self._engine.dispose()
        for replica in self._owned_replicas:
            if isinstance(replica, AsyncEngine):
                await replica.dispose()
            else:
                replica.dispose()


def _check_replicas(
    replicas: Sequence[str | URL | Engine | AsyncEngine], read_your_writes: float, named: bool
) -> tuple[str | URL | Engine | AsyncEngine, ...]:
    """``replicas`` as given, once checked."""
    if isinstance(replicas, str | URL | Engine | AsyncEngine):
        raise TypeError(
            "'replicas' is a list of URLs or engines: write 'replicas=[url]' for one replica."
        )
    specs = tuple(replicas)
    if isinstance(read_your_writes, bool) or not isinstance(read_your_writes, int | float):
        raise TypeError(f"'read_your_writes' is a number of seconds, not {read_your_writes!r}.")
    if read_your_writes < 0:
        raise ValueError(f"'read_your_writes' must be 0 or more seconds, not {read_your_writes}.")
    if specs and not named:
        raise TypeError(
            "'replicas' needs the primary named: give the Database its URL, engine or"
            " session factory as well."
        )
    for spec in specs:
        if not isinstance(spec, str | URL | Engine | AsyncEngine):
            raise TypeError(f"A replica is a URL or an engine, not {spec!r}.")
    return specs


def _sync(engine: Engine | AsyncEngine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine
