"""sessionscope: ``SessionMiddleware`` and ``db.session``, sync or async by the driver."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp

from sessionscope import Database, SessionMiddleware

from .common import managed_routes, use_sqlite_pragmas

__all__ = ["build"]


def build(url: str, mode: str) -> ASGIApp:
    """The app the way the README shows it: one ``Database``, one middleware."""
    use_sqlite_pragmas(url)
    db: Database[Any] = Database(url)

    def stats(request: Request) -> dict[str, Any]:
        return {
            "checkedout": db.sync_engine.pool.checkedout(),
            # This very /_stats request never touches the session, so it opens no unit.
            "live_units": db.live_units,
            "live_sessions": db.live_sessions,
        }

    routes = managed_routes(lambda request: db.session, mode, stats)
    return Starlette(routes=routes, middleware=[Middleware(SessionMiddleware, db=db)])
