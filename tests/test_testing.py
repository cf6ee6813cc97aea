"""``sessionscope.testing.isolated``: the core, on every backend, with ``db.begin()`` units.

The adapters' tests (requests through each middleware and Flask) live in
``test_testing_asgi.py`` and ``test_testing_wsgi.py``; the pytest plugin and the docs'
``conftest.py`` examples in ``test_testing_plugin.py``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from sessionscope import Database
from sessionscope.testing import Isolation, isolated

from ._models import Item
from ._units import Rows, add, run_unit
from .conftest import Backend, assert_no_leaks, backend_params

pytestmark = pytest.mark.anyio


def _names(session: Session) -> list[str]:
    return list(session.scalars(sa.select(Item.name).order_by(Item.id)))


class _Isolated:
    """``with`` or ``async with isolated(db)`` by the driver, for tests that run on both."""

    def __init__(self, db: Database[Any], **options: Any) -> None:
        self.inner = isolated(db, **options)
        self.is_async = db.is_async

    async def __aenter__(self) -> Isolation:
        if self.is_async:
            return await self.inner.__aenter__()
        return self.inner.__enter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        if self.is_async:
            await self.inner.__aexit__(*exc_info)
        else:
            self.inner.__exit__(*exc_info)


# -- what a unit's commit and rollback mean inside -------------------------------------------


async def test_units_see_each_others_commits_and_nothing_is_stored(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A committed unit's rows are seen by the next unit, a rolled-back unit's are not, and
    after the block the database holds nothing of either (on SQLite too, whose driver
    would otherwise let a SAVEPOINT's release commit to the file)."""
    async with _Isolated(db):
        await run_unit(db, add("kept"))

        def fail(session: Session) -> None:
            session.add(Item(name="dropped"))
            session.flush()
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await run_unit(db, fail)
        assert await run_unit(db, _names) == ["kept"]
        assert rows() == [], "another connection saw an uncommitted row"
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_a_failed_statement_leaves_the_outer_transaction_usable(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A unit whose statement failed cannot commit (rule 18), and the units after it still
    work: its rollback goes back to its SAVEPOINT, not further (PostgreSQL aborts the whole
    transaction otherwise)."""
    async with _Isolated(db):
        await run_unit(db, add("first"))

        def swallow(session: Session) -> None:
            with contextlib.suppress(sa.exc.DBAPIError):
                session.execute(sa.text("SELECT * FROM no_such_table"))

        with pytest.raises(RuntimeError, match="A statement failed"):
            await run_unit(db, swallow)
        await run_unit(db, add("second"))
        assert await run_unit(db, _names) == ["first", "second"]
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_explicit_commit_and_rollback_inside_a_unit(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """``session.commit()`` by hand keeps what it covered when the unit then rolls back, and
    ``session.rollback()`` by hand drops only what came before it."""
    async with _Isolated(db):

        def commit_then_fail(session: Session) -> None:
            session.add(Item(name="committed"))
            session.commit()
            session.add(Item(name="lost"))
            session.flush()
            raise RuntimeError("after the commit")

        with pytest.raises(RuntimeError, match="after the commit"):
            await run_unit(db, commit_then_fail)

        def rollback_then_write(session: Session) -> None:
            session.add(Item(name="rolled back"))
            session.flush()
            session.rollback()
            session.add(Item(name="written"))

        await run_unit(db, rollback_then_write)
        assert await run_unit(db, _names) == ["committed", "written"]
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_nested_begin_takes_the_turn_of_its_outer_unit(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A ``db.begin()`` block inside a unit that has the connection runs at once (no wait
    for itself) and its rows are seen by the outer unit."""
    async with _Isolated(db, wait=2):
        if db.is_async:
            async with db.begin() as outer:
                outer.add(Item(name="outer"))
                await outer.flush()
                async with db.begin() as inner:
                    inner.add(Item(name="inner"))
                names = list(await outer.scalars(sa.select(Item.name).order_by(Item.id)))
        else:
            with db.begin() as outer:
                outer.add(Item(name="outer"))
                outer.flush()
                with db.begin() as inner:
                    inner.add(Item(name="inner"))
                names = _names(outer)
        assert names == ["outer", "inner"]
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_after_commit_callbacks_are_recorded_and_run_or_only_recorded(
    db: Database[Any], rows: Rows
) -> None:
    """Callbacks of a unit that commits are recorded and run; those of one that rolls back
    are neither; with ``run_callbacks=False`` they are recorded only."""
    ran: list[str] = []

    def register(name: str) -> Any:
        def work(session: Session) -> None:
            session.add(Item(name=name))
            db.after_commit(lambda: ran.append(name))

        return work

    for run in (True, False):
        ran.clear()
        async with _Isolated(db, run_callbacks=run) as isolation:
            await run_unit(db, register(f"kept-{run}"))

            def fail(session: Session) -> None:
                register("dropped")(session)
                raise RuntimeError("roll back")

            with pytest.raises(RuntimeError):
                await run_unit(db, fail)
            assert len(isolation.callbacks) == 1
            isolation.callbacks[0]()
        assert ran == ([f"kept-{run}"] * 2 if run else [f"kept-{run}"])
    assert rows() == []


# -- turns ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [("sqlite", "sync"), ("postgresql", "sync")], indirect=True)
def test_concurrent_units_take_turns_and_a_long_wait_names_the_holder(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """Two threads' units never interleave on the shared connection: the second waits until
    the first ends; one that waits longer than ``wait`` fails with a message naming the
    unit that holds the connection."""
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with db.begin() as session:
            session.add(Item(name="first"))
            session.flush()
            order.append("first wrote")
            first_in.set()
            time.sleep(0.3)
            order.append("first ends")

    with isolated(db, wait=5):
        thread = threading.Thread(target=first)
        thread.start()
        first_in.wait(5)
        with db.begin() as session:
            assert _names(session) == ["first"]
            order.append("second read")
        thread.join()
        assert order == ["first wrote", "first ends", "second read"]

    holding = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with db.begin() as session:
            session.execute(sa.select(1))
            holding.set()
            done.wait(5)

    with isolated(db, wait=0.2):
        thread = threading.Thread(target=holder)
        thread.start()
        holding.wait(5)
        try:
            turns = r"take turns: this one waited 0.2 s for <Unit"
            with pytest.raises(RuntimeError, match=turns), db.begin() as session:
                session.execute(sa.select(1))
        finally:
            done.set()
            thread.join()
    assert rows() == []
    assert_no_leaks(db, backend)


# -- the block itself ------------------------------------------------------------------------


async def test_wrong_form_nesting_and_open_units_are_refused(db: Database[Any]) -> None:
    """The wrong ``with`` form says which to use; isolated() does not nest; it refuses to
    start while a unit is open (its session would not be isolated)."""
    if db.is_async:
        with pytest.raises(TypeError, match="async with isolated"), isolated(db):
            pass
    else:
        with pytest.raises(TypeError, match="use 'with isolated"):
            async with isolated(db):
                pass
    async with _Isolated(db):
        with pytest.raises(RuntimeError, match="already isolated"):
            async with _Isolated(db):
                pass
    if db.is_async:
        async with db.begin() as session:
            await session.execute(sa.select(1))
            with pytest.raises(RuntimeError, match="must start before any unit"):
                async with isolated(db):
                    pass
    else:
        with db.begin() as session:
            session.execute(sa.select(1))
            with pytest.raises(RuntimeError, match="must start before any unit"), isolated(db):
                pass
    assert db.units.isolation is None


async def test_a_failing_or_cancelled_test_still_rolls_back(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """An exception or a cancellation inside the block rolls back and returns the connection."""

    async def raising() -> None:
        async with _Isolated(db):
            await run_unit(db, add("raised"))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await raising()
    with anyio.CancelScope() as scope:
        async with _Isolated(db):
            await run_unit(db, add("cancelled"))
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught
    assert rows() == []
    assert db.units.isolation is None
    assert_no_leaks(db, backend)


# -- a session factory bound to a connection ------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(["postgresql", "mariadb"]), indirect=True)
async def test_session_factory_bound_to_a_connection_is_accepted(
    backend: Backend, rows: Rows
) -> None:
    """SQLAlchemy's recipe for an external transaction works as the database's factory:
    units release SAVEPOINTs of the caller's transaction, which the caller rolls back.

    (On SQLite the recipe also needs the driver's transaction handling turned off, as
    SQLAlchemy documents; ``isolated()`` does that itself.)"""
    engine: Engine | AsyncEngine
    if backend.is_async:
        engine = create_async_engine(backend.url)
        async with engine.connect() as connection:
            outer = await connection.begin()
            db: Database[Any] = Database(
                session_factory=async_sessionmaker(
                    bind=connection, join_transaction_mode="create_savepoint"
                )
            )
            assert db.engine is engine
            await run_unit(db, add("joined"))
            assert await run_unit(db, _names) == ["joined"]
            await outer.rollback()
        await engine.dispose()
    else:
        engine = sa.create_engine(backend.url)
        with engine.connect() as connection:
            outer_sync = connection.begin()
            db = Database(
                session_factory=sessionmaker(
                    bind=connection, join_transaction_mode="create_savepoint"
                )
            )
            assert db.engine is engine
            await run_unit(db, add("joined"))
            assert await run_unit(db, _names) == ["joined"]
            outer_sync.rollback()
        engine.dispose()
    assert rows() == []


async def test_bind_in_session_options_names_the_fix() -> None:
    """``session_options={"bind": ...}`` gets a message that says what to do instead."""
    engine = sa.create_engine("sqlite://")
    with (
        engine.connect() as connection,
        pytest.raises(TypeError, match=r"may not set 'bind'.*session_factory="),
    ):
        Database(engine=engine, session_options={"bind": connection})
    engine.dispose()


def test_importing_testing_loads_no_web_framework_and_no_pytest() -> None:
    """``import sessionscope.testing`` loads no web framework and no pytest."""
    code = (
        "import sys, sessionscope.testing; "
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'flask', 'werkzeug', 'starlette', 'fastapi', 'pytest', '_pytest'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.fixture
async def memory_db() -> AsyncIterator[Database[Any]]:
    db: Database[Any] = Database("sqlite://")
    yield db
    db.dispose()


async def test_in_memory_sqlite_database_with_its_one_connection(
    memory_db: Database[Any],
) -> None:
    """The in-memory database (one connection in its pool) works: the units use the
    connection the block holds, not the pool."""
    db = memory_db
    Item.__table__.create(db.sync_engine)  # type: ignore[attr-defined]
    with isolated(db):
        await run_unit(db, add("in memory"))
        assert await run_unit(db, _names) == ["in memory"]
    assert await run_unit(db, _names) == []
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
