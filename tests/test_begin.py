"""``db.begin()``: commit on success, roll back on error, the veto, after-commit callbacks.

Every test runs on each backend in both modes, and the lifecycle cases also over the three
ways to build a ``Database`` (a URL, your own engine, your own session factory).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from sessionscope import Database

from ._models import Item
from ._units import Boom, Rows, add, run_unit
from .conftest import Backend, DatabaseFactory, assert_no_leaks, backend_params


def fail(work: Callable[[Session], object]) -> Callable[[Session], None]:
    def failing(session: Session) -> None:
        work(session)
        raise Boom("the application failed")

    return failing


def commit_events(db: Database[Any]) -> list[str]:
    """Record the COMMITs and ROLLBACKs the engine sends, in order."""
    seen: list[str] = []
    event.listen(db.sync_engine, "commit", lambda connection: seen.append("commit"))
    event.listen(db.sync_engine, "rollback", lambda connection: seen.append("rollback"))
    return seen


# -- the three ways to build a Database -----------------------------------------------------


def _sqlite_foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _own_engine(backend: Backend) -> Engine | AsyncEngine:
    options: dict[str, Any] = {}
    if backend.name == "sqlite":
        options["connect_args"] = {"timeout": 15}
    engine: Engine | AsyncEngine
    if backend.is_async:
        engine = create_async_engine(backend.url, **options)
    else:
        engine = sa.create_engine(backend.url, **options)
    if backend.name == "sqlite":
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        event.listen(sync_engine, "connect", _sqlite_foreign_keys)
    return engine


@pytest.fixture(params=["url", "engine", "session_factory"])
async def any_db(
    request: pytest.FixtureRequest, backend: Backend, make_db: DatabaseFactory
) -> AsyncIterator[Database[Any]]:
    """A database built from a URL, from your engine, or from your session factory."""
    if request.param == "url":
        yield make_db()
        return
    engine = _own_engine(backend)
    db: Database[Any]
    if request.param == "engine":
        db = Database(engine=engine)
    elif isinstance(engine, AsyncEngine):
        # A factory of your own keeps SQLAlchemy's defaults (expire_on_commit=True).
        db = Database(session_factory=async_sessionmaker(engine))
    else:
        db = Database(session_factory=sessionmaker(engine))
    try:
        yield db
        assert_no_leaks(db, backend)
    finally:
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            engine.dispose()


# -- commit, roll back, veto ----------------------------------------------------------------


@pytest.mark.anyio
async def test_block_that_ends_normally_is_committed(any_db: Database[Any], rows: Rows) -> None:
    """Writes made in a 'db.begin()' block must be stored when the block succeeds."""
    await run_unit(any_db, add("kept"))
    assert rows() == ["kept"]


@pytest.mark.anyio
async def test_block_that_raises_is_rolled_back_and_the_error_propagates(
    any_db: Database[Any], rows: Rows
) -> None:
    """A failing block must store nothing and its caller must still see its exception."""

    def flush_then_fail(session: Session) -> None:
        session.add(Item(name="lost"))
        session.flush()
        raise Boom("the application failed")

    with pytest.raises(Boom):
        await run_unit(any_db, flush_then_fail)
    assert rows() == []


@pytest.mark.anyio
async def test_rollback_only_unit_is_rolled_back_although_it_succeeded(
    any_db: Database[Any], rows: Rows
) -> None:
    """A dry run marked with 'set_rollback_only()' must never store its flushed writes."""

    def dry_run(session: Session) -> None:
        session.add(Item(name="dry"))
        session.flush()
        any_db.set_rollback_only()

    await run_unit(any_db, dry_run)
    assert rows() == []
    await run_unit(any_db, add("later"))
    assert rows() == ["later"], "the veto must apply to its own unit only"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "statement",
    [
        sa.text("INSERT INTO items (name) VALUES ('raw')"),
        sa.insert(Item).values(name="raw"),
        sa.update(Item).where(Item.name == "seed").values(name="raw"),
        sa.delete(Item).where(Item.name == "seed"),
    ],
    ids=["text", "insert", "update", "delete"],
)
async def test_raw_and_bulk_statements_are_committed(
    any_db: Database[Any], rows: Rows, statement: sa.Executable
) -> None:
    """Writes the session's 'dirty'/'new' never see must be committed all the same."""
    await run_unit(any_db, add("seed"))
    expected = {"INSERT": ["seed", "raw"], "UPDATE": ["raw"], "DELETE": []}

    def execute(session: Session) -> None:
        assert not session.new
        assert not session.dirty
        assert not session.deleted
        session.execute(statement)

    await run_unit(any_db, execute)
    kind = str(statement).split()[0]
    assert sorted(rows()) == sorted(expected[kind])


@pytest.mark.anyio
async def test_unit_that_runs_no_sql_sends_nothing(any_db: Database[Any]) -> None:
    """A unit that never touched the database must take no connection and send no COMMIT."""
    seen = commit_events(any_db)
    checked_out: list[int] = []

    def untouched(session: Session) -> None:
        checked_out.append(any_db.sync_engine.pool.checkedout())  # type: ignore[attr-defined]

    await run_unit(any_db, untouched)
    assert checked_out == [0]
    assert seen == []


# -- after-commit callbacks -----------------------------------------------------------------


@pytest.mark.anyio
async def test_after_commit_callbacks_run_in_order_once_the_data_is_stored(
    any_db: Database[Any], rows: Rows
) -> None:
    """Callbacks (send the mail, enqueue the job) must see committed data, in their order."""
    calls: list[tuple[str, list[str]]] = []

    def work(session: Session) -> None:
        session.add(Item(name="stored"))
        for name in ("first", "second", "third"):
            any_db.after_commit(lambda name=name: calls.append((name, rows())))  # type: ignore[misc]
        assert calls == []

    await run_unit(any_db, work)
    assert calls == [("first", ["stored"]), ("second", ["stored"]), ("third", ["stored"])]


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["error", "veto"])
async def test_after_commit_callbacks_are_dropped_when_the_unit_rolls_back(
    any_db: Database[Any], outcome: str
) -> None:
    """A callback announcing data that was never stored must not run."""
    calls: list[str] = []

    def work(session: Session) -> None:
        session.add(Item(name="lost"))
        session.flush()
        any_db.after_commit(lambda: calls.append("ran"))
        if outcome == "veto":
            any_db.set_rollback_only()
        else:
            raise Boom("the application failed")

    if outcome == "error":
        with pytest.raises(Boom):
            await run_unit(any_db, work)
    else:
        await run_unit(any_db, work)
    await run_unit(any_db, add("next"))
    assert calls == []


@pytest.mark.anyio
async def test_after_commit_callback_that_raises_is_logged_and_the_rest_still_run(
    any_db: Database[Any], rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """One broken callback must neither undo the commit nor skip the callbacks after it."""
    calls: list[str] = []

    def broken() -> None:
        raise Boom("callback failed")

    def work(session: Session) -> None:
        session.add(Item(name="stored"))
        any_db.after_commit(broken)
        any_db.after_commit(lambda: calls.append("after"))

    with caplog.at_level(logging.ERROR, logger="sessionscope"):
        await run_unit(any_db, work)
    assert calls == ["after"]
    assert rows() == ["stored"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], Boom)
    await run_unit(any_db, add("next"))
    assert rows() == ["stored", "next"]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_coroutine_after_commit_callbacks_are_awaited_in_order(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An async database must await coroutine callbacks, interleaved with plain ones."""
    db = make_db()
    calls: list[str] = []

    async def notify(name: str) -> None:
        calls.append(name)

    async with db.begin() as session:
        session.add(Item(name="stored"))
        db.after_commit(lambda: notify("first"))
        db.after_commit(lambda: calls.append("second"))
        db.after_commit(lambda: notify("third"))
    assert calls == ["first", "second", "third"]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
async def test_coroutine_callback_on_a_sync_database_is_logged_not_left_unawaited(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync database cannot await a callback: say so in the log and close the coroutine."""
    db = make_db()
    made: list[Coroutine[Any, Any, None]] = []

    async def notify() -> None:
        raise AssertionError("a sync database cannot run a coroutine callback")

    def callback() -> Coroutine[Any, Any, None]:
        made.append(notify())
        return made[-1]

    try:
        with caplog.at_level(logging.ERROR, logger="sessionscope"), db.begin() as session:
            session.add(Item(name="stored"))
            db.after_commit(callback)
        assert rows() == ["stored"]
        assert "synchronous" in caplog.text
        assert inspect.getcoroutinestate(made[0]) == "CORO_CLOSED", "left open, never awaited"
    finally:
        made[0].close()


# -- misuse -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_with_form_says_which_one_to_use(make_db: DatabaseFactory) -> None:
    """'with' on an async database (or 'async with' on a sync one) must say which to use."""
    db = make_db()
    if db.is_async:
        with pytest.raises(TypeError, match=r"use 'async with db\.begin"), db.begin():
            pass  # pragma: no cover - never entered
    else:
        with pytest.raises(TypeError, match=r"use 'with db\.begin"):
            async with db.begin():
                pass  # pragma: no cover - never entered
    assert db.live_units == 0


@pytest.mark.anyio
async def test_begin_block_entered_twice_is_refused(make_db: DatabaseFactory, rows: Rows) -> None:
    """One 'db.begin()' object is one unit: entering it again says to call db.begin() anew."""
    db = make_db()
    block = db.begin()
    if db.is_async:
        async with block:
            pass
        with pytest.raises(RuntimeError, match=r"already entered; call 'db\.begin\(\)' again"):
            async with block:
                pass  # pragma: no cover - never entered
    else:
        with block:
            pass
        with (
            pytest.raises(RuntimeError, match=r"already entered; call 'db\.begin\(\)' again"),
            block,
        ):
            pass  # pragma: no cover - never entered
    assert db.live_units == 0


@pytest.mark.anyio
async def test_session_captured_in_a_context_that_outlives_the_unit_is_refused(
    make_db: DatabaseFactory,
) -> None:
    """Code that kept the unit's context must not silently get an orphan session later."""
    db = make_db()
    captured: list[contextvars.Context] = []

    await run_unit(db, lambda session: captured.append(contextvars.copy_context()))
    with pytest.raises(RuntimeError, match=r"has already finished.*db\.begin"):
        captured[0].run(db.session)
    assert db.live_sessions == 0


# -- nesting ----------------------------------------------------------------------------------


async def _outer_fails_after_inner_commits(db: Database[Any]) -> None:
    if db.is_async:
        async with db.begin() as outer:
            outer.add(Item(name="outer"))
            async with db.begin() as inner:
                assert inner is not outer
                assert db.session() is inner
                inner.add(Item(name="inner"))
            assert db.session() is outer
            raise Boom("the outer unit failed")
    with db.begin() as outer:
        outer.add(Item(name="outer"))
        with db.begin() as inner:
            assert inner is not outer
            assert db.session() is inner
            inner.add(Item(name="inner"))
        assert db.session() is outer
        raise Boom("the outer unit failed")


async def _inner_fails(db: Database[Any]) -> None:
    if db.is_async:
        async with db.begin() as inner:
            inner.add(Item(name="inner"))
            assert isinstance(inner, AsyncSession)
            await inner.flush()
            raise Boom("the inner unit failed")
    with db.begin() as session:
        session.add(Item(name="inner"))
        session.flush()
        raise Boom("the inner unit failed")


@pytest.mark.anyio
async def test_nested_begin_commits_although_the_outer_unit_rolls_back(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An inner unit (an audit record) must be stored even when the outer work fails."""
    db = make_db()
    with pytest.raises(Boom, match="outer"):
        await _outer_fails_after_inner_commits(db)
    assert rows() == ["inner"]


@pytest.mark.anyio
async def test_nested_begin_that_fails_leaves_the_outer_unit_to_commit(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """An inner unit's rollback must not touch the outer unit's session or transaction."""
    db = make_db()
    if db.is_async:
        async with db.begin() as outer:
            outer.add(Item(name="outer"))
            with pytest.raises(Boom):
                await _inner_fails(db)
            assert db.session() is outer
    else:
        with db.begin() as outer:
            outer.add(Item(name="outer"))
            with pytest.raises(Boom):
                await _inner_fails(db)
            assert db.session() is outer
    assert rows() == ["outer"]
