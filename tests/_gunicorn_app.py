"""The app the gunicorn tests serve: ``tests._gunicorn_app:create()``, set up by environment.

``SESSIONSCOPE_TEST_URL`` names the database, ``SESSIONSCOPE_TEST_ADAPTER`` is ``wsgi`` or
``flask``. ``/leaks`` reports what is still open (its own request opens no unit).
"""

from __future__ import annotations

import os
from typing import Any
from wsgiref.types import WSGIApplication

import sqlalchemy as sa
from flask import Flask
from werkzeug.wrappers import Request, Response

from sessionscope import Database
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Child, Item


def _foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create() -> WSGIApplication:
    """Build the app named by the environment."""
    url = os.environ["SESSIONSCOPE_TEST_URL"]
    db: Database[Any] = Database(url, engine_options={"pool_size": 4})
    if url.startswith("sqlite"):
        sa.event.listen(db.sync_engine, "connect", _foreign_keys)

    def respond(path: str) -> Response:
        if path == "/leaks":
            report = f"{db.live_units} {db.live_sessions} {db.sync_engine.pool.checkedout()}"  # type: ignore[attr-defined]
            return Response(report)
        name = path.rsplit("/", 1)[-1]
        db.session.add(Item(name=name))
        if path.startswith("/create/"):
            return Response(name, status=201)
        if path.startswith("/refuse/"):
            return Response(name, status=400)
        db.session.add(Child(parent_id=999_999))
        return Response("the commit will fail", status=201)

    if os.environ["SESSIONSCOPE_TEST_ADAPTER"] == "wsgi":

        @Request.application
        def app(request: Request) -> Response:
            return respond(request.path)

        return WSGISessionMiddleware(app, db)

    flask_app = Flask(__name__)

    @flask_app.route("/<path:path>")
    def endpoint(path: str) -> Response:
        return respond("/" + path)

    db.init_app(flask_app)
    return flask_app
