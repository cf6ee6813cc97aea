"""``sessionscope.testing.isolated`` with Starlette and FastAPI apps, used as a test suite would.

Sync databases are tested through Starlette's ``TestClient`` and through
``httpx.AsyncClient`` with ``ASGITransport`` (inside ``with isolated(db):``); async databases
only through ``httpx`` (inside ``async with isolated(db):``), since ``TestClient`` runs the
app on an event loop of its own. Every check of the database from outside goes through
``rows()``, a connection of its own: it must never see a row of the test, during or after
the block, because nothing is ever committed.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from sessionscope import Database, SessionMiddleware
from sessionscope._types import Message
from sessionscope.adapters.starlette import session_dependency
from sessionscope.testing import Isolation, isolated

from ._models import Item
from .conftest import Backend, DatabaseFactory, assert_no_leaks, backend_params
from .middleware._asgi_apps import insert, names, resolve

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]

SYNC = backend_params(modes=["sync"])
ASYNC = backend_params(modes=["async"])
ON_THE_LOOP = "This unit uses a synchronous session on the event loop"
# Starlette 1.x prefers 'httpx2' for its TestClient; the venv has httpx, which still works.
TESTCLIENT_WARNING = "ignore:Using `httpx` with `starlette.testclient` is deprecated"


# -- the app under test -------------------------------------------------------------------


@dataclass
class Probe:
    """What the app tells the test: callbacks that ran, a slow request that has started."""

    ran: list[str] = field(default_factory=list)
    slow_started: threading.Event = field(default_factory=threading.Event)


def _sync_names(db: Database[Any]) -> list[str]:
    return list(db.session.scalars(sa.select(Item.name).order_by(Item.id)))


def starlette_app(db: Database[Any], probe: Probe) -> Starlette:
    """Endpoints that end a request every way the tests need; ``name`` is the row written."""

    async def create(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)
        db.after_commit(lambda: probe.ran.append(name))
        return PlainTextResponse(name, status_code=int(request.query_params.get("status", 201)))

    async def listing(request: Request) -> Response:
        return JSONResponse(await names(db))

    async def unflushed(request: Request) -> Response:
        # Not flushed: the flush that the commit makes is what fails (a duplicate name).
        db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("must not reach the client", status_code=201)

    async def swallow(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        # Caught, and no rollback: the transaction may not commit (rule 18).
        with contextlib.suppress(sa.exc.DBAPIError):
            await resolve(db.session.execute(sa.text("SELECT * FROM no_such_table")))
        return PlainTextResponse("must not reach the client", status_code=201)

    async def commit_then_conflict(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)
        await resolve(db.session.commit())
        await insert(db, name + "-lost")
        return PlainTextResponse("conflict", status_code=409)

    async def rollback_then_create(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name + "-dropped")
        await resolve(db.session.rollback())
        await insert(db, name)
        return PlainTextResponse(name, status_code=201)

    async def nested(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)
        if db.is_async:
            async with db.begin() as session:
                session.add(Item(name=name + "-nested"))
        else:
            with db.begin() as session:
                session.add(Item(name=name + "-nested"))
        status = int(request.query_params.get("status", 201))
        return JSONResponse(await names(db), status_code=status)

    def create_sync(request: Request) -> Response:
        # A 'def' endpoint: Starlette runs it in a worker thread.
        db.session.add(Item(name=request.path_params["name"]))
        db.session.flush()
        return JSONResponse(_sync_names(db), status_code=201)

    def listing_sync(request: Request) -> Response:
        return JSONResponse(_sync_names(db))

    def nested_sync(request: Request) -> Response:
        name = request.path_params["name"]
        db.session.add(Item(name=name))
        db.session.flush()
        with db.begin() as session:
            session.add(Item(name=name + "-nested"))
        return JSONResponse(_sync_names(db), status_code=201)

    async def background(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)
        tasks = BackgroundTasks()

        async def later() -> None:
            await insert(db, name + "-later")

        tasks.add_task(later)
        if not db.is_async:

            def later_in_a_thread() -> None:
                db.session.add(Item(name=name + "-thread"))

            tasks.add_task(later_in_a_thread)
        return PlainTextResponse("accepted", status_code=201, background=tasks)

    async def stream(request: Request) -> Response:
        name = request.path_params["name"]
        await insert(db, name)

        async def body() -> AsyncIterator[bytes]:
            yield b"first;"
            await insert(db, name + "-streamed")
            yield ",".join(await names(db)).encode()

        return StreamingResponse(body(), status_code=201)

    async def slow(request: Request) -> Response:
        await insert(db, request.path_params["name"])
        probe.slow_started.set()
        await anyio.sleep(30)
        return PlainTextResponse("too late", status_code=201)  # pragma: no cover

    async def socket(websocket: WebSocket) -> None:
        # Never committed for the app: "add:<name>" commits by hand.
        await websocket.accept()
        async for text in websocket.iter_text():
            if text.startswith("add:"):
                await insert(db, text.removeprefix("add:"))
                await resolve(db.session.commit())
            await websocket.send_json(await names(db))

    async def runtime_error(request: Request, exc: Exception) -> Response:
        # Shows the message of an error about turns (or any RuntimeError) to the test.
        return PlainTextResponse(f"RuntimeError: {exc}", status_code=500)

    app = Starlette(
        routes=[
            Route("/items", listing),
            Route("/items/{name}", create, methods=["POST"]),
            Route("/unflushed/{name}", unflushed, methods=["POST"]),
            Route("/swallow/{name}", swallow, methods=["POST"]),
            Route("/commit-then-conflict/{name}", commit_then_conflict, methods=["POST"]),
            Route("/rollback-then-create/{name}", rollback_then_create, methods=["POST"]),
            Route("/nested/{name}", nested, methods=["POST"]),
            Route("/sync/items", listing_sync),
            Route("/sync/items/{name}", create_sync, methods=["POST"]),
            Route("/sync/nested/{name}", nested_sync, methods=["POST"]),
            Route("/background/{name}", background, methods=["POST"]),
            Route("/stream/{name}", stream, methods=["POST"]),
            Route("/slow/{name}", slow, methods=["POST"]),
            WebSocketRoute("/ws", socket),
        ],
        exception_handlers={RuntimeError: runtime_error},
    )
    app.add_middleware(SessionMiddleware, db=db)
    return app


def fastapi_app(db: Database[Any]) -> FastAPI:
    """The session through ``Depends(session_dependency(db))``, in async and def endpoints."""
    app = FastAPI()
    app.add_middleware(SessionMiddleware, db=db)
    current = Depends(session_dependency(db))

    @app.post("/items/{name}", status_code=201)
    async def create(name: str, session: Any = current) -> dict[str, str]:
        session.add(Item(name=name))
        await resolve(session.flush())
        if name.startswith("taken"):
            raise HTTPException(409, "taken")
        return {"created": name}

    @app.get("/items")
    async def listing(session: Any = current) -> list[str]:
        result = await resolve(session.execute(sa.select(Item.name).order_by(Item.id)))
        return list(result.scalars())

    if not db.is_async:

        @app.post("/sync/items/{name}", status_code=201)
        def create_sync(name: str, session: Any = current) -> dict[str, bool]:
            session.add(Item(name=name))
            session.flush()
            return {"same": session is db.session()}

    return app


# -- helpers ------------------------------------------------------------------------------


def http(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)


@asynccontextmanager
async def isolate(db: Database[Any], **options: Any) -> AsyncIterator[Isolation]:
    """``with isolated(db)`` for a sync driver, ``async with`` for an async one."""
    if db.is_async:
        async with isolated(db, **options) as isolation:
            yield isolation
    else:
        with isolated(db, **options) as isolation:
            yield isolation


async def own_unit_adds(db: Database[Any], name: str) -> None:
    """The test's own code writing in a ``db.begin()`` block between requests."""
    if db.is_async:
        async with db.begin() as session:
            session.add(Item(name=name))
    else:
        with db.begin() as session:
            session.add(Item(name=name))


async def own_unit_reads(db: Database[Any]) -> list[str]:
    """The test's own code reading in a ``db.begin()`` block."""
    statement = sa.select(Item.name).order_by(Item.id)
    if db.is_async:
        async with db.begin() as session:
            assert isinstance(session, AsyncSession)
            return list(await session.scalars(statement))
    with db.begin() as session:
        assert isinstance(session, Session)
        return list(session.scalars(statement))


class Socket:
    """A websocket connection driven by hand (httpx has no websocket support)."""

    def __init__(self) -> None:
        self.to_app, self.app_receives = anyio.create_memory_object_stream[Message](100)
        self.app_sends, self.from_app = anyio.create_memory_object_stream[Message](100)

    async def ask(self, text: str) -> Any:
        await self.to_app.send({"type": "websocket.receive", "text": text})
        with anyio.fail_after(10):
            message = await self.from_app.receive()
        assert message["type"] == "websocket.send", message
        return json.loads(message["text"])


@asynccontextmanager
async def websocket(app: Any, path: str) -> AsyncIterator[Socket]:
    """Connect to ``path``; on leaving, disconnect and wait until the app is done with it."""
    socket = Socket()
    scope = {"type": "websocket", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [], "scheme": "ws", "root_path": "", "subprotocols": [],
             "asgi": {"version": "3.0"}}  # fmt: skip
    with socket.to_app, socket.app_receives, socket.app_sends, socket.from_app:
        async with anyio.create_task_group() as group:
            group.start_soon(app, scope, socket.app_receives.receive, socket.app_sends.send)
            await socket.to_app.send({"type": "websocket.connect"})
            with anyio.fail_after(10):
                assert (await socket.from_app.receive())["type"] == "websocket.accept"
            try:
                yield socket
            finally:
                await socket.to_app.send({"type": "websocket.disconnect", "code": 1000})


@contextmanager
def nothing_seen_outside(rows: Rows) -> Iterator[None]:
    """Around a block of requests: no other connection sees any row, then or after."""
    assert rows() == []
    yield
    assert rows() == [], "another connection saw a row of the isolated test"


# -- httpx.AsyncClient + ASGITransport, every backend ----------------------------------------


async def test_requests_keep_what_they_commit_and_the_block_stores_nothing(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """A 201's row is read by the next request, a 409's, a failed commit's, a caught failed
    statement's and the part after an explicit commit are not, the transaction survives
    each of them, and no other connection ever sees a row."""
    db = make_db()
    app = starlette_app(db, Probe())
    async with isolate(db), http(app) as client:
        with nothing_seen_outside(rows):
            assert (await client.post("/items/a")).status_code == 201
            assert (await client.get("/items")).json() == ["a"]

            assert (await client.post("/items/conflict?status=409")).status_code == 409
            assert (await client.get("/items")).json() == ["a"]

            # A duplicate that only the commit's flush finds: 500, and the outer
            # transaction is still usable for reads and writes.
            failed = await client.post("/unflushed/a")
            assert (failed.status_code, failed.text) == (500, "Internal Server Error")
            assert (await client.get("/items")).json() == ["a"]
            assert (await client.post("/items/after-failed-commit")).status_code == 201

            # A failed statement the app caught without a rollback never commits.
            swallowed = await client.post("/swallow/swallowed")
            assert (swallowed.status_code, swallowed.text) == (500, "Internal Server Error")
            assert (await client.post("/items/after-swallowed")).status_code == 201

            assert (await client.post("/commit-then-conflict/committed")).status_code == 409
            assert (await client.post("/rollback-then-create/created")).status_code == 201
            assert (await client.get("/items")).json() == [
                "a",
                "after-failed-commit",
                "after-swallowed",
                "committed",
                "created",
            ]
    assert rows() == []
    assert db.units.isolation is None
    assert_no_leaks(db, backend)
    # Outside the block the app commits for real again.
    async with http(app) as client:
        assert (await client.post("/items/real")).status_code == 201
    assert rows() == ["real"]


async def test_threads_nested_units_and_the_tests_own_units_share_the_data(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """A def endpoint (worker thread), the test's own db.begin() blocks between requests and
    a db.begin() nested in a request all see each other's rows; the nested block does not
    wait for its request, and a request that fails takes its nested block's rows along."""
    db = make_db()
    app = starlette_app(db, Probe())
    prefix = "/items" if db.is_async else "/sync/items"
    async with isolate(db, wait=5), http(app) as client:
        with nothing_seen_outside(rows), anyio.fail_after(20):
            assert (await client.post(f"{prefix}/endpoint")).status_code == 201
            await own_unit_adds(db, "test")
            assert (await client.get(prefix)).json() == ["endpoint", "test"]

            response = await client.post("/nested/request")
            assert response.status_code == 201
            assert response.json() == ["endpoint", "test", "request", "request-nested"]
            if not db.is_async:
                response = await client.post("/sync/nested/thread")
                assert response.status_code == 201
                assert response.json()[-2:] == ["thread", "thread-nested"]

            # The nested block committed into its request's SAVEPOINT: a 409 drops both.
            assert (await client.post("/nested/dropped?status=409")).status_code == 409
            expected = ["endpoint", "test", "request", "request-nested"]
            if not db.is_async:
                expected += ["thread", "thread-nested"]
            assert await own_unit_reads(db) == expected
            assert (await client.get("/items")).json() == expected
    assert rows() == []
    assert_no_leaks(db, backend)


async def post_all(client: httpx.AsyncClient, path: str, names: list[str]) -> dict[str, str]:
    """POST ``path/<name>`` for every name at once: each one's status and the start of its body."""
    answers: dict[str, str] = {}

    async def post(name: str) -> None:
        response = await client.post(f"{path}/{name}")
        answers[name] = f"{response.status_code} {response.text[:400]}"

    async with anyio.create_task_group() as group:
        for name in names:
            group.start_soon(post, name)
    return answers


async def test_concurrent_requests_take_turns(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """Ten concurrent POSTs all answer 201, serialized on the shared connection (async
    endpoints with an async driver, def endpoints with a sync one: they wait in their
    worker threads), all ten rows are read back, and none is stored."""
    db = make_db()
    app = starlette_app(db, Probe())
    wanted = [f"concurrent-{i}" for i in range(10)]
    prefix = "/items" if db.is_async else "/sync/items"
    async with isolate(db), http(app) as client:
        with nothing_seen_outside(rows), anyio.fail_after(30):
            answers = await post_all(client, prefix, wanted)
            assert {name: answer[:3] for name, answer in answers.items()} == dict.fromkeys(
                wanted, "201"
            ), answers
            assert sorted((await client.get("/items")).json()) == wanted
    assert rows() == []
    assert_no_leaks(db, backend)


@pytest.mark.parametrize("backend", SYNC, indirect=True)
async def test_concurrent_async_endpoints_on_a_sync_driver_fail_at_once(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """With a sync driver, an async endpoint that finds the connection taken cannot wait on
    the event loop (the unit that has it needs that loop to end): it fails at once, not
    after ``wait`` seconds, with a message that says what to do; the others store their
    rows, and the transaction goes on."""
    db = make_db()
    app = starlette_app(db, Probe())
    wanted = [f"concurrent-{i}" for i in range(10)]
    async with isolate(db, wait=30), http(app) as client:
        with nothing_seen_outside(rows), anyio.fail_after(10):
            answers = await post_all(client, "/items", wanted)
            stored = sorted(name for name, answer in answers.items() if answer.startswith("201"))
            refused = {name: answer for name, answer in answers.items() if name not in stored}
            assert stored, answers
            for answer in refused.values():
                assert answer.startswith("500 RuntimeError: Inside isolated()"), answer
                assert ON_THE_LOOP in answer
            assert sorted((await client.get("/items")).json()) == stored
            assert (await client.post("/items/after")).status_code == 201
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_work_after_the_response_streams_and_websockets(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """Background tasks and a streaming body write rows the next request reads; a websocket
    reads them and commits by hand; while a socket that used the database is open a request
    fails with the error about turns, and once it is closed requests work again."""
    db = make_db()
    app = starlette_app(db, Probe())
    prefix = "/items" if db.is_async else "/sync/items"
    async with isolate(db, wait=0.5), http(app) as client:
        with nothing_seen_outside(rows), anyio.fail_after(30):
            assert (await client.post("/background/task")).status_code == 201
            after_tasks = ["task", "task-later"] + ([] if db.is_async else ["task-thread"])
            assert (await client.get("/items")).json() == after_tasks

            streamed = await client.post("/stream/body")
            assert streamed.status_code == 201
            everything = [*after_tasks, "body", "body-streamed"]
            assert streamed.text == "first;" + ",".join(everything)
            assert (await client.get("/items")).json() == everything

            async with websocket(app, "/ws") as socket:
                assert await socket.ask("names") == everything
                assert await socket.ask("add:socket") == [*everything, "socket"]
                # The socket's unit still has the connection: a request waits 0.5 s for it
                # (a def endpoint with a sync driver waits in its worker thread).
                blocked = await client.post(f"{prefix}/blocked")
                assert blocked.status_code == 500
                assert "RuntimeError: Inside isolated()" in blocked.text
                assert "take turns: this one waited 0.5 s for <Unit" in blocked.text
                if not db.is_async:
                    # An async endpoint with a sync driver cannot wait on the event loop.
                    blocked = await client.post("/items/blocked")
                    assert blocked.status_code == 500
                    assert ON_THE_LOOP in blocked.text
            assert (await client.post("/items/after-socket")).status_code == 201
            assert (await client.get("/items")).json() == [
                *everything,
                "socket",
                "after-socket",
            ]
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_after_commit_callbacks_are_recorded_and_run_or_only_recorded(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """isolation.callbacks holds the callback of a 201 request and not that of a 409; they
    run as after a commit by default, and with run_callbacks=False are only recorded."""
    db = make_db()
    probe = Probe()
    app = starlette_app(db, probe)
    async with isolate(db) as isolation, http(app) as client:
        assert (await client.post("/items/kept")).status_code == 201
        assert (await client.post("/items/dropped?status=409")).status_code == 409
        assert probe.ran == ["kept"]
        assert len(isolation.callbacks) == 1
        isolation.callbacks[0]()
        assert probe.ran == ["kept", "kept"]
    probe.ran.clear()
    async with isolate(db, run_callbacks=False) as isolation, http(app) as client:
        assert (await client.post("/items/recorded")).status_code == 201
        assert (await client.post("/items/dropped?status=409")).status_code == 409
        assert probe.ran == []
        assert len(isolation.callbacks) == 1
        isolation.callbacks[0]()
        assert probe.ran == ["recorded"]
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_fastapi_dependency_test_a_then_test_b(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """FastAPI with Depends(session_dependency(db)): test A's rows are read back within A,
    and test B starts from the same empty table (A's unique name is free again)."""
    db = make_db()
    app = fastapi_app(db)
    async with http(app) as client:
        async with isolate(db):  # test A
            with nothing_seen_outside(rows):
                assert (await client.post("/items/apple")).status_code == 201
                if not db.is_async:
                    response = await client.post("/sync/items/pear")
                    assert (response.status_code, response.json()) == (201, {"same": True})
                assert (await client.post("/items/taken")).status_code == 409
                assert (await client.get("/items")).json() == (
                    ["apple"] if db.is_async else ["apple", "pear"]
                )
        async with isolate(db):  # test B
            with nothing_seen_outside(rows):
                assert (await client.get("/items")).json() == []
                assert (await client.post("/items/apple")).status_code == 201
                assert (await client.get("/items")).json() == ["apple"]
    assert rows() == []
    assert_no_leaks(db, backend)


async def test_a_failing_or_cancelled_test_still_rolls_back(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """A test body that raises, and one cancelled while a request holds the connection,
    still roll everything back and give the connection back."""
    db = make_db()
    probe = Probe()
    app = starlette_app(db, probe)

    async def failing_test() -> None:
        async with isolate(db), http(app) as client:
            assert (await client.post("/items/raised")).status_code == 201
            1 / 0  # noqa: B018

    with pytest.raises(ZeroDivisionError):
        await failing_test()
    assert rows() == []
    assert db.units.isolation is None
    assert_no_leaks(db, backend)

    with anyio.fail_after(20), anyio.CancelScope() as scope:
        async with isolate(db), http(app) as client:
            assert (await client.post("/items/before-cancel")).status_code == 201
            async with anyio.create_task_group() as group:
                group.start_soon(client.post, "/slow/cancelled")
                assert await anyio.to_thread.run_sync(probe.slow_started.wait, 10)
                scope.cancel()
    assert scope.cancelled_caught
    assert rows() == []
    assert db.units.isolation is None
    assert_no_leaks(db, backend)
    # The next test's block starts from an empty table and works.
    async with isolate(db), http(app) as client:
        assert (await client.get("/items")).json() == []
        assert (await client.post("/items/before-cancel")).status_code == 201
    assert rows() == []
    assert_no_leaks(db, backend)


# -- Starlette's TestClient, sync databases ----------------------------------------------------


@pytest.mark.filterwarnings(TESTCLIENT_WARNING)
@pytest.mark.parametrize("backend", SYNC, indirect=True)
def test_test_client_on_a_sync_database(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """Through TestClient (the app on its own thread and loop): every case of the httpx
    tests, and a websocket holding the connection fails a request until it closes."""
    from starlette.testclient import TestClient

    db = make_db()
    probe = Probe()
    app = starlette_app(db, probe)
    with TestClient(app, raise_server_exceptions=False) as client:
        with isolated(db, wait=0.5) as isolation, nothing_seen_outside(rows):
            assert client.post("/items/a").status_code == 201
            assert client.get("/items").json() == ["a"]
            assert client.post("/items/conflict?status=409").status_code == 409
            assert client.post("/unflushed/a").status_code == 500
            assert client.post("/swallow/swallowed").status_code == 500
            assert client.post("/commit-then-conflict/committed").status_code == 409
            assert client.post("/rollback-then-create/created").status_code == 201
            expected = ["a", "committed", "created"]
            assert client.get("/items").json() == expected
            assert probe.ran == ["a"]
            assert len(isolation.callbacks) == 1

            # A def endpoint, the test's own units, nested units.
            assert client.post("/sync/items/thread").status_code == 201
            with db.begin() as session:
                session.add(Item(name="test"))
            nested = client.post("/nested/request")
            assert nested.json()[-2:] == ["request", "request-nested"]
            assert client.post("/sync/nested/def").json()[-2:] == ["def", "def-nested"]
            expected += ["thread", "test", "request", "request-nested", "def", "def-nested"]
            with db.begin() as session:
                assert isinstance(session, Session)
                assert list(session.scalars(sa.select(Item.name).order_by(Item.id))) == expected

            # Work after the response, a streaming body.
            assert client.post("/background/task").status_code == 201
            expected += ["task", "task-later", "task-thread"]
            streamed = client.post("/stream/body")
            expected += ["body", "body-streamed"]
            assert (streamed.status_code, streamed.text) == (201, "first;" + ",".join(expected))
            assert client.get("/sync/items").json() == expected

            # A websocket reads the rows; open, it holds the connection.
            with client.websocket_connect("/ws") as socket:
                socket.send_text("names")
                assert socket.receive_json() == expected
                socket.send_text("add:socket")
                assert socket.receive_json() == [*expected, "socket"]
                blocked = client.post("/sync/items/blocked")
                assert blocked.status_code == 500
                assert "take turns: this one waited 0.5 s for <Unit" in blocked.text
                blocked = client.post("/items/blocked")
                assert blocked.status_code == 500
                assert ON_THE_LOOP in blocked.text
            assert client.post("/items/after-socket").status_code == 201
            assert client.get("/items").json() == [*expected, "socket", "after-socket"]
        assert rows() == []
        # The next test: the same empty table.
        with isolated(db), nothing_seen_outside(rows):
            assert client.get("/items").json() == []
            assert client.post("/items/a").status_code == 201
    assert rows() == []
    assert_no_leaks(db, backend)


@pytest.mark.filterwarnings(TESTCLIENT_WARNING)
@pytest.mark.parametrize("backend", SYNC, indirect=True)
def test_test_client_of_a_fastapi_app_started_inside_the_block(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """FastAPI's TestClient entered inside isolated() (its lifespan disposes the engine at
    shutdown while the block still holds its connection): rows are read back, a 409 is
    dropped, and nothing is stored or leaked."""
    from fastapi.testclient import TestClient

    db = make_db()
    app = fastapi_app(db)
    with (
        isolated(db),
        nothing_seen_outside(rows),
        TestClient(app, raise_server_exceptions=False) as client,
    ):
        assert client.post("/items/apple").status_code == 201
        assert client.post("/sync/items/pear").json() == {"same": True}
        assert client.post("/items/taken").status_code == 409
        assert client.get("/items").json() == ["apple", "pear"]
    assert rows() == []
    assert_no_leaks(db, backend)


# -- the sync form on an async database ---------------------------------------------------


@pytest.mark.parametrize("backend", ASYNC, indirect=True)
async def test_sync_form_on_an_async_database_says_what_to_use(
    make_db: DatabaseFactory, rows: Rows, backend: Backend
) -> None:
    """``with isolated(db)`` on an async driver raises a TypeError naming ``async with`` and
    the client to use instead of TestClient, and installs nothing."""
    db = make_db()
    with pytest.raises(TypeError) as raised, isolated(db):
        pass  # pragma: no cover
    message = str(raised.value)
    assert "uses an async driver: use 'async with isolated(db):' in an async test" in message
    assert "httpx.AsyncClient(transport=httpx.ASGITransport(app))" in message
    assert "Starlette's 'TestClient' runs the app on an event loop of its own" in message
    assert db.units.isolation is None
    app = starlette_app(db, Probe())
    async with isolated(db), http(app) as client:
        assert (await client.post("/items/a")).status_code == 201
        assert (await client.get("/items")).json() == ["a"]
    assert rows() == []
    assert_no_leaks(db, backend)
