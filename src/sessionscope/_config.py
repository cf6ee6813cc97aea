"""Turning a URL and options into an engine and a session factory, with errors that help."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

__all__ = ["DEFAULT_FILENAME", "default_url", "make_engine", "make_session_factory", "safe_url"]

logger = logging.getLogger("sessionscope")

DEFAULT_FILENAME = "sessionscope.sqlite3"

# Sessions we build keep their objects loaded after the commit: the commit runs when the
# response starts, and a streaming body or an async serializer may still read attributes
# (an expired attribute would need a new query, which an AsyncSession cannot run implicitly).
DEFAULT_SESSION_OPTIONS: Mapping[str, Any] = {"expire_on_commit": False}

# An SQLite file's pool keeps every connection it may open (SQLAlchemy's own limit, 5 + 10
# overflow, as one number). A unit holds its connection until its response starts, so under
# load more units hold one at once than the 5 that SQLAlchemy's default keeps idle; it closed
# the others as they came back, and reopening an SQLite file (its schema, WAL pragmas) cost
# sync reads a third of their throughput in the benchmarks. Idle SQLite connections are
# local file handles, with no server to spare.
SQLITE_POOL_OPTIONS: Mapping[str, Any] = {"pool_size": 15, "max_overflow": 0}
_POOL_CHOICES = ("pool_size", "max_overflow", "poolclass", "pool")
# An in-memory SQLite database lives in one connection, which the pool keeps for good.
MEMORY_POOL_OPTIONS: Mapping[str, Any] = {"poolclass": QueuePool, "pool_size": 1, "max_overflow": 0}

_DRIVER_PACKAGES = {
    "aiosqlite": "aiosqlite",
    "asyncpg": "asyncpg",
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pymysql": "pymysql",
    "aiomysql": "aiomysql",
    "asyncmy": "asyncmy",
    "mysqldb": "mysqlclient",
    "mariadbconnector": "mariadb",
}


def safe_url(url: str | URL) -> str:
    """Render ``url`` with its password hidden, for messages and logs: the one in
    ``user:password@`` and one given as a query parameter (``?password=...``)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<unparsable URL>"
    rendered = parsed.render_as_string(hide_password=True)
    if "password" in parsed.query:
        rendered = _QUERY_PASSWORD.sub(r"\1***", rendered)
    if parsed.get_backend_name() == "sqlite" and parsed.database == ":memory:":
        # SQLAlchemy renders it percent-encoded: show it as it is written.
        rendered = rendered.replace("%3Amemory%3A", ":memory:", 1)
    return rendered


_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")


def brief(error: BaseException) -> str:
    """``error``'s class and the first line of what the driver said, for a log line: no SQL
    and no values (PostgreSQL's DETAIL line, which quotes them, is left out)."""
    cause = getattr(error, "orig", None) or error
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__


def default_url() -> str:
    """``DATABASE_URL`` if set, else the embedded SQLite file in the working directory."""
    return os.environ.get("DATABASE_URL") or f"sqlite:///{Path.cwd() / DEFAULT_FILENAME}"


def is_embedded(url: str | URL) -> bool:
    """Whether ``url`` names the embedded default, an SQLite file named ``DEFAULT_FILENAME``."""
    rendered = str(url)
    return rendered.startswith("sqlite:///") and rendered.endswith(DEFAULT_FILENAME)


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise ValueError(
            f"{url!r} is not a database URL. Give one like"
            " 'postgresql+psycopg://user:password@host/dbname' or 'sqlite:///app.sqlite3'."
        ) from None


def is_async_url(url: str | URL) -> bool:
    """Tell whether the driver named in ``url`` is an asyncio driver."""
    parsed = _parse(url)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        if parsed.get_backend_name() == "postgres":
            # What several hosting platforms put in DATABASE_URL.
            raise ValueError(
                f"Unknown database driver {parsed.drivername!r} in {safe_url(parsed)!r}:"
                " SQLAlchemy spells it 'postgresql'. Write the URL as"
                f" {safe_url(parsed.set(drivername='postgresql+psycopg'))!r} (psycopg 3), or"
                " 'postgresql+asyncpg://...' for asyncio."
            ) from None
        raise ValueError(
            f"Unknown database driver {parsed.drivername!r} in {safe_url(parsed)!r}."
            " Use a SQLAlchemy dialect name such as 'sqlite', 'sqlite+aiosqlite',"
            " 'postgresql+psycopg', 'postgresql+asyncpg', 'mysql+pymysql' or 'mysql+aiomysql'."
        ) from None
    return bool(getattr(dialect, "is_async", False))


def _enable_wal(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _use_wal(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # Best effort: a read-only file, or one another process holds locked in rollback-journal
    # mode, stays in its mode rather than refuse the connection.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
    except Exception as exc:
        logger.warning(
            "Could not put the SQLite file in WAL mode (%s); it stays in its journal mode, in"
            " which a reader's transaction holds off writers' commits until it ends.",
            exc,
        )
    finally:
        cursor.close()


def make_engine(
    url: str | URL, options: Mapping[str, Any], *, embedded: bool, pgbouncer: bool = False
) -> Engine | AsyncEngine:
    """Create the engine for ``url``, passing ``options`` to SQLAlchemy unchanged.

    The defaults added: an SQLite file's pool keeps all of its 15 connections
    (``SQLITE_POOL_OPTIONS``), unless ``options`` choose a pool size or class; an SQLite
    file is put in WAL mode (the embedded default also gets ``synchronous=NORMAL``).
    """
    parsed = _parse(url)
    asynchronous = is_async_url(parsed)
    create = create_async_engine if asynchronous else _create_sync_engine
    if pgbouncer:
        options = pgbouncer_options(parsed, options)
    if not any(name in options for name in _POOL_CHOICES):
        if _is_sqlite_file(parsed):
            options = {**SQLITE_POOL_OPTIONS, **options}
        elif is_sqlite_memory(parsed) and not asynchronous:
            # One database per connection: every thread must get the same one, or a table
            # created at start-up is missing in the requests a server's threads run. And
            # one unit at a time: shared by several at once (a StaticPool), one request's
            # rollback took a concurrent request's rows, already answered 201, with it.
            connect_args = {"check_same_thread": False, **options.get("connect_args", {})}
            options = {**MEMORY_POOL_OPTIONS, **options, "connect_args": connect_args}
    try:
        engine: Engine | AsyncEngine = create(parsed, **options)
    except ModuleNotFoundError as exc:
        driver = parsed.get_driver_name()
        package = _DRIVER_PACKAGES.get(driver, exc.name or driver)
        raise RuntimeError(
            f"The driver {driver!r} needed for {safe_url(parsed)!r} is not installed."
            f" Install it with 'pip install {package}'."
        ) from exc
    except TypeError as exc:
        raise TypeError(
            f"Invalid engine option for {safe_url(parsed)!r}: {str(exc).rstrip('. ')}."
            " 'engine_options' is passed unchanged to SQLAlchemy's create_engine();"
            " check its documentation for the names it accepts."
        ) from exc
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if embedded:
        event.listen(sync_engine, "connect", _enable_wal)
    elif _is_sqlite_file(parsed):
        # Units run real transactions (see _sqlite): outside WAL mode a reader's transaction
        # would hold off every writer's COMMIT until it ends.
        event.listen(sync_engine, "connect", _use_wal)
    return engine


def is_sqlite_memory(url: URL) -> bool:
    """Whether ``url`` names an SQLite database that lives in memory (one per connection)."""
    return url.get_backend_name() == "sqlite" and not _is_sqlite_file(url)


def _unique_statement_name() -> str:
    return f"__sessionscope_{uuid.uuid4().hex}__"


def pgbouncer_options(url: str | URL, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the driver settings that make ``url``'s driver safe behind PgBouncer
    in transaction pooling mode.

    A transaction may run on another server connection than the one before it, so nothing
    may outlive a transaction on the server: the drivers' server-side prepared statements
    must go. psycopg 3 prepares a statement on its fifth run (``prepare_threshold``);
    asyncpg prepares every statement and caches it, and names it after a counter that two
    clients sharing a server connection both use. psycopg2 prepares nothing. A setting of
    the same name in ``options["connect_args"]`` that would undo one is refused.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(
            f"'pgbouncer=True' is for PostgreSQL URLs, and {safe_url(parsed)!r} is not one:"
            " PgBouncer pools PostgreSQL connections only."
        )
    driver = parsed.get_driver_name()
    settings: dict[str, Any]
    if driver in ("psycopg", "psycopg_async"):
        settings = {"prepare_threshold": None}
    elif driver == "asyncpg":
        # SQLAlchemy's asyncpg dialect takes the last two; asyncpg the first.
        settings = {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": _unique_statement_name,
        }
    elif driver == "psycopg2":
        settings = {}
    else:
        raise ValueError(
            f"'pgbouncer=True' cannot tell how to keep the driver {driver!r} from preparing"
            " statements on the server, which breaks under PgBouncer's transaction pooling."
            " Use 'postgresql+psycopg', 'postgresql+asyncpg' or 'postgresql+psycopg2'."
        )
    connect_args = dict(options.get("connect_args") or {})
    if "prepared_statement_name_func" in connect_args:
        settings.pop("prepared_statement_name_func", None)  # names of the app's own choice
    for name, value in settings.items():
        if name in connect_args and connect_args[name] != value:
            raise ValueError(
                f"'connect_args' sets {name!r} to {connect_args[name]!r}, which 'pgbouncer=True'"
                f" must set to {value!r} for the driver {driver!r}: remove it."
            )
    return {**options, "connect_args": {**connect_args, **settings}}


def _is_sqlite_file(url: URL) -> bool:
    # SQLAlchemy pools a file database in a QueuePool; memory databases get other pools.
    database = url.database
    return (
        url.get_backend_name() == "sqlite"
        and bool(database)
        and database != ":memory:"
        and url.query.get("mode") != "memory"
    )


def _create_sync_engine(url: URL, **options: Any) -> Engine:
    from sqlalchemy import create_engine

    return create_engine(url, **options)


def make_session_factory(
    engine: Engine | AsyncEngine, options: Mapping[str, Any]
) -> sessionmaker[Session] | async_sessionmaker[AsyncSession]:
    """Build the session factory for ``engine`` and check ``options`` at once."""
    if "bind" in options:
        raise TypeError(
            "'session_options' may not set 'bind': the sessions are bound to the Database's"
            " engine. To join sessions to a connection of your own, pass"
            " 'session_factory=sessionmaker(bind=connection,"
            ' join_transaction_mode="create_savepoint")\' instead; for a test that rolls'
            " back everything, use 'sessionscope.testing.isolated(db)'."
        )
    merged = {**DEFAULT_SESSION_OPTIONS, **options}
    factory: sessionmaker[Session] | async_sessionmaker[AsyncSession]
    if isinstance(engine, AsyncEngine):
        factory = async_sessionmaker(engine, **merged)
    else:
        factory = sessionmaker(engine, **merged)
    try:
        # sessionmaker only checks its options when it builds a session; building one here
        # opens nothing (no connection until the session runs SQL) and fails early instead.
        factory()
    except TypeError as exc:
        raise TypeError(
            f"Invalid session option: {exc}. 'session_options' is passed unchanged to"
            " SQLAlchemy's sessionmaker(); check its documentation for the names it accepts."
        ) from exc
    return factory
