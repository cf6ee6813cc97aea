"""Fixtures: a real database per backend and mode, and leak checks after every test.

Backends: an SQLite file in ``tmp_path``, and the PostgreSQL and MariaDB servers on
127.0.0.1 (a database of their own per test worker). Without a reachable server its tests
skip with the reason, except with ``CI=true``, where an unreachable server fails the run.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from sessionscope import Database

from ._models import Base

PG_ADMIN_URL = os.environ.get(
    "SESSIONSCOPE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_ADMIN_URL = os.environ.get(
    "SESSIONSCOPE_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test"
)

DRIVERS = {
    ("sqlite", "sync"): "sqlite",
    ("sqlite", "async"): "sqlite+aiosqlite",
    ("postgresql", "sync"): "postgresql+psycopg",
    ("postgresql", "async"): "postgresql+asyncpg",
    ("mariadb", "sync"): "mysql+pymysql",
    ("mariadb", "async"): "mysql+aiomysql",
}
BACKENDS = ["sqlite", "postgresql", "mariadb"]
MODES = ["sync", "async"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _worker_database_name() -> str:
    # One database per test process, so that parallel workers and parallel runs never
    # drop each other's tables.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"sessionscope_{worker}_{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _drop_server_databases() -> Iterator[None]:
    """Drop the databases this process created on the servers, once it is done."""
    yield
    name = _worker_database_name()
    for backend, reason in _server_state.items():
        if reason is not None:
            continue
        admin_url = PG_ADMIN_URL if backend == "postgresql" else MARIADB_ADMIN_URL
        quoted = f'"{name}"' if backend == "postgresql" else f"`{name}`"
        force = " WITH (FORCE)" if backend == "postgresql" else ""
        engine = sa.create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            if backend == "mariadb":
                # DROP DATABASE waits for the metadata locks of any session still inside a
                # transaction there (a server thread a failed test left behind): end them.
                connection.execute(sa.text("SET SESSION lock_wait_timeout = 10"))
                ids = connection.scalars(
                    sa.text(
                        "SELECT id FROM information_schema.processlist"
                        " WHERE db = :name AND id <> CONNECTION_ID()"
                    ),
                    {"name": name},
                ).all()
                for thread_id in ids:
                    connection.execute(sa.text(f"KILL {int(thread_id)}"))
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted}{force}"))
        engine.dispose()


_server_state: dict[str, str | None] = {}


def _prepare_server(backend: str, fresh: bool = False) -> str | None:
    """Create this worker's database on ``backend``; return why not, or None when ready.

    :param fresh: drop and create it again even if this worker did already (it is empty).
    """
    if backend in _server_state and not fresh:
        return _server_state[backend]
    name = _worker_database_name()
    admin_url = PG_ADMIN_URL if backend == "postgresql" else MARIADB_ADMIN_URL
    reason: str | None = None
    try:
        engine = sa.create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            if backend == "postgresql":
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
            else:
                connection.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
                connection.execute(sa.text(f"CREATE DATABASE `{name}`"))
        engine.dispose()
    except Exception as exc:
        reason = (
            f"{backend} server not reachable at {sa.make_url(admin_url).render_as_string()}: {exc}"
        )
    _server_state[backend] = reason
    return reason


@dataclass
class Backend:
    """Where a test's database lives, and how to look at it from outside the library."""

    name: str
    mode: str
    url: str
    check_url: str
    database: str

    @property
    def is_async(self) -> bool:
        return self.mode == "async"


def _urls(backend: str, mode: str, tmp_path: Path) -> tuple[str, str, str]:
    driver = DRIVERS[(backend, mode)]
    if backend == "sqlite":
        path = tmp_path / "test.sqlite3"
        return f"{driver}:///{path}", f"sqlite:///{path}", str(path)
    name = _worker_database_name()
    if backend == "postgresql":
        base = sa.make_url(PG_ADMIN_URL)
        sync_driver = "postgresql+psycopg"
    else:
        base = sa.make_url(MARIADB_ADMIN_URL)
        sync_driver = "mysql+pymysql"
    url = base.set(drivername=driver, database=name).render_as_string(hide_password=False)
    check = base.set(drivername=sync_driver, database=name).render_as_string(hide_password=False)
    return url, check, name


def empty_server_database(backend: str) -> str:
    """A URL (sync driver) of this worker's database on ``backend``, empty: created again.

    Skips the test when the server is unreachable, and fails it with ``CI=true``."""
    reason = _prepare_server(backend, fresh=True)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return _urls(backend, "sync", Path("unused"))[0]


def backend_params(backends: list[str] = BACKENDS, modes: list[str] = MODES) -> list[Any]:
    return [
        pytest.param((b, m), id=f"{b}-{m}", marks=[pytest.mark.backend(b)])
        for b in backends
        for m in modes
    ]


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every backend in both modes; a test narrows it with ``@pytest.mark.parametrize``."""
    name, mode = request.param
    if name != "sqlite":
        reason = _prepare_server(name)
        if reason is not None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true but {reason}")
            pytest.skip(reason)
    url, check_url, database = _urls(name, mode, tmp_path)
    info = Backend(name, mode, url, check_url, database)
    checker = sa.create_engine(check_url, poolclass=NullPool)
    if name == "sqlite":
        event.listen(checker, "connect", _sqlite_foreign_keys)
    Base.metadata.drop_all(checker)
    if name == "mariadb":
        # MariaDB has no deferrable constraints and rejects that DDL: there the foreign key
        # of 'children' is checked by the flush that commit() runs, which fails commit() too.
        tables = [t for t in Base.metadata.sorted_tables if t.name != "children"]
        Base.metadata.create_all(checker, tables=tables)
        with checker.begin() as connection:
            connection.execute(
                sa.text(
                    "CREATE TABLE children (id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY,"
                    " parent_id INTEGER NOT NULL, FOREIGN KEY (parent_id) REFERENCES parents (id))"
                )
            )
    else:
        Base.metadata.create_all(checker)
    checker.dispose()
    return info


def _sqlite_foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@pytest.fixture
def checker(backend: Backend) -> Iterator[Engine]:
    """A plain sync engine on the same database, to see what was really stored."""
    engine = sa.create_engine(backend.check_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def rows(checker: Engine) -> Callable[[], list[str]]:
    """The names stored in ``items``, read through a connection of its own."""

    def read() -> list[str]:
        with checker.connect() as connection:
            return list(connection.scalars(sa.text("SELECT name FROM items ORDER BY id")))

    return read


def idle_in_transaction(backend: Backend) -> int:
    """PostgreSQL backends of this test database left inside a transaction."""
    if backend.name != "postgresql":
        return 0
    engine = sa.create_engine(PG_ADMIN_URL, poolclass=NullPool)
    with engine.connect() as connection:
        count = connection.scalar(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :name"
                " AND state LIKE 'idle in transaction%'"
            ),
            {"name": backend.database},
        )
    engine.dispose()
    return int(count or 0)


def assert_no_leaks(db: Database[Any], backend: Backend | None = None) -> None:
    """Every connection back in the pool, no open unit, an empty registry."""
    assert db.live_units == 0, f"{db.live_units} unit(s) still open"
    assert db.live_sessions == 0, f"{db.live_sessions} session(s) left in the registry"
    assert db.sync_engine.pool.checkedout() == 0, "a connection was not returned"  # type: ignore[attr-defined]
    if backend is not None:
        assert idle_in_transaction(backend) == 0, "a PostgreSQL backend is idle in transaction"


@contextmanager
def leak_checked(made: list[Database[Any]], backend: Backend) -> Iterator[None]:
    """Run with the garbage collector off, so that a leak cannot hide behind it; then check
    every database in ``made`` for leaks."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        for db in made:
            assert_no_leaks(db, backend)
    finally:
        if gc_was_enabled:
            gc.enable()


DatabaseFactory = Callable[..., Database[Any]]


@pytest.fixture
async def make_db(backend: Backend, anyio_backend: str) -> AsyncIterator[DatabaseFactory]:
    """Build ``Database`` objects on the test's backend; check each for leaks afterwards.

    The garbage collector is off during the test, so a leak cannot hide behind it. The
    fixture is async so that async engines are disposed on the loop that made them.
    """
    made: list[Database[Any]] = []

    def make(**options: Any) -> Database[Any]:
        engine_options = options.pop("engine_options", {})
        if backend.name == "sqlite":
            engine_options = {"connect_args": {"timeout": 15}, **engine_options}
        db: Database[Any] = Database(backend.url, engine_options=engine_options, **options)
        if backend.name == "sqlite":
            event.listen(db.sync_engine, "connect", _sqlite_foreign_keys)
        made.append(db)
        return db

    try:
        with leak_checked(made, backend):
            yield make
    finally:
        for db in made:
            await db.dispose_async()


@pytest.fixture
def db(make_db: DatabaseFactory) -> Database[Any]:
    """A database on the test's backend with default options."""
    return make_db()
