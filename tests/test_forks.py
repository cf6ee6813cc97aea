"""Processes (SPEC rule 21): a forked child never uses a connection its parent opened.

Pre-fork servers (``gunicorn --preload``) fork their workers after the app was imported; a
parent that left a connection in its pool would share that socket with every child.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection

from sessionscope import Database

from ._models import Item
from ._servers import gunicorn_server, wait_until
from .conftest import Backend, assert_no_leaks, backend_params, idle_in_transaction

Rows = Callable[[], list[str]]
Report = dict[str, Any]

pytestmark = pytest.mark.filterwarnings(
    # Python 3.12+ warns about any fork in a process with threads (pytest-timeout runs one);
    # the child here only uses the database and exits.
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def connection_id(connection: Connection, backend: str) -> str:
    """Which connection this is: the server's id for it, on SQLite a mark of its own."""
    if backend == "postgresql":
        return str(connection.scalar(sa.text("SELECT pg_backend_pid()")))
    if backend == "mariadb":
        return str(connection.scalar(sa.text("SELECT CONNECTION_ID()")))
    # A temporary table lives in one sqlite3 connection: a child that reads its parent's
    # mark is using its parent's connection.
    connection.execute(
        sa.text(
            "CREATE TEMP TABLE IF NOT EXISTS connection_mark AS"
            " SELECT lower(hex(randomblob(8))) AS value"
        )
    )
    return str(connection.scalar(sa.text("SELECT value FROM connection_mark")))


def fork(work: Callable[[], str]) -> tuple[int, int]:
    """Run ``work`` in a forked child; return its pid and the pipe its report comes through."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is never saved
        try:
            os.close(read_end)
            try:
                report: Report = {"id": work()}
            except BaseException as exc:
                report = {"error": repr(exc)}
            os.write(write_end, json.dumps(report).encode())
        finally:
            # Never back into pytest: the fixtures' teardown belongs to the parent.
            os._exit(0)
    os.close(write_end)
    return pid, read_end


def wait_for(pid: int, read_end: int, use: Callable[[], object]) -> Report:
    """Call ``use`` in a loop until the child exits (killed after 20 s); its report."""
    deadline = time.monotonic() + 20
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                pytest.fail("the forked child hung on the database")
            use()
            time.sleep(0.005)
    except BaseException:
        # No child outlives its test, however the parent failed.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        raise
    with os.fdopen(read_end, "rb") as pipe:
        report: Report = json.loads(pipe.read() or b'{"error": "no report"}')
    return report


@pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
def test_forked_child_gets_connections_of_its_own(
    db: Database[Any], backend: Backend, rows: Rows
) -> None:
    """A child sharing its parent's socket mixes their messages (the gunicorn --preload bug)."""
    held = db.sync_engine.connect()
    try:
        held.begin()
        held_id = connection_id(held, backend.name)
        # Checked out while 'held' is: a second connection, left in the pool.
        with db.begin() as session:
            pooled = connection_id(session.connection(), backend.name)

        def child() -> str:
            with db.begin() as session:
                found = connection_id(session.connection(), backend.name)
                session.add(Item(name="from-child"))
            db.dispose()
            return found

        pid, read_end = fork(child)
        # The parent goes on with its own connection while the child works.
        report = wait_for(pid, read_end, lambda: connection_id(held, backend.name))
        assert report.get("error") is None
        assert report["id"] not in {pooled, held_id}
        assert rows() == ["from-child"]
        with db.begin() as session:
            assert connection_id(session.connection(), backend.name) == pooled
        assert connection_id(held, backend.name) == held_id
        held.rollback()
    finally:
        held.close()
    assert_no_leaks(db, backend)


async def _pooled_and_held(db: Database[Any], backend: str) -> tuple[str, AsyncConnection, str]:
    held = await db.engine.connect()
    await held.begin()
    held_id = await held.run_sync(connection_id, backend)
    return await _use_pool(db, backend), held, held_id


async def _use_pool(db: Database[Any], backend: str, name: str | None = None) -> str:
    async with db.begin() as session:
        found: str = await (await session.connection()).run_sync(connection_id, backend)
        if name is not None:
            session.add(Item(name=name))
    return found


@pytest.mark.parametrize(
    "backend", backend_params(["sqlite", "postgresql"], ["async"]), indirect=True
)
def test_forked_child_gets_async_connections_of_its_own(
    db: Database[Any], backend: Backend, rows: Rows
) -> None:
    """An async child must not await on its parent's socket (asyncpg) or thread (aiosqlite)."""
    # One loop for the parent throughout: an async connection belongs to the loop it was
    # opened on. The fork happens while that loop is not running.
    with asyncio.Runner() as runner:
        pooled, held, held_id = runner.run(_pooled_and_held(db, backend.name))
        try:

            def child() -> str:
                async def work() -> str:
                    found = await _use_pool(db, backend.name, "from-child")
                    await db.dispose_async()
                    return found

                return asyncio.run(work())

            pid, read_end = fork(child)
            report = wait_for(
                pid, read_end, lambda: runner.run(held.run_sync(connection_id, backend.name))
            )
            assert report.get("error") is None
            assert report["id"] not in {pooled, held_id}
            assert rows() == ["from-child"]
            assert runner.run(_use_pool(db, backend.name)) == pooled
            assert runner.run(held.run_sync(connection_id, backend.name)) == held_id
            runner.run(held.rollback())
        finally:
            runner.run(held.close())
        try:
            assert_no_leaks(db, backend)
        finally:
            runner.run(db.dispose_async())


def post_item(port: int, name: str) -> int:
    """``POST /items`` with the form field ``name``: the status, or 0 for no answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        body = urlencode({"name": name})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        connection.request("POST", "/items", body, headers)
        response = connection.getresponse()
        response.read()
        return response.status
    except TimeoutError:
        return 0
    finally:
        connection.close()


# Not SQLite: two processes on one sqlite3 handle showed no failure at this scale; the fork
# tests above find a child on its parent's SQLite connection.
@pytest.mark.parametrize(
    "backend", backend_params(["postgresql", "mariadb"], ["sync"]), indirect=True
)
def test_preloaded_gunicorn_workers_store_each_item_once(backend: Backend, checker: Engine) -> None:
    """The reported case: the example's tables made in the master, two workers forked after.

    64 POSTs from 16 clients at once: with 16 the workers' requests did not always overlap.
    """
    prefix = f"fork-{uuid.uuid4().hex[:8]}-"
    names = [f"{prefix}{n}" for n in range(64)]
    env = {"DATABASE_URL": backend.url}
    try:
        # The example creates its tables in create_app(), at import, in the master.
        with gunicorn_server(
            "examples.flask_app:app", env, threads=1, workers=2, preload=True
        ) as port:
            with ThreadPoolExecutor(16) as pool:
                statuses = list(pool.map(lambda name: post_item(port, name), names))
            wait_until(lambda: idle_in_transaction(backend) == 0)
        assert statuses == [201] * 64
        with checker.connect() as connection:
            stored = connection.scalars(
                sa.text("SELECT name FROM flask_example_items WHERE name LIKE :prefix"),
                {"prefix": f"{prefix}%"},
            ).all()
        assert sorted(stored) == sorted(names)
    finally:
        with checker.begin() as connection:
            connection.execute(sa.text("DROP TABLE IF EXISTS flask_example_items"))
