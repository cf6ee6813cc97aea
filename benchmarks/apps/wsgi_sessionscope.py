"""sessionscope's Flask extension: ``db.init_app(app)`` and ``db.session``, no commit call.

The extension wraps ``app.wsgi_app`` in ``WSGISessionMiddleware``: a unit of work per
request, committed by the final status before it reaches gunicorn.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy.orm import Session

from sessionscope import Database

from .shared import use_sqlite_pragmas
from .wsgi_common import managed_routes, new_app

__all__ = ["build"]


def build(url: str, mode: str) -> Flask:
    """The app the way the README shows it; ``mode`` must be ``"sync"``."""
    if mode != "sync":
        raise ValueError(f"The WSGI apps use a sync driver; got mode {mode!r}.")
    use_sqlite_pragmas(url)
    db: Database[Session] = Database(url)
    app = new_app()
    db.init_app(app)

    def stats() -> dict[str, Any]:
        return {
            "checkedout": db.sync_engine.pool.checkedout(),
            # This very /_stats request never uses the session, so it opens no unit.
            "live_units": db.live_units,
            "live_sessions": db.live_sessions,
        }

    managed_routes(app, lambda: db.session, stats, commit=False)
    return app
