"""The WSGI baseline: a bare Flask app that opens its session by hand in each endpoint.

What the WSGI variants are measured against, under the same gunicorn settings: the same
endpoints, the same sync driver and the same default pool, with
``with factory.begin() as session:`` written into every endpoint instead of an extension
or middleware managing the session.
"""

from __future__ import annotations

from flask import Flask, Response, request
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from .shared import FAIL_NAME, BenchFailure, Item, item_json, use_sqlite_pragmas
from .wsgi_common import add_noop_and_stats, json_response, new_app, not_found

__all__ = ["build"]


def build(url: str, mode: str) -> Flask:
    """The bare Flask app for ``url``; ``mode`` must be ``"sync"``."""
    if mode != "sync":
        raise ValueError(f"The WSGI apps use a sync driver; got mode {mode!r}.")
    use_sqlite_pragmas(url)
    engine = create_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)
    app = new_app()

    @app.get("/items/<int:item_id>")
    def read(item_id: int) -> Response:
        with factory.begin() as session:
            item = session.get(Item, item_id)
            return not_found() if item is None else json_response(item_json(item))

    @app.post("/items")
    def create() -> Response:
        name = request.get_json()["name"]
        with factory.begin() as session:
            item = Item(name=name)
            session.add(item)
            session.flush()
            body = item_json(item)
        return json_response(body, status=201)

    @app.get("/fail")
    def fail() -> Response:
        with factory.begin() as session:
            session.add(Item(name=FAIL_NAME))
            session.flush()
            raise BenchFailure("GET /fail raises after writing, so its write must roll back.")

    add_noop_and_stats(app, lambda: {"checkedout": engine.pool.checkedout()})
    return app
