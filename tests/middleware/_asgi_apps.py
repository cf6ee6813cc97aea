"""A Starlette app whose endpoints exercise every way a request can end."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware

from .._models import Child, Item


async def resolve(value: Any) -> Any:
    """Await ``value`` if an async session returned a coroutine."""
    if inspect.isawaitable(value):
        return await value
    return value


async def insert(db: Database[Any], name: str) -> None:
    """Insert one item and flush it, so that a connection is in use."""
    db.session.add(Item(name=name))
    await resolve(db.session.flush())


async def names(db: Database[Any]) -> list[str]:
    result = await resolve(db.session.execute(sa.select(Item.name).order_by(Item.id)))
    return list(result.scalars())


def build_app(db: Database[Any], **options: Any) -> Starlette:
    """Endpoints named after what they do; the path's ``name`` is the row they write."""

    async def create(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        status = int(request.query_params.get("status", "200"))
        if status == 303:
            return RedirectResponse("/items", status_code=303)
        return PlainTextResponse("created", status_code=status)

    def create_sync(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        db.session.flush()
        return PlainTextResponse("created", status_code=201)

    async def add_only(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("added")

    async def orphan(request: Request) -> Response:
        # The parent does not exist: the database refuses the row at COMMIT (or at the
        # flush inside commit() where constraints cannot be deferred).
        db.session.add(Child(parent_id=999_999))
        return PlainTextResponse("this answer must never reach the client")

    async def http_error(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        raise HTTPException(int(request.query_params.get("status", "409")))

    async def crash(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        raise RuntimeError("endpoint failed after writing")

    async def value_error(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        raise ValueError("handled by an exception handler")

    async def veto(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        db.set_rollback_only()
        return PlainTextResponse("dry run")

    async def raw_sql(request: Request) -> Response:
        name = request.path_params["name"]
        await resolve(
            db.session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        )
        await resolve(db.session.execute(sa.insert(Item).values(name=name + "-bulk")))
        await resolve(
            db.session.execute(sa.update(Item).where(Item.name == name).values(name=name + "-upd"))
        )
        return PlainTextResponse("ok")

    async def stream(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)

        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            # The session is still usable while the body streams.
            yield ",".join(await names(db)).encode() + b";"
            await insert(db, name + "-streamed")
            yield b"last"

        return StreamingResponse(body())

    async def stream_late(request: Request) -> Response:
        # The session is first used by the body, once the start has gone out.
        name = request.path_params["name"]
        status = int(request.query_params.get("status", "200"))
        units_before = db.live_units

        async def body() -> AsyncIterator[bytes]:
            yield f"units before:{units_before};".encode()
            await insert(db, name)
            yield f"units during:{db.live_units};".encode()
            yield b"last"

        return StreamingResponse(body(), status_code=status)

    async def stream_orphan(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            db.session.add(Child(parent_id=999_999))
            yield b"last"

        return StreamingResponse(body())

    async def background(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)

        async def later() -> None:
            await insert(db, name + "-later")

        return PlainTextResponse("accepted", background=BackgroundTask(later))

    async def listing(request: Request) -> Response:
        return JSONResponse(await names(db))

    async def noop(request: Request) -> Response:
        return PlainTextResponse("noop")

    async def handle_value_error(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("handled", status_code=500)

    app = Starlette(
        routes=[
            Route("/items/{name}", create, methods=["POST"]),
            Route("/sync/items/{name}", create_sync, methods=["POST"]),
            Route("/add-only/{name}", add_only, methods=["POST"]),
            Route("/orphan", orphan, methods=["POST"]),
            Route("/http-error/{name}", http_error, methods=["POST"]),
            Route("/crash/{name}", crash, methods=["POST"]),
            Route("/value-error/{name}", value_error, methods=["POST"]),
            Route("/veto/{name}", veto, methods=["POST"]),
            Route("/raw-sql/{name}", raw_sql, methods=["POST"]),
            Route("/stream/{name}", stream, methods=["POST"]),
            Route("/stream-late/{name}", stream_late, methods=["POST"]),
            Route("/stream-orphan", stream_orphan, methods=["POST"]),
            Route("/background/{name}", background, methods=["POST"]),
            Route("/items", listing),
            Route("/noop", noop),
        ],
        exception_handlers={ValueError: handle_value_error},
    )
    app.add_middleware(SessionMiddleware, db=db, **options)
    return app


def with_route(db: Database[Any], path: str, endpoint: Any, **options: Any) -> Any:
    """``build_app`` with one more endpoint, matched first."""
    app = build_app(db, **options)
    app.router.routes.insert(0, Route(path, endpoint, methods=["GET", "POST"]))
    return app


def nothing_left(db: Database[Any]) -> tuple[int, int, int]:
    """Live units, sessions in the registry, connections checked out: all 0 when clean."""
    pool = db.sync_engine.pool
    return db.live_units, db.live_sessions, pool.checkedout()  # type: ignore[attr-defined]
