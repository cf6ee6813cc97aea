"""fastapi-sqla (sync and async): its pure-ASGI middleware, configured from the environment.

The peer is meant for FastAPI, but its middleware is plain ASGI and its session dependency
(``SessionDependency`` / ``AsyncSessionDependency``) is a public callable taking the request,
so the endpoints stay the same Starlette endpoints as every other variant and FastAPI's own
routing cost is kept out of the comparison.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import fastapi_sqla
from fastapi_sqla import async_sqla, sqla
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp

from .common import managed_routes, use_sqlite_pragmas

__all__ = ["build"]


def build(url: str, mode: str) -> ASGIApp:
    """The peer's app: ``sqlalchemy_url`` in the environment, ``setup_middlewares``."""
    use_sqlite_pragmas(url)
    # The peer reads its URL from this lower-case variable (its documented name).
    os.environ["sqlalchemy_url"] = url  # noqa: SIM112
    get_session: Any = (
        fastapi_sqla.SessionDependency()
        if mode == "sync"
        else fastapi_sqla.AsyncSessionDependency()
    )

    def stats(request: Request) -> dict[str, Any]:
        if mode == "sync":
            engine = sqla._session_factories["default"].kw["bind"]
        else:
            engine = async_sqla._async_session_factories["default"].kw["bind"].sync_engine
        return {"checkedout": engine.pool.checkedout()}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await fastapi_sqla.startup()
        yield

    app = Starlette(routes=managed_routes(get_session, mode, stats), lifespan=lifespan)
    fastapi_sqla.setup_middlewares(app)  # type: ignore[arg-type]
    return app
