"""What every ASGI benchmark app shares: the Starlette endpoints and helpers.

Every variant answers the same four endpoints with byte-identical JSON:

- ``GET /noop``: ``{"ok": true}``; never touches the database.
- ``GET /items/{id}``: one primary-key ORM read, ``{"id": 1, "name": "item-1"}``.
- ``POST /items`` with ``{"name": "..."}``: one insert, committed, ``201 {"id": .., "name": ..}``.
- ``GET /fail``: inserts a row named ``FAIL_NAME``, flushes it, then raises: the row must be
  rolled back (Starlette answers ``500 Internal Server Error``).

plus ``GET /_stats``, the harness's window into the pool (``checkedout``) and, where the
variant has them, its registry (``live_sessions``) and open units (``live_units``).

The table, the JSON shapes and the SQLite settings live in ``shared`` (re-exported here),
which the WSGI apps' ``wsgi_common`` uses too. This module imports only Starlette and
SQLAlchemy, so that it loads in the peers' own virtual environment as well as in the
project's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .shared import (
    FAIL_NAME,
    NOOP_BODY,
    NOT_FOUND_BODY,
    SEED_ROWS,
    Base,
    BenchFailure,
    Item,
    item_json,
    use_sqlite_pragmas,
)

__all__ = [
    "FAIL_NAME",
    "NOOP_BODY",
    "SEED_ROWS",
    "AppFactory",
    "Base",
    "BenchFailure",
    "EmptyMiddleware",
    "Item",
    "StatsFn",
    "item_json",
    "managed_routes",
    "use_sqlite_pragmas",
]

StatsFn = Callable[[Request], dict[str, Any]]
"""Reads the variant's pool (and registry) for ``GET /_stats``."""


class EmptyMiddleware:
    """A pure-ASGI middleware that does nothing: the cost of any middleware layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def not_found() -> JSONResponse:
    """The answer for an id that does not exist."""
    return JSONResponse(NOT_FOUND_BODY, status_code=404)


async def noop(request: Request) -> JSONResponse:
    """``GET /noop``: no database at all."""
    return JSONResponse(NOOP_BODY)


def stats_route(stats: StatsFn) -> Route:
    """``GET /_stats`` for the harness's leak checks.

    Besides the variant's own figures it reports the requests still running in the server:
    after wrk stops, requests that wait on the loop or for a worker thread hold no
    connection yet, so a pool at 0 alone would let the checks run before they have done
    their work (and the next run's table would start with their rows).
    """

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({**stats(request), "requests_in_flight": _requests_in_flight()})

    return Route("/_stats", endpoint)


def _requests_in_flight() -> int:
    """Other HTTP requests uvicorn is running: it runs each in a task of its own.

    This very request is one of them, whether its endpoint runs in that task or in a child
    task (a peer's ``BaseHTTPMiddleware`` runs the app in a task group).
    """
    requests = sum(
        1
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("RequestResponseCycle.run_asgi")
    )
    return max(0, requests - 1)


def managed_routes(get_session: Callable[[Request], Any], mode: str, stats: StatsFn) -> list[Route]:
    """The four endpoints, written against a session that a middleware manages.

    ``get_session(request)`` returns the request's session (or a proxy to it): whatever the
    library under test documents. Sync mode runs the database work in Starlette's threadpool
    (``def`` endpoints, and ``run_in_threadpool`` after reading a JSON body), the way a sync
    ``Session`` is used under ASGI; async mode awaits an ``AsyncSession``.
    """
    if mode == "sync":
        return [*_sync_routes(get_session), stats_route(stats)]
    return [*_async_routes(get_session), stats_route(stats)]


def _sync_routes(get_session: Callable[[Request], Session]) -> list[Route]:
    def read(request: Request) -> JSONResponse:
        item = get_session(request).get(Item, int(request.path_params["item_id"]))
        return not_found() if item is None else JSONResponse(item_json(item))

    def insert(request: Request, name: str) -> JSONResponse:
        session = get_session(request)
        item = Item(name=name)
        session.add(item)
        session.flush()
        return JSONResponse(item_json(item), status_code=201)

    async def create(request: Request) -> JSONResponse:
        name = (await request.json())["name"]
        return await run_in_threadpool(insert, request, name)

    def fail(request: Request) -> JSONResponse:
        session = get_session(request)
        session.add(Item(name=FAIL_NAME))
        session.flush()
        raise BenchFailure("GET /fail raises after writing, so its write must roll back.")

    return [
        Route("/noop", noop),
        Route("/items/{item_id:int}", read),
        Route("/items", create, methods=["POST"]),
        Route("/fail", fail),
    ]


def _async_routes(get_session: Callable[[Request], Any]) -> list[Route]:
    async def read(request: Request) -> JSONResponse:
        item = await get_session(request).get(Item, int(request.path_params["item_id"]))
        return not_found() if item is None else JSONResponse(item_json(item))

    async def create(request: Request) -> JSONResponse:
        name = (await request.json())["name"]
        session = get_session(request)
        item = Item(name=name)
        session.add(item)
        await session.flush()
        return JSONResponse(item_json(item), status_code=201)

    async def fail(request: Request) -> JSONResponse:
        session = get_session(request)
        session.add(Item(name=FAIL_NAME))
        await session.flush()
        raise BenchFailure("GET /fail raises after writing, so its write must roll back.")

    return [
        Route("/noop", noop),
        Route("/items/{item_id:int}", read),
        Route("/items", create, methods=["POST"]),
        Route("/fail", fail),
    ]


AppFactory = Callable[[str, str], ASGIApp]
"""``build(url, mode)``: what every variant module exposes."""
