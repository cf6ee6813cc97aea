"""Building a ``Database``: the default URL, bad input and the messages it gets, disposal."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

from sessionscope import Database

from ._models import Item
from .conftest import Backend, DatabaseFactory, backend_params

SECRET = "s3cr3t-pw"
PG_URL = f"postgresql+psycopg://app:{SECRET}@127.0.0.1:1/app"


# -- the default URL ------------------------------------------------------------------------


def test_database_url_from_the_environment_is_used_when_no_url_is_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Twelve-factor deployments configure the database through DATABASE_URL."""
    path = tmp_path / "from-env.sqlite3"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    db = Database()
    try:
        with db.begin() as session:
            session.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        assert path.exists()
        assert db.url == f"sqlite:///{path}"
    finally:
        db.dispose()


def test_embedded_default_is_an_sqlite_file_in_wal_mode_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The zero-configuration form must work, and WAL lets readers run during a write."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    db = Database()
    try:
        with db.begin() as session:
            assert isinstance(session, Session)
            mode = session.execute(sa.text("PRAGMA journal_mode")).scalar_one()
        assert mode == "wal"
        assert (tmp_path / "sessionscope.sqlite3").exists()
    finally:
        db.dispose()


def test_embedded_default_is_resolved_at_first_use_not_at_import(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """'sessionscope.db' is built at import; the URL must come from the environment of use."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    db = Database()
    monkeypatch.chdir(tmp_path)
    try:
        with db.begin() as session:
            session.execute(sa.text("SELECT 1"))
        assert (tmp_path / "sessionscope.sqlite3").exists()
    finally:
        db.dispose()


# -- bad input --------------------------------------------------------------------------------


def test_unknown_driver_is_a_value_error_listing_real_ones() -> None:
    """A typo in the driver name must say what the valid spellings look like."""
    with pytest.raises(ValueError, match="Unknown database driver 'postgress'") as caught:
        Database(f"postgress://app:{SECRET}@localhost/app")
    assert "postgresql+psycopg" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_text_that_is_not_a_url_is_a_value_error() -> None:
    """A path or a bare name given as URL must be refused with an example of a real URL."""
    with pytest.raises(ValueError, match="is not a database URL"):
        Database("just-a-name")


def test_driver_not_installed_names_the_package_to_install() -> None:
    """A known driver that is missing must say which 'pip install' fixes it."""
    with pytest.raises(RuntimeError, match=r"pip install psycopg2-binary") as caught:
        Database(f"postgresql+psycopg2://app:{SECRET}@localhost/app")
    assert SECRET not in str(caught.value)
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


def test_bad_engine_option_is_a_type_error_at_construction() -> None:
    """A misspelled engine option must fail at start-up, not on the first request."""
    with pytest.raises(TypeError, match=r"Invalid engine option.*pool_sise") as caught:
        Database(PG_URL, engine_options={"pool_sise": 5})
    assert SECRET not in str(caught.value)


def test_bad_engine_option_message_reads_as_sentences() -> None:
    """SQLAlchemy's own message ends with a period: the wrapped one has no double period."""
    with pytest.raises(TypeError, match="Invalid engine option") as caught:
        Database("sqlite://", engine_options={"pool_sise": 5})
    message = str(caught.value)
    assert ".." not in message
    assert ". 'engine_options' is passed unchanged" in message


@pytest.mark.parametrize("scheme", ["postgres", "postgres+psycopg2"])
def test_a_postgres_url_names_the_spelling_sqlalchemy_wants(scheme: str) -> None:
    """'postgres://' (what hosting platforms put in DATABASE_URL) says to write it as
    'postgresql+psycopg://', the same URL otherwise, password hidden."""
    with pytest.raises(ValueError, match="SQLAlchemy spells it 'postgresql'") as caught:
        Database(f"{scheme}://app:{SECRET}@db.example:5433/app")
    assert "'postgresql+psycopg://app:***@db.example:5433/app'" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_password_given_as_a_query_parameter_is_hidden() -> None:
    """'?password=...' is hidden wherever sessionscope shows the URL: repr, db.url, errors."""
    url = f"postgresql+psycopg://app@localhost/app?sslmode=require&password={SECRET}"
    db = Database(url)
    try:
        assert SECRET not in repr(db)
        assert db.url == "postgresql+psycopg://app@localhost/app?password=***&sslmode=require"
    finally:
        db.dispose()
    with pytest.raises(TypeError, match="Invalid engine option") as caught:
        Database(url, engine_options={"pool_sise": 5})
    assert SECRET not in str(caught.value)
    assert "password=***" in str(caught.value)


def test_an_in_memory_sqlite_url_is_shown_as_written() -> None:
    db = Database("sqlite:///:memory:")
    try:
        assert repr(db) == "<Database sqlite:///:memory:>"
        assert db.url == "sqlite:///:memory:"
    finally:
        db.dispose()


def test_bad_session_option_is_a_type_error_at_construction(tmp_path: Path) -> None:
    """A misspelled session option must fail at start-up, not on the first request."""
    with pytest.raises(TypeError, match=r"Invalid session option.*expire_on_comit"):
        Database(f"sqlite:///{tmp_path / 'x.sqlite3'}", session_options={"expire_on_comit": 1})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"url": "sqlite://", "engine": "ENGINE"}, "Give only one of"),
        ({"url": "sqlite://", "session_factory": "FACTORY"}, "Give only one of"),
        ({"engine": "ENGINE", "session_factory": "FACTORY"}, "Give only one of"),
        ({"engine": "ENGINE", "engine_options": {"echo": True}}, "'engine_options' only applies"),
        (
            {"session_factory": "FACTORY", "session_options": {"autoflush": False}},
            "'session_options' does not apply",
        ),
    ],
    ids=[
        "url+engine",
        "url+factory",
        "engine+factory",
        "engine+engine_options",
        "factory+session_options",
    ],
)
def test_conflicting_arguments_are_a_type_error(
    arguments: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """Two sources for one thing (or options nobody would apply) must not be silently ignored."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    factory = sessionmaker(engine)
    given: dict[str, Any] = {
        name: engine if value == "ENGINE" else factory if value == "FACTORY" else value
        for name, value in arguments.items()
    }
    try:
        with pytest.raises(TypeError, match=message):
            Database(**given)
    finally:
        engine.dispose()


def test_session_factory_without_an_engine_is_a_type_error() -> None:
    """A sessionmaker with no bind has nowhere to connect; say how to build it."""
    with pytest.raises(TypeError, match=r"not to an engine or a connection.*sessionmaker\(engine"):
        Database(session_factory=sessionmaker())


def test_password_never_appears_in_repr_or_url() -> None:
    """Reprs and URLs end up in logs and error pages; the password must not."""
    db = Database(PG_URL)
    assert SECRET not in repr(db)
    assert SECRET not in db.url
    assert "***" in db.url
    db.dispose()


def test_password_never_appears_in_repr_of_a_lazy_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The repr of an unconfigured database reads DATABASE_URL; it must hide that password."""
    monkeypatch.setenv("DATABASE_URL", PG_URL)
    assert SECRET not in repr(Database())


# -- the pool of an SQLite file ----------------------------------------------------------------

WAVE = 10
"""More connections at once than SQLAlchemy's default pool keeps idle (5)."""


async def _hold_connections_at_once(db: Database[Any], count: int) -> None:
    """``count`` units that each hold a connection while all the others hold theirs."""
    if db.is_async:
        arrived = anyio.Event()
        waiting = 0

        async def unit() -> None:
            nonlocal waiting
            async with db.begin() as session:
                await session.execute(sa.select(Item))
                waiting += 1
                if waiting == count:
                    arrived.set()
                await arrived.wait()

        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(unit)
        return
    barrier = threading.Barrier(count, timeout=10)

    def thread_unit() -> None:
        with cast(Any, db).begin() as session:
            session.execute(sa.select(Item))
            barrier.wait()

    threads = [threading.Thread(target=thread_unit) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert not any(thread.is_alive() for thread in threads)
    assert not barrier.broken


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
async def test_an_sqlite_file_keeps_the_connections_its_pool_opened(
    make_db: DatabaseFactory,
) -> None:
    """Requests that end together must not make the pool close what it opened for them.

    A unit holds its connection until its response starts, so under load more of them hold
    one at once than SQLAlchemy's default pool keeps idle (5): it closed the rest as they
    came back and reopened them for the next requests (file, WAL pragmas, schema), a third
    of all checkouts for sync reads on SQLite in the benchmarks.
    """
    db = make_db()
    opened: list[object] = []
    sa.event.listen(db.sync_engine, "connect", lambda *args: opened.append(args[0]))
    await _hold_connections_at_once(db, WAVE)
    assert len(opened) == WAVE
    assert db.sync_engine.pool.checkedin() == WAVE  # type: ignore[attr-defined]
    await _hold_connections_at_once(db, WAVE)
    assert len(opened) == WAVE  # the second wave reused every one of them


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
async def test_an_sqlite_file_pool_still_opens_at_most_fifteen_connections(
    make_db: DatabaseFactory,
) -> None:
    """The limit stays SQLAlchemy's (5 + 10 overflow): the 16th waits, then times out."""
    db = make_db(engine_options={"pool_timeout": 0.2})
    engine: Any = db.engine
    if db.is_async:
        held = [await engine.connect() for _ in range(15)]
        try:
            with pytest.raises(sa.exc.TimeoutError):
                await engine.connect()
        finally:
            for connection in held:
                await connection.close()
    else:
        sync_held = [engine.connect() for _ in range(15)]
        try:
            with pytest.raises(sa.exc.TimeoutError):
                engine.connect()
        finally:
            for sync_connection in sync_held:
                sync_connection.close()
    assert db.sync_engine.pool.checkedin() == 15  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "size", "overflow"),
    [
        ({"pool_size": 2}, 2, 10),
        ({"max_overflow": 3}, 5, 3),
        ({"pool_size": 4, "max_overflow": 1}, 4, 1),
    ],
)
def test_pool_sizes_you_pass_for_an_sqlite_file_are_used_unchanged(
    tmp_path: Path, options: dict[str, int], size: int, overflow: int
) -> None:
    db: Database[Any] = Database(f"sqlite:///{tmp_path / 'sized.sqlite3'}", engine_options=options)
    try:
        pool: Any = db.sync_engine.pool
        assert (pool.size(), pool._max_overflow) == (size, overflow)
    finally:
        db.dispose()


def test_other_pools_are_left_as_sqlalchemy_makes_them(tmp_path: Path) -> None:
    """A pool class you chose and a server database keep their pools; a memory database
    has one connection, lent to one unit at a time."""
    memory: Database[Any] = Database("sqlite://")
    static: Database[Any] = Database(
        f"sqlite:///{tmp_path / 'static.sqlite3'}", engine_options={"poolclass": StaticPool}
    )
    server: Database[Any] = Database("postgresql+psycopg://app@127.0.0.1:1/app")
    try:
        memory_pool: Any = memory.sync_engine.pool
        assert isinstance(memory_pool, QueuePool)
        assert (memory_pool.size(), memory_pool._max_overflow) == (1, 0)
        assert isinstance(static.sync_engine.pool, StaticPool)
        server_pool: Any = server.sync_engine.pool
        assert (server_pool.size(), server_pool._max_overflow) == (5, 10)
    finally:
        for db in (memory, static, server):
            db.dispose()


# -- disposal -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
async def test_dispose_closes_the_engine_the_database_created(
    make_db: DatabaseFactory,
) -> None:
    """Shutdown must close the pooled connections of the engine sessionscope built."""
    db = make_db()
    if db.is_async:
        async with db.begin() as session:
            assert isinstance(session, AsyncSession)
            await session.execute(sa.select(Item))
    else:
        with cast(Any, db).begin() as sync_session:
            sync_session.execute(sa.select(Item))
    assert db.sync_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    if db.is_async:
        with pytest.raises(TypeError, match="dispose_async"):
            db.dispose()
        await db.dispose_async()
    else:
        db.dispose()
    assert db.sync_engine.pool.checkedin() == 0  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(backends=["sqlite"]), indirect=True)
async def test_dispose_leaves_an_engine_you_passed_alone(backend: Backend) -> None:
    """An engine you created may serve other code; only you may dispose it."""
    if backend.is_async:
        async_engine = create_async_engine(backend.url)
        db: Database[Any] = Database(engine=async_engine)
        async with db.begin() as async_session:
            assert isinstance(async_session, AsyncSession)
            await async_session.execute(sa.select(Item))
        await db.dispose_async()
        assert async_engine.sync_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
        await async_engine.dispose()
        return
    engine = sa.create_engine(backend.url)
    db = Database(engine=engine)
    with db.begin() as session:
        session.execute(sa.select(Item))
    db.dispose()
    await db.dispose_async()
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    engine.dispose()


# -- PgBouncer ----------------------------------------------------------------------------------


def test_pgbouncer_turns_off_server_side_prepared_statements_per_driver() -> None:
    """Behind transaction pooling nothing may outlive a transaction: each driver's setting."""
    psycopg: Database[Any] = Database("postgresql+psycopg://app@127.0.0.1:1/app", pgbouncer=True)
    asyncpg: Database[Any] = Database("postgresql+asyncpg://app@127.0.0.1:1/app", pgbouncer=True)
    try:
        assert options_of(psycopg)["prepare_threshold"] is None
        settings = options_of(asyncpg)
        assert settings["statement_cache_size"] == settings["prepared_statement_cache_size"] == 0
        name = settings["prepared_statement_name_func"]
        assert name() != name(), "two clients on one server connection need unique names"
    finally:
        psycopg.dispose()
        asyncpg.sync_engine.dispose()  # it never connected: nothing to await


class _Captured(Exception):
    """Stops a connection attempt once its parameters are seen."""


def options_of(db: Database[Any]) -> dict[str, Any]:
    """The keyword arguments the engine passes on to connect (seen by 'do_connect')."""
    seen: dict[str, Any] = {}

    def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.update(cparams)
        raise _Captured

    sa.event.listen(db.sync_engine, "do_connect", capture)
    with pytest.raises(_Captured):
        db.sync_engine.connect()
    return seen


def test_pgbouncer_is_refused_where_it_cannot_help() -> None:
    """Not PostgreSQL, a driver it does not know, a setting that would undo it: each says why."""
    with pytest.raises(ValueError, match="is for PostgreSQL"):
        Database("sqlite://", pgbouncer=True)
    with pytest.raises(ValueError, match="'pg8000'"):
        Database("postgresql+pg8000://app@127.0.0.1:1/app", pgbouncer=True)
    with pytest.raises(ValueError, match="prepare_threshold"):
        Database(
            "postgresql+psycopg://app@127.0.0.1:1/app",
            engine_options={"connect_args": {"prepare_threshold": 5}},
            pgbouncer=True,
        )
    engine = sa.create_engine("sqlite://")
    try:
        with pytest.raises(TypeError, match="prepare_threshold"):
            Database(engine=engine, pgbouncer=True)  # type: ignore[call-overload]
    finally:
        engine.dispose()
