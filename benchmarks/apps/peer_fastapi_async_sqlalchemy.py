"""fastapi-async-sqlalchemy (async only): ``SQLAlchemyMiddleware`` and its ``db.session``."""

from __future__ import annotations

from typing import Any

from fastapi_async_sqlalchemy import SQLAlchemyMiddleware, db
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp

from .common import managed_routes, use_sqlite_pragmas

__all__ = ["build"]


def build(url: str, mode: str) -> ASGIApp:
    """The peer's app with ``commit_on_exit=True``; ``mode`` must be ``"async"``."""
    use_sqlite_pragmas(url)
    engine = create_async_engine(url)

    def stats(request: Request) -> dict[str, Any]:
        return {"checkedout": engine.sync_engine.pool.checkedout()}

    routes = managed_routes(lambda request: db.session, mode, stats)
    middleware = [Middleware(SQLAlchemyMiddleware, custom_engine=engine, commit_on_exit=True)]
    return Starlette(routes=routes, middleware=middleware)
