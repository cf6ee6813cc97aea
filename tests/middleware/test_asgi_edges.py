"""SessionMiddleware at the edges of a response: replaced by a 500, or a start alone.

Each case ends with the ``make_db`` fixture's check: pool back to 0 checked out, no live
unit, an empty registry.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from sessionscope import Database, SessionMiddleware
from sessionscope._types import Message, Receive, Scope, Send

from .._models import Child, Item
from ..conftest import DatabaseFactory, backend_params
from ._asgi_apps import insert, nothing_left, with_route
from ._driver import Exchange, call, http_scope

pytestmark = pytest.mark.anyio

SQLITE = backend_params(backends=["sqlite"])
SQLITE_SYNC = backend_params(backends=["sqlite"], modes=["sync"])


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_stream_writes_after_a_failed_commit_are_rolled_back(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """The commit at the start fails and the client gets a 500; the body the app still
    runs is part of that failed response, so what it writes is rolled back too.
    """
    db = make_db()

    async def endpoint(request: Request) -> Response:
        db.session.add(Child(parent_id=999_999))  # no such parent: refused at COMMIT

        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            await insert(db, "after-500")
            yield b"last"

        return StreamingResponse(body())

    exchange = await call(with_route(db, "/stream-fail", endpoint), "POST", "/stream-fail")
    assert exchange.status == 500
    assert exchange.body == b"Internal Server Error"
    assert rows() == []


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_background_work_after_a_failed_commit_still_gets_its_own_unit(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """Work after the response is not part of it: after the 500 it is committed as usual."""
    db = make_db()

    async def endpoint(request: Request) -> Response:
        db.session.add(Child(parent_id=999_999))
        return PlainTextResponse("ok", background=BackgroundTask(insert, db, "background"))

    exchange = await call(with_route(db, "/fail-then-work", endpoint), "POST", "/fail-then-work")
    assert exchange.status == 500
    assert rows() == ["background"]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_stream_whose_early_write_fails_to_commit_is_left_incomplete(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A write the body makes before its first chunk is stream work (rule 9): the start has
    left already, so a commit of it that fails withholds the final message instead.
    """
    db = make_db()

    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            db.session.add(Child(parent_id=999_999))
            yield b"first;"
            yield b"last"

        return StreamingResponse(body())

    exchange = Exchange()
    with pytest.raises(sa.exc.IntegrityError):
        await call(with_route(db, "/stream-early", endpoint), "POST", "/stream-early", exchange)
    assert exchange.status == 200
    assert exchange.body == b"first;last"  # Starlette ends with an empty final message
    assert not exchange.complete
    assert nothing_left(db) == (0, 0, 0)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
@pytest.mark.parametrize("how", ["raises", "cancelled"])
async def test_start_only_response_whose_send_fails_leaves_nothing_open(
    make_db: DatabaseFactory, rows: Callable[[], list[str]], how: str
) -> None:
    """The app wrote, sent a start with no body and returned; forwarding that start can
    fail (the client is gone) or be cancelled: what was written before the start was
    committed before it left (rule 3), and the unit is removed anyway.
    """
    db = make_db()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await insert(db, "start-only")
        await send({"type": "http.response.start", "status": 204, "headers": []})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if how == "raises":
            raise OSError("the client went away")
        await anyio.sleep(10)

    middleware = SessionMiddleware(app, db=db)
    if how == "raises":
        with pytest.raises(OSError, match="went away"):
            await middleware(http_scope("POST", "/"), receive, send)
    else:
        with anyio.move_on_after(0.2) as scope:
            await middleware(http_scope("POST", "/"), receive, send)
        assert scope.cancelled_caught
    assert nothing_left(db) == (0, 0, 0)
    assert rows() == ["start-only"]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_work_after_the_response_may_call_the_app_in_process(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """Once the response is complete the request is no longer being handled: a background
    task that calls the same app (an internal sub-request) is not mistaken for the
    middleware installed twice, and each call keeps its own unit.
    """
    db = make_db()
    inner: list[int | None] = []

    async def sub_request() -> None:
        inner.append((await call(app, "POST", "/items/inner")).status)

    async def endpoint(request: Request) -> Response:
        await insert(db, "outer")
        return PlainTextResponse("ok", background=BackgroundTask(sub_request))

    app = with_route(db, "/outer", endpoint)
    assert (await call(app, "POST", "/outer")).status == 200
    assert inner == [200]
    assert sorted(rows()) == ["inner", "outer"]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_a_final_zerocopysend_completes_the_response(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """The zero-copy send extension's last message ends the response like a final body:
    the request's writes are committed, and work after it gets a unit of its own.
    """
    db = make_db()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await insert(db, "request")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.zerocopysend", "file": 0, "more_body": False})
        await insert(db, "after")

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await SessionMiddleware(app, db=db)(http_scope("GET", "/"), receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.zerocopysend"]
    assert sorted(rows()) == ["after", "request"]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_the_binding_keeps_nothing_of_the_request_alive(make_db: DatabaseFactory) -> None:
    """Every callback scheduled during a request holds a copy of its context, and so the
    binding, until it runs: the binding must not reach the scope, receive or send (under
    256 connections that made the garbage collector run three times as often).
    """
    db = make_db()
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        binding = db.units.binding.get()
        seen.extend(gc.get_referents(binding))
        for referent in gc.get_referents(binding):
            seen.extend(gc.get_referents(referent))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope("GET", "/")
    await SessionMiddleware(app, db=db)(scope, receive, send)
    assert len(sent) == 2
    assert seen  # the binding's own fields were seen
    assert not [r for r in seen if r is scope or r is receive or r is send or r is sent]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_stream_that_never_uses_the_session_passes_through_whole(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """No unit to settle: every chunk reaches the server in order, and work after the
    final chunk gets a unit of its own, committed.
    """
    db = make_db()

    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"a;"
            yield b"b;"
            yield b"c"

        return StreamingResponse(body(), background=BackgroundTask(insert, db, "after"))

    exchange = await call(with_route(db, "/plain-stream", endpoint), "GET", "/plain-stream")
    assert exchange.status == 200
    assert exchange.body == b"a;b;c"
    assert exchange.complete
    assert rows() == ["after"]


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
async def test_session_built_with_options_belongs_to_the_request(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """'db.session(**options)' builds the request's session with those options; it is the
    one the request then uses, committed by the status and removed at the end.
    """
    db: Database[Session] = make_db()
    seen: list[bool] = []

    def endpoint(request: Request) -> Response:
        session = db.session(autoflush=False)
        seen.append(session.autoflush)
        seen.append(db.session() is session)
        session.add(Item(name="with-options"))
        return PlainTextResponse("ok")

    assert (await call(with_route(db, "/options", endpoint), "GET", "/options")).status == 200
    assert seen == [False, True]
    assert rows() == ["with-options"]
    assert nothing_left(db) == (0, 0, 0)
