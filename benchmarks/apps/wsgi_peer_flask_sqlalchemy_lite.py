"""Flask-SQLAlchemy-Lite: ``SQLAlchemy(app)``, ``db.session``, an explicit commit.

Configured as its documentation shows (``SQLALCHEMY_ENGINES = {"default": url}``, the
extension's defaults otherwise). ``db.session`` is a plain ``Session`` kept for the app
context and closed at its teardown, never committed, so ``POST /items`` calls
``db.session.commit()`` itself, as its users write it. ``SQLAlchemy(app)`` also registers
an ``async`` teardown function (for its async sessions), which Flask runs through asgiref
on every request, used or not: that cost is part of what this variant measures.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_sqlalchemy_lite import SQLAlchemy

from .shared import use_sqlite_pragmas
from .wsgi_common import managed_routes, new_app

__all__ = ["build"]


def build(url: str, mode: str) -> Flask:
    """The peer's app; ``mode`` must be ``"sync"``."""
    if mode != "sync":
        raise ValueError(f"The WSGI apps use a sync driver; got mode {mode!r}.")
    use_sqlite_pragmas(url)
    app = new_app()
    app.config["SQLALCHEMY_ENGINES"] = {"default": url}
    db = SQLAlchemy(app)

    def stats() -> dict[str, Any]:
        return {"checkedout": db.engine.pool.checkedout()}

    managed_routes(app, lambda: db.session, stats, commit=True)
    return app
