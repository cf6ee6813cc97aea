"""fastapi-sqlalchemy (sync only): ``DBSessionMiddleware`` and its global ``db.session``.

Configured as its README shows, with ``commit_on_exit=True`` so that it commits at all, and
our own engine (its documented ``custom_engine``) so that ``/_stats`` can read the pool.
"""

from __future__ import annotations

from typing import Any

from fastapi_sqlalchemy import DBSessionMiddleware, db
from sqlalchemy import create_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp

from .common import managed_routes, use_sqlite_pragmas

__all__ = ["build"]


def build(url: str, mode: str) -> ASGIApp:
    """The peer's app; ``mode`` must be ``"sync"``."""
    use_sqlite_pragmas(url)
    engine = create_engine(url)

    def stats(request: Request) -> dict[str, Any]:
        return {"checkedout": engine.pool.checkedout()}

    routes = managed_routes(lambda request: db.session, mode, stats)
    middleware = [Middleware(DBSessionMiddleware, custom_engine=engine, commit_on_exit=True)]
    return Starlette(routes=routes, middleware=middleware)
