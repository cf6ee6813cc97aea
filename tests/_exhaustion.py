"""What the pool exhaustion tests share: what they read in the logs, and a uvicorn server
whose pool of one connection a slow request holds while the test sends its own request."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sessionscope import Database

from ._uvicorn import Served, serve, wait_until

SELECT_1 = sa.text("SELECT 1")
BODY = b"Service Unavailable"
# What sessionscope logs, once, for a request it answers 503.
BUSY = "got no connection"


# -- logs and what is left --------------------------------------------------------------------


def told_to_retry(logs: pytest.LogCaptureFixture) -> list[str]:
    """The requests ("METHOD /path") sessionscope logged as answered 503."""
    messages = [r.getMessage() for r in logs.records if r.name == "sessionscope"]
    return [message.split(f" {BUSY} ")[0] for message in messages if BUSY in message]


def errors(logs: pytest.LogCaptureFixture) -> list[str]:
    """Every record logged at ERROR or above, as "logger: message"."""
    return [f"{r.name}: {r.getMessage()}" for r in logs.records if r.levelno >= logging.ERROR]


def nothing_left(db: Database[Any]) -> tuple[int, int, int]:
    """Live units, sessions in the registry and connections checked out of ``db``."""
    pool = db.sync_engine.pool
    return db.live_units, db.live_sessions, pool.checkedout()  # type: ignore[attr-defined]


# -- the pool's only connection, held by a slow request ---------------------------------------


@dataclass
class Gate:
    """A slow request holds the only connection until the gate opens."""

    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    held: list[int] = field(default_factory=list)


def hold_route(db: Database[Any], gate: Gate) -> Route:
    """``GET /hold``: on the server's own loop, where an async pool's connections belong."""

    def hold_sync(request: Request) -> Response:
        db.session.execute(SELECT_1)
        gate.holding.set()
        gate.release.wait(10)
        return PlainTextResponse("held")

    async def hold_async(request: Request) -> Response:
        await db.session.execute(SELECT_1)
        gate.holding.set()
        await anyio.to_thread.run_sync(gate.release.wait, 10)
        return PlainTextResponse("held")

    return Route("/hold", hold_async if db.is_async else hold_sync)


@asynccontextmanager
async def pool_held(served: Served, gate: Gate) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``served`` while a slow request holds the pool's only connection."""
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    async with (
        httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as http,
        anyio.create_task_group() as tg,
    ):

        async def hold() -> None:
            gate.held.append((await http.get("/hold")).status_code)

        tg.start_soon(hold)
        try:
            assert await anyio.to_thread.run_sync(gate.holding.wait, 10)
            yield http
        finally:
            gate.release.set()


@asynccontextmanager
async def served_while_held(
    app: Any, db: Database[Any], gate: Gate
) -> AsyncIterator[tuple[Served, httpx.AsyncClient]]:
    """Serve ``app`` and give a client while the pool is held; at exit release it, wait until
    ``db`` has nothing left, and stop the server (read ``served.log()`` after that)."""
    async with serve(app) as served:
        async with pool_held(served, gate) as http:
            yield served, http
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
