"""One stream semantics on every adapter (SPEC rules 3, 9 and 19; issue 12 cases 7 and 8).

The status decision commits what the app wrote before the response started; what the body
writes afterwards, before or after its first chunk, is stream work: committed before the
final message leaves if the status passed, rolled back if the body raises. Each story runs
on every adapter: ``SessionMiddleware`` driven by raw ASGI calls and under a real uvicorn
server (sync and async drivers), ``WSGISessionMiddleware`` around a PEP 3333 generator app,
and the Flask extension with a generator body, with and without ``stream_with_context``
(werkzeug's test client for both). ``make_db`` checks afterwards that nothing was left behind.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import httpx
import pytest
from flask import Flask, stream_with_context
from flask import Response as FlaskResponse
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from werkzeug.test import Client

from sessionscope import Database
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Item
from ._uvicorn import serve, wait_until
from .conftest import MODES, Backend, DatabaseFactory, backend_params
from .middleware._asgi_apps import insert, nothing_left, with_route
from .middleware._driver import Exchange, call

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]

ASGI_ADAPTERS = ["asgi", "uvicorn"]
WSGI_ADAPTERS = ["wsgi", "flask", "flask-stream_with_context"]


def adapter_params(adapters: list[str] = ASGI_ADAPTERS + WSGI_ADAPTERS) -> list[Any]:
    """Each of ``adapters`` on every backend it supports: ASGI with sync and async drivers."""
    params = []
    for adapter in adapters:
        modes = MODES if adapter in ASGI_ADAPTERS else ["sync"]
        for param in backend_params(modes=modes):
            params.append(
                pytest.param(*param.values, adapter, id=f"{adapter}-{param.id}", marks=param.marks)
            )
    return params


every_adapter = pytest.mark.parametrize(
    ("backend", "adapter"), adapter_params(), indirect=["backend"]
)


class Boom(Exception):
    """An error raised by a streaming body."""


@dataclass(frozen=True)
class Write:
    """The body adds an item named ``name`` and flushes it."""

    name: str


@dataclass(frozen=True)
class Chunk:
    """The body yields ``data``."""

    data: bytes


@dataclass(frozen=True)
class Fail:
    """The body raises ``Boom``."""


Step = Write | Chunk | Fail


@dataclass(frozen=True)
class Story:
    """One request: the items the endpoint writes before answering, then its body's steps."""

    before: tuple[str, ...]
    steps: tuple[Step, ...]
    status: int = 200


@dataclass
class Seen:
    """What the client saw: the status, the body it received, and whether it was complete."""

    status: int
    body: bytes
    complete: bool


async def run(adapter: str, db: Database[Any], story: Story) -> Seen:
    """Send one request telling ``story`` through ``adapter``; return once the unit has ended."""
    if adapter == "asgi":
        exchange = Exchange()
        with contextlib.suppress(Boom):
            await call(asgi_app(db, story), "POST", "/", exchange)
        return Seen(exchange.status or 0, exchange.body, exchange.complete)
    if adapter == "uvicorn":
        return await run_uvicorn(db, story)
    return run_wsgi(wsgi_app(adapter, db, story))


def asgi_app(db: Database[Any], story: Story) -> Any:
    async def endpoint(request: Request) -> Response:
        for name in story.before:
            await insert(db, name)

        async def body() -> AsyncIterator[bytes]:
            for step in story.steps:
                if isinstance(step, Write):
                    await insert(db, step.name)
                elif isinstance(step, Chunk):
                    yield step.data
                else:
                    raise Boom("the body failed")

        return StreamingResponse(body(), status_code=story.status)

    return with_route(db, "/", endpoint)


async def run_uvicorn(db: Database[Any], story: Story) -> Seen:
    body = b""
    complete = True
    async with (
        serve(asgi_app(db, story)) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as http,
    ):
        async with http.stream("POST", "/") as response:
            try:
                async for chunk in response.aiter_raw():
                    body += chunk
            except httpx.RemoteProtocolError:
                complete = False
        # The server ends the unit after the client has its answer.
        await wait_until(lambda: nothing_left(db) == (0, 0, 0))
    return Seen(response.status_code, body, complete)


def wsgi_app(adapter: str, db: Database[Any], story: Story) -> WSGIApplication:
    def write(name: str) -> None:
        db.session.add(Item(name=name))
        db.session.flush()

    def body() -> Iterator[bytes]:
        for step in story.steps:
            if isinstance(step, Write):
                write(step.name)
            elif isinstance(step, Chunk):
                yield step.data
            else:
                raise Boom("the body failed")

    if adapter == "wsgi":

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            for name in story.before:
                write(name)
            start_response(f"{story.status} {HTTPStatus(story.status).phrase}", [])
            return body()

        return WSGISessionMiddleware(app, db)
    flask_app = Flask(__name__)
    db.init_app(flask_app)

    @flask_app.post("/")
    def endpoint() -> FlaskResponse:
        for name in story.before:
            write(name)
        chunks = body()
        if adapter == "flask-stream_with_context":
            chunks = stream_with_context(chunks)
        return FlaskResponse(chunks, status=story.status)

    return flask_app


def run_wsgi(app: WSGIApplication) -> Seen:
    """Read the response as a server would, and close it; a body that raises is incomplete."""
    response = Client(app).post("/")
    body = b""
    complete = True
    try:
        for chunk in response.iter_encoded():
            body += chunk
    except Boom:
        complete = False
    finally:
        response.close()
    return Seen(response.status_code, body, complete)


# -- case 8: a body that raises ---------------------------------------------------------------


@every_adapter
async def test_body_that_raises_keeps_none_of_its_writes(
    make_db: DatabaseFactory, rows: Rows, adapter: str
) -> None:
    """A write the body made after the start, even before its first chunk, belongs to the
    stream: a body that then raises rolls it back, the same on every adapter.
    """
    db = make_db()
    story = Story(before=(), steps=(Write("streamed"), Chunk(b"first;"), Fail()))
    seen = await run(adapter, db, story)
    assert (seen.status, seen.body, seen.complete) == (200, b"first;", False)
    assert rows() == []


@every_adapter
async def test_body_that_raises_keeps_what_was_written_before_the_start(
    make_db: DatabaseFactory, rows: Rows, adapter: str
) -> None:
    """What the endpoint wrote before the response started was committed with the start: a
    body that fails later cannot take it back.
    """
    db = make_db()
    story = Story(before=("before",), steps=(Chunk(b"first;"), Fail()))
    seen = await run(adapter, db, story)
    assert (seen.status, seen.body, seen.complete) == (200, b"first;", False)
    assert rows() == ["before"]


# -- case 7: an after_commit listener that raises at the start --------------------------------


def listened_db(make_db: DatabaseFactory, backend: Backend) -> tuple[Database[Any], Any]:
    """A database, and the target that its sessions' events are listened on."""
    if not backend.is_async:
        db = make_db()
        return db, db.session.session_factory
    # An async_sessionmaker takes no session events: they go to the Session class its
    # AsyncSessions wrap, one made here for this database alone.
    listened = type("ListenedSession", (Session,), {})
    return make_db(session_options={"sync_session_class": listened}), listened


def raise_at_the_first_commit(target: Any) -> None:
    """Make the first ``after_commit`` of ``target``'s sessions raise, and no later one."""
    calls: list[Session] = []

    def after_commit(session: Session) -> None:
        calls.append(session)
        if len(calls) == 1:
            raise LookupError("an after_commit listener failed")

    event.listen(target, "after_commit", after_commit)


def the_one_error(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """The only record logged at ERROR or above, from any logger."""
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1, [f"{r.name}: {r.getMessage()}" for r in errors]
    return errors[0]


@every_adapter
async def test_stream_writes_after_an_after_commit_listener_raised_at_the_start(
    make_db: DatabaseFactory,
    backend: Backend,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
    adapter: str,
) -> None:
    """The start's COMMIT succeeded, so the response stands and the session must still serve
    the stream: its writes are stored too, and the listener's error is logged once.
    """
    db, target = listened_db(make_db, backend)
    raise_at_the_first_commit(target)
    story = Story(before=("before",), steps=(Chunk(b"first;"), Write("in-stream"), Chunk(b"last")))
    with caplog.at_level(logging.ERROR):
        seen = await run(adapter, db, story)
    assert (seen.status, seen.body, seen.complete) == (200, b"first;last", True)
    assert rows() == ["before", "in-stream"]
    error = the_one_error(caplog)
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], LookupError)


@every_adapter
async def test_quiet_stream_after_an_after_commit_listener_raised_logs_one_error(
    make_db: DatabaseFactory,
    backend: Backend,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
    adapter: str,
) -> None:
    """A stream that writes nothing has nothing to commit at its end: the listener's error is
    the only one logged, never a second, false one for a commit that did not fail.
    """
    db, target = listened_db(make_db, backend)
    raise_at_the_first_commit(target)
    story = Story(before=("before",), steps=(Chunk(b"first;"), Chunk(b"last")))
    with caplog.at_level(logging.ERROR):
        seen = await run(adapter, db, story)
    assert (seen.status, seen.body, seen.complete) == (200, b"first;last", True)
    assert rows() == ["before"]
    error = the_one_error(caplog)
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], LookupError)
