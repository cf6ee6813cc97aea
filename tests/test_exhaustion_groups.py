"""Pool exhaustion in a task group: an endpoint that fans its queries out to tasks gets the
pool's timeout back wrapped in an ``ExceptionGroup``.

A group made only of pool timeouts is a busy server like a bare one, so the client must get
the ``503`` with ``Retry-After``; a group that also holds a bug is a bug, and keeps its 500
and its traceback. Real uvicorn; the pool holds one connection with a short
``pool_timeout``, taken by a slow request while the test's request runs. ``make_db`` checks
afterwards, with the garbage collector off, that no connection, unit or session was left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware

from ._exhaustion import BODY, SELECT_1, Gate, errors, hold_route, served_while_held, told_to_retry
from ._units import Boom
from .conftest import DatabaseFactory, backend_params

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("backend", backend_params(["sqlite"]), indirect=True),
]

POOL_TIMEOUT = 0.3
TINY_POOL = {"pool_size": 1, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT}
Task = Callable[[], Coroutine[Any, Any, None]]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """What any thread logs (the server runs in a thread), WARNING and up."""
    caplog.set_level(logging.WARNING)
    return caplog


def fan_out_app(db: Database[Any], gate: Gate, tasks: list[Task]) -> Any:
    """``GET /fanout`` runs ``tasks`` in one anyio task group, under ``SessionMiddleware``."""

    async def fan_out(request: Request) -> Response:
        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(task)
        return PlainTextResponse("all done")

    app = Starlette(routes=[hold_route(db, gate), Route("/fanout", fan_out)])
    app.add_middleware(SessionMiddleware, db=db)
    return app


async def fetch_fan_out(app: Any, db: Database[Any], gate: Gate) -> tuple[httpx.Response, str]:
    """``GET /fanout`` while the pool is held; the answer and what uvicorn logged."""
    async with served_while_held(app, db, gate) as (served, http):
        response = await http.get("/fanout")
    assert gate.held == [200]
    return response, served.log()


def request_read(db: Database[Any]) -> Task:
    """A task reading through the request's own session: ``db.session``."""

    def read_sync() -> None:
        db.session.execute(SELECT_1)

    async def read() -> None:
        if db.is_async:
            await db.session.execute(SELECT_1)
        else:
            await anyio.to_thread.run_sync(read_sync)

    return read


def block_read(db: Database[Any]) -> Task:
    """A task reading in a ``db.begin()`` block of its own, shielded so that the task
    group's cancellation cannot keep it from meeting the pool's timeout."""

    def read_sync() -> None:
        with db.begin() as session:
            session.execute(SELECT_1)

    async def read() -> None:
        with anyio.CancelScope(shield=True):
            if db.is_async:
                async with db.begin() as session:
                    await session.execute(SELECT_1)
            else:
                await anyio.to_thread.run_sync(read_sync)

    return read


# -- the tests ----------------------------------------------------------------------------------


async def test_a_pool_timeout_out_of_a_task_group_is_a_503(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """Fanning queries out to tasks must not turn a busy pool into a 500 with a traceback:
    the client must still be told to come back."""
    db = make_db(engine_options=dict(TINY_POOL))
    gate = Gate()
    response, log = await fetch_fan_out(fan_out_app(db, gate, [request_read(db)]), db, gate)
    assert response.status_code == 503, (response.status_code, log)
    assert response.headers.get("retry-after") == "1"
    assert response.content == BODY
    assert told_to_retry(logs) == ["GET /fanout"]
    assert errors(logs) == []
    assert "Traceback" not in log, log


async def test_pool_timeouts_of_two_tasks_in_one_group_are_one_503(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """A group holding several timeouts and nothing else is just as busy a pool: one 503,
    logged once for the request."""
    db = make_db(engine_options=dict(TINY_POOL))
    gate = Gate()
    app = fan_out_app(db, gate, [block_read(db), block_read(db)])
    response, log = await fetch_fan_out(app, db, gate)
    assert response.status_code == 503, (response.status_code, log)
    assert response.headers.get("retry-after") == "1"
    assert response.content == BODY
    assert told_to_retry(logs) == ["GET /fanout"]
    assert errors(logs) == []


async def test_a_group_with_a_bug_beside_a_pool_timeout_keeps_its_500(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """A bug is not a busy server, even next to one: told to come back, the client would
    retry a permanent error, and the traceback the developer needs would be lost."""
    db = make_db(engine_options=dict(TINY_POOL))
    gate = Gate()

    async def fail() -> None:
        await anyio.sleep(POOL_TIMEOUT / 3)  # while the other task waits for the pool
        raise Boom("a bug in one of the tasks")

    response, log = await fetch_fan_out(fan_out_app(db, gate, [block_read(db), fail]), db, gate)
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert "Boom: a bug in one of the tasks" in log, log
    assert "TimeoutError" in log, log
    assert told_to_retry(logs) == []
