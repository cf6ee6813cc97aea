"""``_compat.connections``: the connections a transaction holds, on SQLAlchemy 2.0 and 2.1.

The ends of a unit read them to know whether it wrote, whether a statement failed, and which
connections to roll back or discard after a failed COMMIT or close; one missing there is a
connection left dirty or checked out. Each test compares them with the connections that
``Session.connection()`` answers for every bind the transaction used.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, Engine, event
from sqlalchemy import orm as sa_orm
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, SessionTransaction, mapped_column

from sessionscope._compat import connections


class First(DeclarativeBase):
    pass


class Second(DeclarativeBase):
    pass


class Left(First):
    __tablename__ = "left_rows"
    id: Mapped[int] = mapped_column(primary_key=True)


class Right(Second):
    __tablename__ = "right_rows"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two SQLite files, one per declarative base."""
    first = sa.create_engine(f"sqlite:///{tmp_path / 'first.sqlite3'}")
    second = sa.create_engine(f"sqlite:///{tmp_path / 'second.sqlite3'}")
    First.metadata.create_all(first)
    Second.metadata.create_all(second)
    yield first, second
    first.dispose()
    second.dispose()


def two_bind_session(engines: tuple[Engine, Engine]) -> Session:
    first, second = engines
    return Session(binds={First: first, Second: second})


def held(session: Session, *mappers: type[Any]) -> set[Connection]:
    """The connections the session's transaction holds for ``mappers``' binds."""
    return {session.connection(bind_arguments={"mapper": mapper}) for mapper in mappers}


def root_of(session: Session) -> SessionTransaction:
    root = session.get_transaction()
    assert root is not None
    return root


def test_no_connection_before_the_first_statement(engines: tuple[Engine, Engine]) -> None:
    """A transaction that only began holds nothing, and reading that acquires nothing."""
    with two_bind_session(engines) as session:
        session.add(Left())
        assert list(connections(root_of(session))) == []
        assert all(engine.pool.checkedout() == 0 for engine in engines)  # type: ignore[attr-defined]


def test_one_connection_per_bind_used(engines: tuple[Engine, Engine]) -> None:
    """Each bind the transaction used gives one connection, counted once."""
    with two_bind_session(engines) as session:
        session.execute(sa.select(Left))
        session.execute(sa.select(Left))
        assert list(connections(root_of(session))) == list(held(session, Left))
        session.execute(sa.select(Right))
        found = list(connections(root_of(session)))
        assert len(found) == 2
        assert set(found) == held(session, Left, Right)


def test_a_bind_first_used_inside_a_savepoint_is_the_root_transactions(
    engines: tuple[Engine, Engine],
) -> None:
    """A connection acquired under a savepoint belongs to the root transaction too."""
    with two_bind_session(engines) as session:
        session.execute(sa.select(Left))
        savepoint = session.begin_nested()
        session.add(Right())
        session.flush()
        savepoint.rollback()
        assert set(connections(root_of(session))) == held(session, Left, Right)


def test_connections_stay_readable_after_the_transaction_ends(
    engines: tuple[Engine, Engine],
) -> None:
    """A transaction that committed, rolled back or was closed still names its connections."""
    for end in ("commit", "rollback", "close"):
        with two_bind_session(engines) as session:
            session.execute(sa.select(Left))
            session.execute(sa.select(Right))
            root = root_of(session)
            expected = held(session, Left, Right)
            getattr(session, end)()
            assert set(connections(root)) == expected, end
            assert all(connection.closed for connection in expected)


def test_a_joined_connection_is_held(engines: tuple[Engine, Engine]) -> None:
    """A session bound to a connection of the app's (as a test's isolation does) holds it."""
    with engines[0].connect() as outer:
        outer.begin()
        with Session(bind=outer, join_transaction_mode="create_savepoint") as session:
            session.execute(sa.select(Left))
            assert list(connections(root_of(session))) == [outer]
        outer.rollback()


def test_a_connection_is_held_although_a_listener_raises_as_it_begins(
    engines: tuple[Engine, Engine],
) -> None:
    """A listener of the app's that raises in 'after_begin' cannot hide the connection that
    the transaction now holds and its close must give back."""

    def refuse(session: Session, transaction: SessionTransaction, connection: Any) -> None:
        raise RuntimeError("refused")

    session = two_bind_session(engines)
    event.listen(session, "after_begin", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        session.execute(sa.select(Left))
    found = list(connections(root_of(session)))
    assert len(found) == 1
    session.close()
    assert found[0].closed
    assert engines[0].pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("where", ["sessionmaker", "session class"])
def test_a_listener_inserted_first_that_raises_hides_no_connection(
    engines: tuple[Engine, Engine], where: str
) -> None:
    """A class-level 'after_begin' listener the app registers with ``insert=True`` after
    sessionscope was imported runs before any of sessionscope's; when it raises, the
    connection is held all the same (on 2.0 a record kept by a listener of sessionscope's
    missed it)."""

    def refuse(session: Session, transaction: SessionTransaction, connection: Any) -> None:
        raise PermissionError("tenant check failed")

    class TenantSession(Session):
        pass

    first, second = engines
    factory = sa_orm.sessionmaker(binds={First: first, Second: second}, class_=TenantSession)
    target: Any = factory if where == "sessionmaker" else TenantSession
    event.listen(target, "after_begin", refuse, insert=True)
    session = factory()
    with pytest.raises(PermissionError):
        session.execute(sa.select(Left))
    found = list(connections(root_of(session)))
    assert found == [session.connection(bind_arguments={"mapper": Left})]
    session.close()
    assert first.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_close_by_hand_keeps_the_writes_after_such_a_listener_raised(tmp_path: Path) -> None:
    """Rule 20 with that listener: a session closed by hand inside ``db.begin()`` keeps
    the unit's INSERT (it was thrown away when the write's connection was not seen)."""
    from sessionscope import Database

    db: Database[Any] = Database(f"sqlite:///{tmp_path / 'hand.sqlite3'}")
    with db.begin() as session:
        session.execute(sa.text("CREATE TABLE hand (id INTEGER)"))
    refused: list[bool] = []

    def refuse_once(session: Session, transaction: SessionTransaction, connection: Any) -> None:
        if not refused:
            refused.append(True)
            raise PermissionError("tenant check failed")

    event.listen(db.session, "after_begin", refuse_once, insert=True)
    gc.disable()  # a leak cannot hide behind the garbage collector
    try:
        with db.begin() as session:
            with pytest.raises(PermissionError):
                session.execute(sa.text("SELECT 1"))
            session.execute(sa.text("INSERT INTO hand VALUES (1)"))
            session.close()  # by hand, as a helper with 'with Session() as s' would
        with db.begin() as session:
            assert session.execute(sa.text("SELECT count(*) FROM hand")).scalar() == 1
        assert db.live_units == 0
        assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        gc.enable()
        db.dispose()


@pytest.mark.anyio
async def test_an_async_sessions_connections(tmp_path: Path) -> None:
    """An ``AsyncSession``'s transaction is its sync session's, with the same answer."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.sqlite3'}")
    try:
        async with AsyncSession(engine) as session:
            await session.execute(sa.text("SELECT 1"))
            savepoint = await session.begin_nested()
            await session.execute(sa.text("SELECT 2"))
            await savepoint.commit()
            connection = await session.connection()
            root = root_of(session.sync_session)
            assert list(connections(root)) == [connection.sync_connection]
    finally:
        await engine.dispose()
