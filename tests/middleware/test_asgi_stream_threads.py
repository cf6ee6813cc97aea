"""Sync streaming bodies and the worker-thread limiter (issue 12, case 12; SPEC rule 13).

Starlette produces each chunk of a sync (``def``) streaming body in the same worker-thread
limiter as ``def`` endpoints. A body that used the database holds its connection between
chunks (its work commits before the final message), and needs a thread for its next chunk.
When such bodies held every pooled connection and every thread was an endpoint waiting
for a connection, nothing moved until the pool's timeout. Sync bodies may hold at most half
of the pool's connections, so the others are left for the endpoints that hold the threads;
a body past that limit fails at once, with an error that names the fix.

Real uvicorn, a pool of 2 connections and a limiter of 3 threads (set at startup), so that
the shape needs only a handful of requests. Every case ends with ``make_db``'s leak check.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware
from sessionscope._types import ASGIApp, Message, Receive, Scope, Send

from .._uvicorn import serve, wait_until
from ..conftest import DatabaseFactory, backend_params
from ._asgi_apps import nothing_left

pytestmark = pytest.mark.anyio

SYNC = backend_params(modes=["sync"])
THREADS = 3
POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 30}
STALL = 10.0
"""Far below the pool's timeout: an answer later than this waited for the pool to give up."""


class _Gate:
    """Holds each ``/stream`` response's first chunk on the loop until opened: the body
    then sits between its chunks, holding its connection and no thread, as a body does
    while its client reads slowly.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.open = threading.Event()
        self.waiting = 0
        self.failed = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/stream":
            await self.app(scope, receive, send)
            return

        async def gated(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body") == b"first;":
                self.waiting += 1
                while not self.open.is_set():  # noqa: ASYNC110 - set from the test's thread
                    await anyio.sleep(0.005)
            await send(message)

        try:
            await self.app(scope, receive, gated)
        except Exception:
            self.failed += 1
            raise


def _app(db: Database[Any], gate: threading.Event) -> Starlette:
    """``/stream``: a sync body that reads, then sends two chunks (the first held by the
    gate); ``/read``: a ``def`` endpoint that reads; ``/async-stream``: a body that reads
    as an async generator (it runs on the loop and needs no thread) and waits for ``gate``.
    """

    def stream(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            db.session.execute(sa.text("SELECT 1"))
            yield b"first;"
            yield b"second"

        return StreamingResponse(body())

    async def async_stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            db.session.execute(sa.text("SELECT 1"))
            yield b"first;"
            while not gate.is_set():  # noqa: ASYNC110 - set from the test's thread
                await anyio.sleep(0.005)
            yield b"second"

        return StreamingResponse(body())

    def read(request: Request) -> Response:
        return PlainTextResponse(str(db.session.execute(sa.text("SELECT 1")).scalar()))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield

    app = Starlette(
        routes=[
            Route("/stream", stream),
            Route("/async-stream", async_stream),
            Route("/read", read),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(_Gate)
    app.add_middleware(SessionMiddleware, db=db)
    return app


async def _whole(client: httpx.AsyncClient, path: str) -> bytes | Exception:
    try:
        return (await client.get(path)).content
    except httpx.HTTPError as error:
        return error


@dataclass
class Outcome:
    """What ``bodies_then_endpoints`` saw."""

    answers: list[object]  # the endpoints' status codes, or the errors they met
    waited: float  # from the endpoints' requests to their last answer
    streams: list[bytes | Exception]  # the two bodies, as their clients read them
    refused: int  # sync bodies that failed (refused a connection)
    log: str


async def bodies_then_endpoints(db: Database[Any]) -> Outcome:
    """Two sync bodies read and wait between their chunks; then ``THREADS + 2`` endpoints
    take every thread and wait for the pool, and the bodies are let go.
    """
    app = _app(db, threading.Event())
    async with (
        serve(app) as served,
        httpx.AsyncClient(base_url=served.url, timeout=STALL * 4) as client,
    ):
        gate = _find_gate(app)
        first = asyncio.ensure_future(_whole(client, "/stream"))
        await wait_until(lambda: gate.waiting == 1)
        second = asyncio.ensure_future(_whole(client, "/stream"))
        await wait_until(lambda: gate.waiting == 2 or gate.failed == 1)
        started = time.monotonic()
        reads = [asyncio.ensure_future(client.get("/read")) for _ in range(THREADS + 2)]
        await anyio.sleep(0.5)  # the endpoints take every thread meanwhile
        gate.open.set()
        answers = await asyncio.gather(*reads, return_exceptions=True)
        waited = time.monotonic() - started
        streams = [await first, await second]
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
        return Outcome(
            [getattr(answer, "status_code", answer) for answer in answers],
            waited,
            streams,
            gate.failed,
            served.log(),
        )


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_sync_streams_never_hold_every_connection(make_db: DatabaseFactory) -> None:
    """The second body fails at once (the first holds half of the pool), the endpoints
    get the connection left to them and answer, and the first stream completes.
    """
    outcome = await bodies_then_endpoints(make_db(engine_options=POOL))
    assert outcome.answers == [200] * (THREADS + 2)
    assert outcome.waited < STALL, f"the endpoints waited {outcome.waited:.1f} s"
    assert outcome.streams[0] == b"first;second"
    # The start had left: the second body's failure could only cut its response short.
    assert isinstance(outcome.streams[1], httpx.RemoteProtocolError), outcome.streams[1]
    assert outcome.refused == 1
    assert "sync streaming bodies" in outcome.log, outcome.log


def _find_gate(app: Starlette) -> _Gate:
    layer: Any = app.middleware_stack
    while not isinstance(layer, _Gate):
        layer = layer.app
    return layer


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_async_bodies_are_not_limited(make_db: DatabaseFactory) -> None:
    """Bodies that run on the loop need no thread between chunks: as many may hold a
    connection at once as the pool has.
    """
    db = make_db(engine_options=POOL)
    opened = threading.Event()
    app = _app(db, opened)
    async with (
        serve(app) as served,
        httpx.AsyncClient(base_url=served.url, timeout=STALL * 4) as client,
    ):
        streams = [asyncio.ensure_future(_whole(client, "/async-stream")) for _ in range(2)]
        await wait_until(lambda: db.sync_engine.pool.checkedout() == 2)  # type: ignore[attr-defined]
        opened.set()
        bodies = [await stream for stream in streams]
        errors = served.errors()
    assert bodies == [b"first;second", b"first;second"]
    assert errors == []
    await wait_until(lambda: nothing_left(db) == (0, 0, 0))
