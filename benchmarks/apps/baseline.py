"""The baseline: a bare Starlette app that opens its session by hand in each endpoint.

This is what the libraries are measured against: the same endpoints, the same driver and the
same default pool, with ``with factory.begin() as session:`` (``async with`` for an async
driver) written into every endpoint instead of a middleware managing the session.
``build_layered`` adds one empty pure-ASGI middleware, the cost of any middleware layer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from .common import (
    FAIL_NAME,
    BenchFailure,
    EmptyMiddleware,
    Item,
    item_json,
    noop,
    not_found,
    stats_route,
    use_sqlite_pragmas,
)

__all__ = ["build", "build_layered"]


def build(url: str, mode: str) -> ASGIApp:
    """The bare app for ``url``; ``mode`` is ``"sync"`` or ``"async"``."""
    return _build(url, mode, layered=False)


def build_layered(url: str, mode: str) -> ASGIApp:
    """The bare app behind one empty pure-ASGI middleware."""
    return _build(url, mode, layered=True)


def _build(url: str, mode: str, *, layered: bool) -> ASGIApp:
    use_sqlite_pragmas(url)
    routes = _sync_routes(url) if mode == "sync" else _async_routes(url)
    middleware = [Middleware(EmptyMiddleware)] if layered else []
    return Starlette(routes=routes, middleware=middleware)


def _sync_routes(url: str) -> list[Route]:
    engine = create_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)

    def read(request: Request) -> JSONResponse:
        with factory.begin() as session:
            item = session.get(Item, int(request.path_params["item_id"]))
            return not_found() if item is None else JSONResponse(item_json(item))

    def insert(name: str) -> JSONResponse:
        with factory.begin() as session:
            item = Item(name=name)
            session.add(item)
            session.flush()
            body = item_json(item)
        return JSONResponse(body, status_code=201)

    async def create(request: Request) -> JSONResponse:
        name = (await request.json())["name"]
        return await run_in_threadpool(insert, name)

    def fail(request: Request) -> JSONResponse:
        with factory.begin() as session:
            session.add(Item(name=FAIL_NAME))
            session.flush()
            raise BenchFailure("GET /fail raises after writing, so its write must roll back.")

    def stats(request: Request) -> dict[str, Any]:
        return {"checkedout": engine.pool.checkedout()}

    return [
        Route("/noop", noop),
        Route("/items/{item_id:int}", read),
        Route("/items", create, methods=["POST"]),
        Route("/fail", fail),
        stats_route(stats),
    ]


def _async_routes(url: str) -> list[Route]:
    engine = create_async_engine(url)
    factory = async_sessionmaker(engine, expire_on_commit=False)

    async def read(request: Request) -> JSONResponse:
        async with factory.begin() as session:
            item = await session.get(Item, int(request.path_params["item_id"]))
            return not_found() if item is None else JSONResponse(item_json(item))

    async def create(request: Request) -> JSONResponse:
        name = (await request.json())["name"]
        async with factory.begin() as session:
            item = Item(name=name)
            session.add(item)
            await session.flush()
            body = item_json(item)
        return JSONResponse(body, status_code=201)

    async def fail(request: Request) -> JSONResponse:
        async with factory.begin() as session:
            session.add(Item(name=FAIL_NAME))
            await session.flush()
            raise BenchFailure("GET /fail raises after writing, so its write must roll back.")

    def stats(request: Request) -> dict[str, Any]:
        return {"checkedout": engine.sync_engine.pool.checkedout()}

    return [
        Route("/noop", noop),
        Route("/items/{item_id:int}", read),
        Route("/items", create, methods=["POST"]),
        Route("/fail", fail),
        stats_route(stats),
    ]
