"""The primary-and-replica fixture itself: real streaming, a read-only replica that can be
stopped and started, and nothing left running afterwards."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from . import _replica
from ._replica import ReplicaPair, asyncpg_url, port_answers, replica_pair, require_replica


def _names(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.scalars(sa.text("SELECT name FROM replicated ORDER BY id")))


async def _async_names(pair: ReplicaPair) -> list[str]:
    engine = create_async_engine(pair.replica_async_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            result = await connection.scalars(sa.text("SELECT name FROM replicated ORDER BY id"))
            return list(result)
    finally:
        await engine.dispose()


def test_asyncpg_url() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5999/test"
    assert asyncpg_url(url) == "postgresql+asyncpg://postgres@127.0.0.1:5999/test"
    with pytest.raises(ValueError):
        asyncpg_url("sqlite:///x.db")


def test_replica_pair_streams_and_survives_a_replica_restart() -> None:
    require_replica()
    with replica_pair() as pair:
        directory = pair.directory
        ports = (pair.primary_port, pair.replica_port)
        assert 5432 not in ports
        assert pair.primary_port != pair.replica_port
        primary = sa.create_engine(pair.primary_url, poolclass=NullPool)
        replica = sa.create_engine(pair.replica_url, poolclass=NullPool)
        try:
            with primary.begin() as connection:
                connection.execute(
                    sa.text("CREATE TABLE replicated (id serial PRIMARY KEY, name text)")
                )
                connection.execute(sa.text("INSERT INTO replicated (name) VALUES ('first')"))
            pair.wait_replayed()
            assert _names(replica) == ["first"]
            assert asyncio.run(_async_names(pair)) == ["first"]

            with replica.connect() as connection:
                assert connection.scalar(sa.text("SELECT pg_is_in_recovery()")) is True
            with primary.connect() as connection:
                assert connection.scalar(sa.text("SELECT pg_is_in_recovery()")) is False
            with pytest.raises(sa.exc.DBAPIError) as caught, replica.begin() as connection:
                connection.execute(sa.text("INSERT INTO replicated (name) VALUES ('no')"))
            assert isinstance(caught.value.orig, psycopg.errors.ReadOnlySqlTransaction)

            pair.stop_replica()
            assert not pair.replica_running()
            assert not port_answers(pair.replica_port)
            with primary.begin() as connection:
                connection.execute(sa.text("INSERT INTO replicated (name) VALUES ('second')"))
            pair.start_replica()
            pair.wait_replayed()
            assert _names(replica) == ["first", "second"]

            pair.stop_replica(mode="immediate")
            assert not port_answers(pair.replica_port)
            pair.start_replica()
            pair.wait_replayed()
            assert _names(replica) == ["first", "second"]
        finally:
            primary.dispose()
            replica.dispose()

    for port in ports:
        assert not port_answers(port)
    assert not directory.exists()


def test_failed_setup_leaves_nothing_running(monkeypatch: pytest.MonkeyPatch) -> None:
    require_replica()
    started: list[ReplicaPair] = []
    original = ReplicaPair._run

    def failing_run(
        self: ReplicaPair, program: str, *args: str, **options: Any
    ) -> subprocess.CompletedProcess[str]:
        if program == "pg_basebackup":
            started.append(self)
            raise RuntimeError("pg_basebackup failed on purpose")
        return original(self, program, *args, **options)

    monkeypatch.setattr(ReplicaPair, "_run", failing_run)
    with pytest.raises(RuntimeError, match="on purpose"), replica_pair():
        pass
    (pair,) = started
    assert not port_answers(pair.primary_port)
    assert not pair.directory.exists()


def test_require_replica_skips_or_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_replica, "postgres_bindir", lambda: None)
    reason = _replica.replica_missing()
    assert reason is not None
    assert "not installed" in reason
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_replica()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but"):
        require_replica()
