"""advanced-alchemy (sync and async): the Starlette extension in ``autocommit`` mode."""

from __future__ import annotations

from typing import Any

from advanced_alchemy.extensions.starlette import (
    AdvancedAlchemy,
    SQLAlchemyAsyncConfig,
    SQLAlchemySyncConfig,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp

from .common import managed_routes, use_sqlite_pragmas

__all__ = ["build"]


def build(url: str, mode: str) -> ASGIApp:
    """The peer's app: ``AdvancedAlchemy(config, app)``, sessions from ``get_session``."""
    use_sqlite_pragmas(url)
    config: Any
    if mode == "sync":
        config = SQLAlchemySyncConfig(connection_string=url, commit_mode="autocommit")
    else:
        config = SQLAlchemyAsyncConfig(connection_string=url, commit_mode="autocommit")
    app = Starlette()
    alchemy = AdvancedAlchemy(config=config, app=app)

    def stats(request: Request) -> dict[str, Any]:
        engine: Any = alchemy.get_engine()
        pool = engine.pool if mode == "sync" else engine.sync_engine.pool
        return {"checkedout": pool.checkedout()}

    for route in managed_routes(alchemy.get_session, mode, stats):
        app.router.routes.append(route)
    return app
