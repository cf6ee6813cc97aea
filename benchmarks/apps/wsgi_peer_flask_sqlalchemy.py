"""Flask-SQLAlchemy: the ``SQLAlchemy(app)`` extension, ``db.session``, an explicit commit.

Configured as its documentation shows (``SQLALCHEMY_DATABASE_URI``, everything else left at
its defaults). Its session is scoped to the app context and only removed at teardown, so
``POST /items`` calls ``db.session.commit()`` itself, as its users write it.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from .shared import use_sqlite_pragmas
from .wsgi_common import managed_routes, new_app

__all__ = ["build"]


def build(url: str, mode: str) -> Flask:
    """The peer's app; ``mode`` must be ``"sync"``."""
    if mode != "sync":
        raise ValueError(f"The WSGI apps use a sync driver; got mode {mode!r}.")
    use_sqlite_pragmas(url)
    app = new_app()
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    db = SQLAlchemy(app)

    def stats() -> dict[str, Any]:
        return {"checkedout": db.engine.pool.checkedout()}

    managed_routes(app, lambda: db.session, stats, commit=True)
    return app
