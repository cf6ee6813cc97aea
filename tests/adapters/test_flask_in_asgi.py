"""A Flask app used from inside an ASGI request under ``SessionMiddleware``, same database.

A Flask app context pushed by an endpoint belongs to the request's unit, whether or not the
endpoint has used the session yet; and a Flask app of that database served in-process from
the endpoint is the middleware installed twice, which is refused.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from flask import Flask
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from sessionscope import Database

from .._models import Item
from ..conftest import backend_params
from ..middleware._asgi_apps import nothing_left, with_route
from ..middleware._driver import call
from .test_flask import Rows

pytestmark = pytest.mark.anyio

SQLITE_SYNC = pytest.mark.parametrize(
    "backend", backend_params(backends=["sqlite"], modes=["sync"]), indirect=True
)


@SQLITE_SYNC
@pytest.mark.parametrize("used_first", [False, True], ids=["unused", "used"])
async def test_flask_app_context_in_an_asgi_request_is_the_requests_unit(
    db: Database[Any], rows: Rows, used_first: bool
) -> None:
    """Before or after the endpoint's first use of the session, the write is committed
    with the request (it was written in a unit of the app context's, never committed).
    """
    flask_app = Flask(__name__)
    db.init_app(flask_app)

    def endpoint(request: Request) -> PlainTextResponse:
        if used_first:
            db.session.add(Item(name="before"))
        with flask_app.app_context():
            db.session.add(Item(name="inside"))
        return PlainTextResponse("ok", status_code=201)

    app = with_route(db, "/flask-context", endpoint)
    assert (await call(app, "POST", "/flask-context")).status == 201
    assert sorted(rows()) == (["before", "inside"] if used_first else ["inside"])
    assert nothing_left(db) == (0, 0, 0)


@SQLITE_SYNC
async def test_flask_app_of_the_same_database_inside_an_asgi_request_is_refused(
    db: Database[Any], rows: Rows
) -> None:
    """Two middlewares for one database would nest units silently: the inner one refuses."""
    flask_app = Flask(__name__)
    db.init_app(flask_app)
    errors: list[BaseException] = []

    @flask_app.post("/x")
    def create() -> tuple[str, int]:
        db.session.add(Item(name="nested"))  # pragma: no cover - refused before the view
        return "ok", 201  # pragma: no cover

    def endpoint(request: Request) -> PlainTextResponse:
        try:
            flask_app.test_client().post("/x")
        except RuntimeError as error:
            errors.append(error)
        return PlainTextResponse("ok")

    app = with_route(db, "/mounted", endpoint)
    assert (await call(app, "POST", "/mounted")).status == 200
    assert len(errors) == 1
    assert "installed twice" in str(errors[0])
    assert rows() == []
    assert nothing_left(db) == (0, 0, 0)


@SQLITE_SYNC
async def test_asgi_app_of_the_same_database_inside_a_wsgi_request_is_refused(
    db: Database[Any], rows: Rows
) -> None:
    """The other way round: a WSGI request whose code calls the ASGI app in-process."""
    errors: list[BaseException] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        db.session.add(Item(name="nested"))  # pragma: no cover - refused before the app
        return PlainTextResponse("ok")  # pragma: no cover

    asgi_app = with_route(db, "/inner", endpoint)
    flask_app = Flask(__name__)
    db.init_app(flask_app)

    @flask_app.post("/outer")
    def outer() -> tuple[str, int]:
        try:
            anyio.run(call, asgi_app, "POST", "/inner")
        except RuntimeError as error:
            errors.append(error)
        return "ok", 200

    response = await anyio.to_thread.run_sync(lambda: flask_app.test_client().post("/outer"))
    assert response.status_code == 200
    assert len(errors) == 1
    assert "installed twice" in str(errors[0])
    assert rows() == []
    assert nothing_left(db) == (0, 0, 0)
