"""SessionMiddleware where requests end badly: the failure modes users of other libraries met.

A session poisoned by a swallowed flush error, every way out of a request in a loop, an
``after_commit`` listener that raises, a commit or a pool wait that is cancelled, errors
raised before routing, objects read after the commit, child tasks, and context tokens under
other middleware. Driven through raw ASGI calls on SQLite, PostgreSQL and MariaDB, sync and
async; ``make_db`` checks afterwards that nothing was left behind, with the garbage collector
off.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware
from sessionscope._types import ASGIApp, Message, Receive, Scope, Send

from .._models import Child, Item, Owner, Pet
from .._units import hold_first_commit
from ..conftest import DatabaseFactory, assert_no_leaks, backend_params
from ._asgi_apps import build_app, insert, resolve
from ._driver import Exchange, call

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]


def sync_session_of(db: Database[Any]) -> Session:
    """The current unit's ``Session`` (the one inside it, for an ``AsyncSession``)."""
    session = db.session()
    return session.sync_session if isinstance(session, AsyncSession) else session


def pool_clean(db: Database[Any]) -> None:
    """Right after a request: no unit, no session, every connection back."""
    assert db.live_units == 0
    assert db.live_sessions == 0
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def cancel_request(
    app: ASGIApp, target: str, reached: anyio.Event, how: str, delay: float = 0.05
) -> None:
    """Start ``POST target`` and cancel it once ``reached`` is set, the asyncio or anyio way."""
    if how == "task.cancel":
        task = asyncio.ensure_future(call(app, "POST", target))
        await reached.wait()
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(call, app, "POST", target)
            await reached.wait()
            await anyio.sleep(delay)
            scope.cancel()
    assert scope.cancelled_caught


# -- 04: a session poisoned by a failed flush -------------------------------------------------


@pytest.mark.parametrize("rolls_back", [False, True], ids=["swallowed", "rolled-back"])
async def test_swallowed_flush_error_never_reaches_the_next_request(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture, rolls_back: bool
) -> None:
    """A request that hides a failed flush cannot hand a broken session to the next one.

    An endpoint that catches the error but keeps the failed transaction cannot have anything
    committed, so it gets a 500 rather than its 200; one that rolls back answers as it likes.
    """
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    sessions: list[int] = []

    async def duplicate(request: Request) -> Response:
        sessions.append(id(db.session()))
        db.session.info["request"] = "duplicate"
        db.session.add(Item(name="taken"))
        try:
            await resolve(db.session.flush())
        except sa.exc.IntegrityError:
            if rolls_back:
                await resolve(db.session.rollback())
        return PlainTextResponse("all is well")

    async def write(request: Request) -> Response:
        sessions.append(id(db.session()))
        assert "request" not in db.session.info, "the previous request's session came back"
        await insert(db, "next")
        return PlainTextResponse("stored")

    app = build_app(db)
    app.router.routes[:0] = [
        Route("/duplicate", duplicate, methods=["POST"]),
        Route("/write", write, methods=["POST"]),
    ]
    assert (await call(app, "POST", "/items/taken")).status == 200
    with caplog.at_level(logging.ERROR, logger="sessionscope"):
        answer = await call(app, "POST", "/duplicate")
    assert answer.status == (200 if rolls_back else 500)
    assert bool(caplog.records) is not rolls_back
    pool_clean(db)
    assert (await call(app, "POST", "/write")).status == 200
    assert rows() == ["taken", "next"]
    assert len(set(sessions)) == len(sessions) == 2


# -- 12: the registry after every way out of a request ---------------------------------------


async def test_every_exit_path_leaves_nothing_behind(
    make_db: DatabaseFactory, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Success, 4xx, crash, failed commit, disconnect, cancellation, background work: in a loop,
    each leaves an empty registry and a full pool, and every session object is freed."""
    # The failed commits are logged with their traceback, whose frames hold the session: keep
    # the records away from pytest's capture, which would hold them until the test ends.
    logger = logging.getLogger("sessionscope")
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", [logging.NullHandler()])
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    refs: list[weakref.ref[Any]] = []
    parked = anyio.Event()

    async def tracked_insert(name: str) -> None:
        refs.append(weakref.ref(db.session()))
        await insert(db, name)

    async def ok(request: Request) -> Response:
        await tracked_insert(request.path_params["name"])
        return PlainTextResponse("ok", status_code=201)

    async def conflict(request: Request) -> Response:
        await tracked_insert(request.path_params["name"])
        return PlainTextResponse("conflict", status_code=409)

    async def crash(request: Request) -> Response:
        await tracked_insert(request.path_params["name"])
        raise RuntimeError("endpoint failed after writing")

    async def orphan(request: Request) -> Response:
        refs.append(weakref.ref(db.session()))
        db.session.add(Child(parent_id=999_999))
        return PlainTextResponse("refused at COMMIT")

    async def stream(request: Request) -> Response:
        name = request.path_params["name"]
        await tracked_insert(name)

        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            await insert(db, name + "-streamed")
            yield b"last"

        return StreamingResponse(body())

    async def park(request: Request) -> Response:
        await tracked_insert(request.path_params["name"])
        parked.set()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def background(request: Request) -> Response:
        name = request.path_params["name"]
        await tracked_insert(name)
        return PlainTextResponse(
            "accepted", background=BackgroundTask(tracked_insert, name + "-bg")
        )

    app = Starlette(
        routes=[
            Route("/ok/{name}", ok, methods=["POST"]),
            Route("/conflict/{name}", conflict, methods=["POST"]),
            Route("/crash/{name}", crash, methods=["POST"]),
            Route("/orphan", orphan, methods=["POST"]),
            Route("/stream/{name}", stream, methods=["POST"]),
            Route("/park/{name}", park, methods=["POST"]),
            Route("/background/{name}", background, methods=["POST"]),
        ],
        middleware=[Middleware(SessionMiddleware, db=db)],
    )

    async def disconnect_mid_stream(target: str) -> Exchange:
        exchange = Exchange()

        async def on_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                exchange.disconnect.set()
                await anyio.sleep(0.01)

        return await call(app, "POST", target, exchange, on_send=on_send)

    expected: list[str] = []
    for i in range(15):
        assert (await call(app, "POST", f"/ok/ok{i}")).status == 201
        expected.append(f"ok{i}")
        pool_clean(db)
        assert (await call(app, "POST", f"/conflict/conflict{i}")).status == 409
        pool_clean(db)
        with pytest.raises(RuntimeError, match="endpoint failed"):
            await call(app, "POST", f"/crash/crash{i}")
        pool_clean(db)
        assert (await call(app, "POST", "/orphan")).status == 500
        pool_clean(db)
        assert not (await disconnect_mid_stream(f"/stream/stream{i}")).complete
        expected.append(f"stream{i}")
        pool_clean(db)
        parked = anyio.Event()
        await cancel_request(app, f"/park/park{i}", parked, "task.cancel", delay=0)
        pool_clean(db)
        assert (await call(app, "POST", f"/background/bg{i}")).status == 200
        expected += [f"bg{i}", f"bg{i}-bg"]
        pool_clean(db)
    assert sorted(rows()) == sorted(expected)
    assert len(refs) == 15 * 8
    gc.collect()
    assert [i % 8 for i, ref in enumerate(refs) if ref() is not None] == [], "kept alive"


# -- 13: an after_commit listener that raises -----------------------------------------------


async def test_after_commit_listener_that_raises_keeps_the_response_and_the_data(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture
) -> None:
    """The COMMIT happened: the 201 stands, no rollback is tried, the next request is clean."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    seen: list[str] = []
    for name in ("commit", "rollback"):
        event.listen(db.sync_engine, name, lambda *args, name=name: seen.append(name))

    def explode(session: Session) -> None:
        raise LookupError("after_commit listener failed")

    async def create(request: Request) -> Response:
        event.listen(sync_session_of(db), "after_commit", explode)
        await insert(db, "stored")
        return PlainTextResponse("created", status_code=201)

    async def write(request: Request) -> Response:
        assert db.session.is_active
        await insert(db, "next")
        return PlainTextResponse("created", status_code=201)

    app = build_app(db)
    app.router.routes[:0] = [
        Route("/listener", create, methods=["POST"]),
        Route("/write", write, methods=["POST"]),
    ]
    with caplog.at_level(logging.DEBUG, logger="sessionscope"):
        answer = await call(app, "POST", "/listener")
    assert (answer.status, answer.body) == (201, b"created")
    assert seen == ["commit"], "a rollback was attempted after the COMMIT"
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], LookupError)
    assert "committed' state" not in caplog.text
    pool_clean(db)
    assert (await call(app, "POST", "/write")).status == 201
    assert rows() == ["stored", "next"]


# -- 02 and 14: cancellation inside the commit and inside the wait for a connection ----------


@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_request_cancelled_inside_its_commit_returns_the_connection(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """A request cancelled once the middleware's COMMIT is on its way sends nothing, waits
    for the COMMIT's outcome (rule 17: the row is stored) and frees its slot.
    """
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    reached, held = hold_first_commit(db)
    app = build_app(db)
    with anyio.fail_after(20):
        await cancel_request(app, "/items/stored", reached, how)
    assert held == [True]
    pool_clean(db)
    with anyio.fail_after(5):
        assert (await call(app, "POST", "/items/next")).status == 200
    assert rows() == ["stored", "next"]


@pytest.mark.parametrize("how", ["task.cancel", "cancel scope"])
@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_request_cancelled_while_waiting_for_a_connection_loses_no_slot(
    make_db: DatabaseFactory, rows: Rows, how: str
) -> None:
    """A request cancelled in the pool's queue neither keeps nor loses the only connection."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 10})
    pool = db.sync_engine.pool
    holding = anyio.Event()
    release = anyio.Event()
    waiting = anyio.Event()

    async def hold(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        holding.set()
        await release.wait()
        return PlainTextResponse("held")

    async def wait(request: Request) -> Response:
        waiting.set()
        await insert(db, "never stored")
        return PlainTextResponse("never sent")

    app = build_app(db)
    app.router.routes[:0] = [
        Route("/hold/{name}", hold, methods=["POST"]),
        Route("/wait", wait, methods=["POST"]),
    ]
    assert (await call(app, "POST", "/items/warm")).status == 200
    overflow = pool.overflow()  # type: ignore[attr-defined]
    randomly = random.Random(14)
    for i in range(10):
        holding, release, waiting = anyio.Event(), anyio.Event(), anyio.Event()
        first = asyncio.ensure_future(call(app, "POST", f"/hold/held{i}"))
        await holding.wait()
        await cancel_request(app, "/wait", waiting, how, delay=randomly.uniform(0, 0.03))
        release.set()
        assert (await first).status == 200
        pool_clean(db)
        assert pool.overflow() == overflow  # type: ignore[attr-defined]
        with anyio.fail_after(2):
            assert (await call(app, "POST", f"/items/after{i}")).status == 200
    assert rows() == ["warm", *[name for i in range(10) for name in (f"held{i}", f"after{i}")]]


# -- 15: errors before routing ----------------------------------------------------------------


class Guard:
    """An inner middleware that reads the database, then refuses the request before routing."""

    def __init__(self, app: ASGIApp, db: Database[Any], refuse_by: str) -> None:
        self.app = app
        self.db = db
        self.refuse_by = refuse_by

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - lifespan is not used here
            await self.app(scope, receive, send)
            return
        await resolve(self.db.session.execute(sa.text("SELECT 1")))
        if self.refuse_by == "response":
            await PlainTextResponse("no entry", status_code=401)(scope, receive, send)
            return
        raise PermissionError("refused before routing")


@pytest.mark.parametrize("refuse_by", ["response", "exception"])
async def test_inner_middleware_refusing_before_routing_leaks_nothing(
    make_db: DatabaseFactory, refuse_by: str
) -> None:
    """A guard that used the session and refused the request ends its unit at once."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    app = Starlette(
        routes=[Route("/items", lambda request: PlainTextResponse("never routed"))],
        middleware=[
            Middleware(SessionMiddleware, db=db),
            Middleware(Guard, db=db, refuse_by=refuse_by),
        ],
    )
    for _ in range(3):
        if refuse_by == "response":
            assert (await call(app, "GET", "/items")).status == 401
        else:
            exchange = Exchange()
            with pytest.raises(PermissionError):
                await call(app, "GET", "/items", exchange)
            assert exchange.status == 500
        pool_clean(db)


async def test_dependency_raising_after_using_the_session_leaks_nothing(
    make_db: DatabaseFactory,
) -> None:
    """A FastAPI dependency that queried and then raised 401 leaves nothing for the GC."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})

    async def authenticated() -> None:
        await resolve(db.session.execute(sa.text("SELECT 1")))
        raise HTTPException(401, "who are you?")

    app = FastAPI()
    app.add_middleware(SessionMiddleware, db=db)

    @app.get("/private", dependencies=[Depends(authenticated)])
    async def private() -> dict[str, str]:
        raise AssertionError("never reached")  # pragma: no cover

    for _ in range(3):
        assert (await call(app, "GET", "/private")).status == 401
        pool_clean(db)


# -- 18: objects read after the commit ---------------------------------------------------------


class OwnerOut(BaseModel):
    name: str
    revision: int
    pets: list[str]


@pytest.fixture
def owner(checker: sa.Engine) -> None:
    """One owner with one pet, stored before the test."""
    with checker.begin() as connection:
        connection.execute(sa.insert(Owner).values(id=1, name="ann", revision=1))
        connection.execute(sa.insert(Pet).values(id=1, owner_id=1, name="rex"))


async def rename(db: Database[Any], name: str) -> Owner:
    """Rename owner 1 and load what the response shows: the new revision and the pets."""
    session = db.session()
    found = await resolve(session.get(Owner, 1))
    assert isinstance(found, Owner)
    found.name = name
    await resolve(session.flush())  # 'revision' is computed by the database: now expired
    await resolve(session.refresh(found, ["revision", "pets"]))
    return found


@pytest.mark.usefixtures("owner")
@pytest.mark.parametrize("expire_on_commit", [True, False])
async def test_response_model_is_built_from_live_objects(
    make_db: DatabaseFactory, checker: sa.Engine, expire_on_commit: bool
) -> None:
    """The commit comes after serialization, so expiring on commit breaks no response model."""
    db = make_db(session_options={"expire_on_commit": expire_on_commit})
    app = FastAPI()
    app.add_middleware(SessionMiddleware, db=db)

    @app.post("/owners/1", response_model=OwnerOut)
    async def update() -> dict[str, Any]:
        found = await rename(db, "bea")
        return {
            "name": found.name,
            "revision": found.revision,
            "pets": [p.name for p in found.pets],
        }

    answer = await call(app, "POST", "/owners/1")
    assert answer.status == 200
    assert OwnerOut.model_validate_json(answer.body) == OwnerOut(
        name="bea", revision=2, pets=["rex"]
    )
    with checker.connect() as connection:
        assert connection.execute(sa.select(Owner.name, Owner.revision)).one() == ("bea", 2)


@pytest.mark.usefixtures("owner")
async def test_stream_reads_objects_after_the_commit(
    make_db: DatabaseFactory, checker: sa.Engine
) -> None:
    """A body streamed after the start-time commit still reads what the endpoint loaded."""
    db = make_db()

    async def update(request: Request) -> Response:
        found = await rename(db, "bea")

        async def body() -> AsyncIterator[bytes]:
            yield b"committed;"
            # Read after the commit at the response start: expire_on_commit=False by default.
            yield f"{found.name},{found.revision},{found.pets[0].name}".encode()

        return StreamingResponse(body())

    app = Starlette(
        routes=[Route("/owners/1", update, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, db=db)],
    )
    answer = await call(app, "POST", "/owners/1")
    assert (answer.status, answer.body) == (200, b"committed;bea,2,rex")


# -- 11: child tasks of a request ---------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(modes=["async"]), indirect=True)
async def test_child_task_of_a_request_shares_its_session(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """A task started and awaited inside the request works in the request's unit."""
    db = make_db()
    shared: list[bool] = []

    async def endpoint(request: Request) -> Response:
        request_session = db.session()

        async def child() -> None:
            shared.append(db.session() is request_session)
            await insert(db, "from-child")

        async with anyio.create_task_group() as group:
            group.start_soon(child)
        return PlainTextResponse("ok", status_code=201)

    app = build_app(db)
    app.router.routes.insert(0, Route("/children", endpoint, methods=["POST"]))
    assert (await call(app, "POST", "/children")).status == 201
    assert shared == [True]
    assert rows() == ["from-child"]


# -- 17: a commit error the app wants to answer itself ------------------------------------------


async def test_commit_error_mapped_to_a_conflict_by_the_hook(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """Exception handlers ran long before the commit; 'on_commit_error' answers in their place."""
    db = make_db()

    def on_commit_error(error: BaseException) -> Response | None:
        if isinstance(error, sa.exc.IntegrityError):
            return PlainTextResponse("conflict", status_code=409)
        return None  # pragma: no cover - only integrity errors are provoked here

    app = build_app(db, on_commit_error=on_commit_error)
    answer = await call(app, "POST", "/orphan")
    assert (answer.status, answer.body) == (409, b"conflict")
    assert (await call(app, "POST", "/items/after")).status == 200
    assert rows() == ["after"]


# -- 31: context tokens under other middleware and cancellation ---------------------------------


class Passing(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware that runs the rest of the app in a task of its own."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


@pytest.mark.parametrize("place", ["outside", "inside", "both"])
async def test_context_tokens_hold_under_task_running_middleware(
    make_db: DatabaseFactory, rows: Rows, caplog: pytest.LogCaptureFixture, place: str
) -> None:
    """Set and reset of the unit's binding never meet another context, cancelled or not."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    parked = anyio.Event()

    async def park(request: Request) -> Response:
        await insert(db, "parked")
        parked.set()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    app = build_app(db)
    app.router.routes.insert(0, Route("/park", park, methods=["POST"]))
    if place in ("inside", "both"):
        app.user_middleware.insert(1, Middleware(Passing))
    if place in ("outside", "both"):
        app.user_middleware.insert(0, Middleware(Passing))
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            assert (await call(app, "POST", f"/items/a{i}")).status == 200
            parked = anyio.Event()
            await cancel_request(app, "/park", parked, "task.cancel")
            pool_clean(db)
    assert rows() == ["a0", "a1", "a2"]
    assert caplog.records == []
    assert_no_leaks(db)
