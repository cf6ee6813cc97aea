"""How a failed commit is logged: an outcome the app answers with 'on_commit_error' is one
WARNING line naming the request, the database and the driver's message (no traceback, no
SQL, no values); one it does not answer is an ERROR with the traceback."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from flask import Flask
from sqlalchemy import event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.test import Client

from sessionscope import Database, SessionMiddleware
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Base, Item
from .conftest import assert_no_leaks

pytestmark = pytest.mark.anyio

SECRET_VALUE = "apple-7f3a"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database[Any]]:
    database: Database[Any] = Database(f"sqlite:///{tmp_path / 'logs.sqlite3'}")
    Base.metadata.create_all(database.sync_engine)
    gc.disable()  # a leak cannot hide behind the garbage collector
    try:
        yield database
        assert_no_leaks(database)
    finally:
        gc.enable()
        database.dispose()


def library(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sessionscope" and r.levelno == level]


def asgi_app(db: Database[Any], **options: Any) -> Starlette:
    def add(request: Request) -> Response:
        db.session.add(Item(name=SECRET_VALUE))  # flushed by the commit: a duplicate fails there
        return PlainTextResponse("created", status_code=201)

    app = Starlette(routes=[Route("/items", add, methods=["POST"])])
    app.add_middleware(SessionMiddleware, db=db, **options)
    return app


def conflict(error: BaseException) -> Response:
    return PlainTextResponse("exists", status_code=409)


async def post_twice(app: Starlette) -> list[int]:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [(await client.post("/items")).status_code for _ in range(2)]


def wsgi_post_twice(db: Database[Any], adapter: str, **options: Any) -> list[int]:
    """POST the same item twice through a Flask app (``db.init_app``) or a WSGI middleware
    around one; the statuses."""
    flask = Flask(__name__)

    @flask.post("/items")
    def add() -> tuple[str, int]:
        db.session.add(Item(name=SECRET_VALUE))
        return "created", 201

    client: Client
    if adapter == "flask":
        db.init_app(flask, **options)
        client = flask.test_client()
    else:
        client = Client(WSGISessionMiddleware(flask.wsgi_app, db, **options))
    statuses = []
    for _ in range(2):
        with client.post("/items") as response:
            response.get_data()
            statuses.append(response.status_code)
    return statuses


def assert_answered_line(record: logging.LogRecord, db: Database[Any]) -> None:
    message = record.getMessage()
    assert message.startswith(f"Commit failed for POST /items on {db.url} (IntegrityError: ")
    assert message.endswith("; rolled back, and answered by 'on_commit_error'.")
    assert record.exc_info is None
    # Neither the SQL nor the values it carried reach the log.
    assert "INSERT" not in message
    assert SECRET_VALUE not in message


async def test_an_answered_commit_failure_is_one_warning_line(
    db: Database[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sessionscope")
    assert await post_twice(asgi_app(db, on_commit_error=conflict)) == [201, 409]
    assert library(caplog, logging.ERROR) == []
    [line] = library(caplog, logging.WARNING)
    assert_answered_line(line, db)


@pytest.mark.parametrize("hook", ["none", "declines"])
async def test_an_unanswered_commit_failure_is_an_error_with_its_traceback(
    db: Database[Any], caplog: pytest.LogCaptureFixture, hook: str
) -> None:
    options: dict[str, Any] = {}
    if hook == "declines":
        options["on_commit_error"] = lambda error: None  # the plain 500, then
    caplog.set_level(logging.DEBUG, logger="sessionscope")
    assert await post_twice(asgi_app(db, **options)) == [201, 500]
    assert library(caplog, logging.WARNING) == []
    [line] = library(caplog, logging.ERROR)
    assert line.exc_info is not None
    assert type(line.exc_info[1]).__name__ == "IntegrityError"
    # With or without a hook, the line says which request failed, on which database.
    assert line.getMessage() == (
        f"Commit failed for POST /items on {db.url}; the unit of work was rolled back."
    )


@pytest.mark.parametrize("adapter", ["flask", "wsgi"])
def test_wsgi_and_flask_log_an_answered_failure_the_same_way(
    db: Database[Any], caplog: pytest.LogCaptureFixture, adapter: str
) -> None:
    def respond(error: BaseException) -> Any:
        return lambda environ, start: (start("409 Conflict", []), [b"exists"])[1]

    caplog.set_level(logging.DEBUG, logger="sessionscope")
    statuses = wsgi_post_twice(db, adapter, on_commit_error=respond)
    assert statuses == [201, 409]
    assert library(caplog, logging.ERROR) == []
    [line] = library(caplog, logging.WARNING)
    assert_answered_line(line, db)


@pytest.mark.parametrize("hook", ["none", "declines"])
@pytest.mark.parametrize("adapter", ["flask", "wsgi"])
def test_wsgi_and_flask_name_the_request_of_an_unanswered_failure(
    db: Database[Any], caplog: pytest.LogCaptureFixture, adapter: str, hook: str
) -> None:
    """Without ``on_commit_error``, or with one that returns None (as under ASGI: the plain
    500, then), the ERROR still says which request and which database failed, so the line
    can be traced back without reading the traceback's frames."""
    options: dict[str, Any] = {}
    if hook == "declines":
        options["on_commit_error"] = lambda error: None
    caplog.set_level(logging.DEBUG, logger="sessionscope")
    statuses = wsgi_post_twice(db, adapter, **options)
    assert statuses == [201, 500]
    assert library(caplog, logging.WARNING) == []
    [line] = library(caplog, logging.ERROR)
    assert line.exc_info is not None
    assert type(line.exc_info[1]).__name__ == "IntegrityError"
    assert line.getMessage() == (
        f"Commit failed for POST /items on {db.url}; the unit of work was rolled back."
    )


async def test_a_cancellation_while_the_failure_is_rolled_back_keeps_its_line(
    db: Database[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The request is cancelled (its client left, the server shuts down) while the unit of
    a failed commit is rolled back: no answer is sent, but the failure is still logged,
    naming the request, and nothing is left checked out."""
    app = asgi_app(db)
    assert await post_twice(app) == [201, 500]  # the second POST fails at its commit
    caplog.clear()
    rolled_back = anyio.Event()

    @event.listens_for(db.session, "after_rollback")
    def slow_rollback(session: Any) -> None:
        time.sleep(0.3)  # the cancellation arrives during this rollback
        rolled_back.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/items", "raw_path": b"/items", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    caplog.set_level(logging.DEBUG, logger="sessionscope")
    with anyio.move_on_after(0.1) as scope_of_test:
        await app(scope, receive, send)
    assert scope_of_test.cancelled_caught
    await rolled_back.wait()
    assert sent == []
    [line] = library(caplog, logging.ERROR)
    assert line.getMessage() == (
        f"Commit failed for POST /items on {db.url}; the unit of work was rolled back."
    )
    event.remove(db.session, "after_rollback", slow_rollback)
