"""asgi-sqlalchemy (async only): a ``DatabaseContext`` from the lifespan, its middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asgi_sqlalchemy import DatabaseContext, SessionMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp

from .common import managed_routes, use_sqlite_pragmas

__all__ = ["build"]


def build(url: str, mode: str) -> ASGIApp:
    """The peer's app as its README shows it; ``mode`` must be ``"async"``."""
    use_sqlite_pragmas(url)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with DatabaseContext(url, session_kwargs={"expire_on_commit": False}) as db:
            yield {"db": db}

    def stats(request: Request) -> dict[str, Any]:
        return {"checkedout": request.state.db.engine.sync_engine.pool.checkedout()}

    routes = managed_routes(lambda request: request.scope["db_session"], mode, stats)
    return Starlette(routes=routes, middleware=[Middleware(SessionMiddleware)], lifespan=lifespan)
