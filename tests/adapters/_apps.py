"""Flask apps the adapter tests share."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

from flask import Flask

from sessionscope import Database

from .._models import Item
from .._servers import fetch, wait_until, werkzeug_server


def items_app(db: Database[Any], **options: Any) -> Flask:
    """A Flask app with ``db`` registered; POST /<name> stores an item and answers 201."""
    app = Flask(__name__)
    db.init_app(app, **options)

    @app.post("/<name>")
    def create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        return name, 201

    return app


def answers_as_stored(app: Flask, db: Database[Any], rows: Callable[[], list[str]]) -> None:
    """POST /paid through a real server: a 2xx exactly when its row is stored (rule 19)."""
    with werkzeug_server(app) as port:
        status, _ = fetch(port, "POST", "/paid")
        wait_until(lambda: db.live_units == 0)
    stored_rows = rows()
    assert (status < 400) == (stored_rows == ["paid"]), (status, stored_rows)


def leave_stream(port: int, path: str = "/stream") -> None:
    """A client that reads the first 70 kB of a streamed body, then goes away."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    assert response.status == 200
    response.read(70_000)
    response.close()
    connection.close()
