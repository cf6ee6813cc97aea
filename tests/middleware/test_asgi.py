"""SessionMiddleware: the request's unit of work, driven through raw ASGI calls.

Every test runs on SQLite, PostgreSQL and MariaDB, with sync and async drivers, and the
``make_db`` fixture checks afterwards that the pool has every connection back, no unit is
open and the registry is empty.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from sessionscope import Database, SessionMiddleware
from sessionscope._types import Message

from .._models import Child, Item
from ..conftest import Backend, DatabaseFactory, backend_params
from ._asgi_apps import build_app, insert, resolve
from ._driver import Exchange, call

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def count_checkouts(db: Database[Any]) -> list[int]:
    """A counter of pool checkouts, read as ``counter[0]``."""
    counter = [0]

    def on_checkout(*args: Any) -> None:
        counter[0] += 1

    event.listen(db.sync_engine, "checkout", on_checkout)
    return counter


@pytest.mark.parametrize("status", [200, 201, 303])
async def test_success_and_redirect_commit(
    make_db: DatabaseFactory, rows: Callable[[], list[str]], status: int
) -> None:
    """2xx answers and a 303 after a POST store what the request wrote."""
    db = make_db()
    async with client(build_app(db)) as http:
        response = await http.post(f"/items/a?status={status}", follow_redirects=False)
    assert response.status_code == status
    assert rows() == ["a"]


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/http-error/a?status=404", 404),
        ("/http-error/a?status=409", 409),
        ("/http-error/a?status=422", 422),
        ("/items/a?status=400", 400),
        ("/value-error/a", 500),
        ("/crash/a", 500),
    ],
)
async def test_error_responses_roll_back(
    make_db: DatabaseFactory, rows: Callable[[], list[str]], target: str, status: int
) -> None:
    """Handled HTTP errors, returned 4xx and unhandled exceptions all roll back."""
    db = make_db()
    async with client(build_app(db)) as http:
        response = await http.post(target)
    assert response.status_code == status
    assert rows() == []


async def test_commit_predicate_is_configurable(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A predicate can make redirects roll back, or commit a chosen error status."""
    db = make_db()
    app = build_app(db, commit_on=lambda status: status < 300 or status == 409)
    async with client(app) as http:
        await http.post("/items/redirected?status=303", follow_redirects=False)
        await http.post("/http-error/conflict?status=409")
    assert rows() == ["conflict"]


async def test_commit_finishes_before_the_status_is_forwarded(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """When the status line leaves, the row is already visible to other connections."""
    db = make_db()
    seen_at_start: list[list[str]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen_at_start.append(await anyio.to_thread.run_sync(rows))

    exchange = await call(build_app(db), "POST", "/items/a", on_send=on_send)
    assert exchange.status == 200
    assert seen_at_start == [["a"]]


async def test_failed_commit_answers_500_and_nothing_else(
    make_db: DatabaseFactory, checker: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A COMMIT the database refuses gives a complete 500, never the app's 2xx."""
    db = make_db()
    with caplog.at_level(logging.ERROR, logger="sessionscope"):
        exchange = await call(build_app(db), "POST", "/orphan")
    assert [m["type"] for m in exchange.sent] == ["http.response.start", "http.response.body"]
    assert exchange.status == 500
    assert exchange.body == b"Internal Server Error"
    with checker.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(Child)) == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


async def test_connection_is_clean_after_a_failed_commit(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """The next requests on the very connection whose COMMIT failed store their rows."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0})
    async with client(build_app(db)) as http:
        assert (await http.post("/orphan")).status_code == 500
        for i in range(5):
            assert (await http.post(f"/items/after-{i}")).status_code == 200
    assert rows() == [f"after-{i}" for i in range(5)]


async def test_on_commit_error_hook_gives_the_response(make_db: DatabaseFactory) -> None:
    """The hook maps a failed commit to the response of its choice."""
    db = make_db()
    errors: list[BaseException] = []

    def on_commit_error(error: BaseException) -> Response:
        errors.append(error)
        return PlainTextResponse("try again later", status_code=503)

    async with client(build_app(db, on_commit_error=on_commit_error)) as http:
        response = await http.post("/orphan")
    assert (response.status_code, response.text) == (503, "try again later")
    assert isinstance(errors[0], sa.exc.IntegrityError)


async def test_rollback_only_vetoes_a_success(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A unit marked rollback-only rolls back although the status says success."""
    db = make_db()
    async with client(build_app(db)) as http:
        assert (await http.post("/veto/a")).status_code == 200
    assert rows() == []


async def test_raw_sql_and_bulk_statements_are_committed(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """Writes the ORM does not track as dirty are committed all the same."""
    db = make_db()
    async with client(build_app(db)) as http:
        assert (await http.post("/raw-sql/a")).status_code == 200
    assert sorted(rows()) == ["a-bulk", "a-upd"]


async def test_route_without_session_costs_nothing(make_db: DatabaseFactory) -> None:
    """A route that never touches db.session creates no session and checks out nothing."""
    db = make_db()
    checkouts = count_checkouts(db)
    created: list[object] = []
    event.listen(db.sync_engine, "connect", lambda *a: created.append(a))
    async with client(build_app(db)) as http:
        for _ in range(5):
            assert (await http.get("/noop")).text == "noop"
    assert checkouts[0] == 0
    assert created == []


async def test_stream_reads_and_commits_its_writes(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """The session stays usable in the body, and writes made there are stored."""
    db = make_db()
    async with client(build_app(db)) as http:
        response = await http.post("/stream/a")
    assert response.text == "first;a;last"
    assert rows() == ["a", "a-streamed"]


@pytest.mark.parametrize(("status", "stored"), [(200, True), (400, False)])
async def test_stream_that_first_uses_the_session_in_its_body_is_settled_by_its_status(
    make_db: DatabaseFactory, rows: Callable[[], list[str]], status: int, stored: bool
) -> None:
    """A request's unit opens on the first use of db.session, here in the body after the
    start went out; what the body wrote is committed or rolled back by the status.
    """
    db = make_db()
    async with client(build_app(db)) as http:
        response = await http.post(f"/stream-late/late?status={status}")
    assert response.status_code == status
    assert response.text == "units before:0;units during:1;last"
    assert rows() == (["late"] if stored else [])


async def test_disconnect_in_a_stream_that_opened_the_unit_rolls_it_back(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    exchange = Exchange()
    seen: list[bytes] = []

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            seen.append(message["body"])
            if len(seen) == 2:  # the body has written: the client goes away
                exchange.disconnect.set()
                await anyio.sleep(0.01)

    await call(build_app(db), "POST", "/stream-late/gone", exchange, on_send=on_send)
    assert seen[1] == b"units during:1;"
    assert not exchange.complete
    assert rows() == []


async def test_failed_commit_at_end_of_stream_withholds_the_last_chunk(
    make_db: DatabaseFactory, checker: sa.Engine
) -> None:
    """A stream whose writes cannot be committed never looks complete to the client."""
    db = make_db()
    exchange = Exchange()
    with pytest.raises(sa.exc.IntegrityError):
        await call(build_app(db), "POST", "/stream-orphan", exchange)
    assert exchange.status == 200
    assert exchange.body == b"first;last"  # the final, empty message is what is withheld
    assert not exchange.complete
    with checker.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(Child)) == 0


async def test_disconnect_mid_stream_rolls_back_and_returns_the_connection(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A client gone after the first chunk costs no connection, 20 times over one slot."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    app = build_app(db)
    for i in range(20):
        exchange = Exchange()

        async def on_send(message: Message, exchange: Exchange = exchange) -> None:
            if message["type"] == "http.response.body":
                exchange.disconnect.set()
                await anyio.sleep(0.01)

        await call(app, "POST", f"/stream/s{i}", exchange, on_send=on_send)
        assert not exchange.complete
        assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert db.live_sessions == 0
    # What was written before the response started is committed; the stream's are not.
    assert rows() == [f"s{i}" for i in range(20)]


async def test_background_work_runs_after_the_connection_is_back(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """Background tasks start with the pool full, on a fresh unit of their own."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    release = anyio.Event()
    parked = anyio.Event()
    observed: dict[str, Any] = {}

    async def endpoint(request: Request) -> Response:
        await insert(db, "request")
        request_session = db.session()

        async def later() -> None:
            observed["checked_out"] = db.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            parked.set()
            await release.wait()
            observed["fresh"] = db.session() is not request_session
            await insert(db, "later")

        return PlainTextResponse("accepted", background=BackgroundTask(later))

    app = build_app(db)
    app.router.routes.insert(0, Route("/parked", endpoint, methods=["POST"]))
    async with anyio.create_task_group() as tg:
        first = Exchange()
        tg.start_soon(call, app, "POST", "/parked", first)
        await parked.wait()
        # The only connection is free while the background task is parked.
        async with client(app) as http:
            assert (await http.post("/items/meanwhile")).status_code == 200
        release.set()
    assert first.status == 200
    assert observed == {"checked_out": 0, "fresh": True}
    assert rows() == ["request", "meanwhile", "later"]


async def test_failed_background_work_rolls_back_only_itself(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A background task that raises loses its own writes, not the request's."""
    db = make_db()

    async def endpoint(request: Request) -> Response:
        await insert(db, "request")

        async def later() -> None:
            await insert(db, "later")
            raise RuntimeError("background work failed")

        return PlainTextResponse("accepted", background=BackgroundTask(later))

    app = build_app(db)
    app.router.routes.insert(0, Route("/failing-later", endpoint, methods=["POST"]))
    with pytest.raises(RuntimeError, match="background work failed"):
        await call(app, "POST", "/failing-later")
    assert rows() == ["request"]


async def test_session_used_after_the_request_ended_raises(make_db: DatabaseFactory) -> None:
    """Work that outlives the request gets a clear error, never an orphan session."""
    db = make_db()
    outcome: list[BaseException] = []
    done = anyio.Event()

    async def endpoint(request: Request) -> Response:
        async def outlive() -> None:
            await asyncio.sleep(0.05)
            try:
                db.session()
            except RuntimeError as exc:
                outcome.append(exc)
            done.set()

        request.app.state.task = asyncio.ensure_future(outlive())
        return PlainTextResponse("ok")

    app = build_app(db)
    app.router.routes.insert(0, Route("/spawn", endpoint))
    await call(app, "GET", "/spawn")
    await done.wait()
    assert "already finished" in str(outcome[0])


@pytest.mark.parametrize(
    ("backend", "how"),
    [
        pytest.param(("sqlite", "async"), "task.cancel", id="sqlite-async-task.cancel"),
        # Not aiosqlite under an anyio cancel scope: SQLAlchemy's aiosqlite adapter then
        # leaves its graceful-close task pending, which hangs the event loop (upstream).
        *[
            pytest.param((name, "async"), how, id=f"{name}-async-{how}")
            for name in ("postgresql", "mariadb")
            for how in ("task.cancel", "cancel scope")
        ],
    ],
    indirect=["backend"],
)
async def test_cancelled_request_returns_its_connection(
    make_db: DatabaseFactory, backend: Backend, how: str
) -> None:
    """Cancelling a request mid-query never costs the pool its only connection."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5})
    started = anyio.Event()
    slow = {
        "postgresql": "SELECT pg_sleep(2)",
        "mariadb": "SELECT SLEEP(2)",
    }.get(
        backend.name,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000)"
        " SELECT count(*) FROM c",
    )

    async def endpoint(request: Request) -> Response:
        if backend.name != "sqlite":
            # Not on SQLite: a cancelled aiosqlite query that followed a write leaves the
            # file locked until the driver's thread finishes the query (an upstream issue).
            await insert(db, "cancelled")
        started.set()
        await db.session.execute(sa.text(slow))
        return PlainTextResponse("never")

    app = build_app(db)
    app.router.routes.insert(0, Route("/slow", endpoint))
    for _ in range(3):
        started = anyio.Event()
        if how == "task.cancel":
            task = asyncio.ensure_future(call(app, "GET", "/slow"))
            await started.wait()
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, app, "GET", "/slow")
                    await started.wait()
                    await anyio.sleep(0.1)
                    scope.cancel()
        assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert db.live_units == 0
        with anyio.fail_after(5):
            exchange = await call(app, "POST", "/items/next")
        assert exchange.status == 200
        async with db.begin() as session:
            await session.execute(sa.delete(Item))


async def test_websocket_unit_is_never_committed_for_you(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A socket's writes are stored only if the app commits them itself."""
    db = make_db()

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await insert(db, "explicit")
        await resolve(db.session.commit())
        await insert(db, "implicit")
        await websocket.send_text("bye")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", socket)])
    app.add_middleware(SessionMiddleware, db=db)
    sent: list[Message] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop()
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"",
             "headers": [], "scheme": "ws", "root_path": "", "subprotocols": []}  # fmt: skip
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert rows() == ["explicit"]


async def test_lifespan_shutdown_disposes_the_engine(make_db: DatabaseFactory) -> None:
    """At shutdown the pooled connections of the database's own engine are closed."""
    db = make_db()
    app = build_app(db)
    async with client(app) as http:
        await http.post("/items/a")
    assert db.sync_engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert db.sync_engine.pool.checkedin() == 0  # type: ignore[attr-defined]


async def test_middleware_twice_for_one_database_is_refused(make_db: DatabaseFactory) -> None:
    """Two middlewares for one database would fight over the unit: say so."""
    db = make_db()
    app = build_app(db)
    app.add_middleware(SessionMiddleware, db=db)
    with pytest.raises(RuntimeError, match="installed twice"):
        await call(app, "GET", "/noop")


async def test_two_databases_side_by_side(
    make_db: DatabaseFactory, rows: Callable[[], list[str]], tmp_path: Any
) -> None:
    """Two middlewares for two databases give each request one session per database."""
    db = make_db()
    other: Database[Any] = Database(f"sqlite:///{tmp_path / 'other.sqlite3'}")
    with other.begin() as session:
        session.execute(sa.text("CREATE TABLE notes (text VARCHAR(20))"))

    async def endpoint(request: Request) -> Response:
        await insert(db, "main")
        other.session.execute(sa.text("INSERT INTO notes VALUES ('other')"))
        return PlainTextResponse("ok")

    app = build_app(db)
    app.router.routes.insert(0, Route("/both", endpoint, methods=["POST"]))
    app.add_middleware(SessionMiddleware, db=other)
    async with client(app) as http:
        assert (await http.post("/both")).status_code == 200
    assert rows() == ["main"]
    with other.begin() as session:
        assert session.execute(sa.text("SELECT text FROM notes")).scalars().all() == ["other"]
    assert (other.live_units, other.live_sessions) == (0, 0)
    other.dispose()


async def test_pathsend_is_forwarded_after_the_commit(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A file response's pathsend leaves only once the unit is committed."""
    db = make_db()
    seen: list[tuple[str, list[str]]] = []

    async def endpoint(request: Request) -> Response:
        await insert(db, "file")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.pathsend", "path": "/dev/null"})

        return app  # type: ignore[return-value]

    async def on_send(message: Message) -> None:
        seen.append((message["type"], await anyio.to_thread.run_sync(rows)))

    app = build_app(db)
    app.router.routes.insert(0, Route("/file", endpoint))
    await call(app, "GET", "/file", on_send=on_send)
    assert seen == [("http.response.start", ["file"]), ("http.response.pathsend", ["file"])]


async def test_sessions_differ_between_requests(make_db: DatabaseFactory) -> None:
    """Each request gets its own session object, even one after the other."""
    db = make_db()
    identities: list[object] = []

    async def endpoint(request: Request) -> Response:
        session = db.session()
        identities.append(session)
        session.info["request"] = len(identities)
        await anyio.sleep(0.01)
        return PlainTextResponse(str(db.session.info["request"]))

    app = build_app(db)
    app.router.routes.insert(0, Route("/who", endpoint))
    async with client(app) as http:
        answers = [(await http.get("/who")).text for _ in range(3)]
    assert answers == ["1", "2", "3"]
    assert all(a is not b for i, a in enumerate(identities) for b in identities[i + 1 :])


async def test_concurrent_requests_see_only_their_own_session(make_db: DatabaseFactory) -> None:
    """50 interleaved requests each read back only their own marker and pending object."""
    db = make_db()

    async def endpoint(request: Request) -> Response:
        marker = request.path_params["marker"]
        db.session.info["marker"] = marker
        db.session.add(Item(name=marker))
        await anyio.sleep(0.02)
        pending = [obj.name for obj in db.session.new]
        db.set_rollback_only()
        return PlainTextResponse(f"{db.session.info['marker']}:{','.join(pending)}")

    app = build_app(db)
    app.router.routes.insert(0, Route("/marker/{marker}", endpoint))
    results: dict[str, str] = {}

    async def one(i: int) -> None:
        exchange = await call(app, "GET", f"/marker/m{i}")
        results[f"m{i}"] = exchange.body.decode()

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
    assert results == {f"m{i}": f"m{i}:m{i}" for i in range(50)}


@pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
async def test_sync_endpoint_shares_the_request_session(
    make_db: DatabaseFactory, rows: Callable[[], list[str]]
) -> None:
    """A def endpoint, run in a worker thread, writes through the request's session."""
    db = make_db()
    async with client(build_app(db)) as http:
        assert (await http.post("/sync/items/threaded")).status_code == 201
    assert rows() == ["threaded"]


@pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
@pytest.mark.parametrize("commit_in_thread", [False, True])
async def test_sync_sessions_end_inline_only_when_they_only_read(
    make_db: DatabaseFactory,
    backend: Backend,
    rows: Callable[[], list[str]],
    commit_in_thread: bool,
) -> None:
    """Only a session that ran nothing but SELECTs on a connection it holds commits on the
    loop (such a COMMIT cannot wait); a flushed or add-only one commits in a worker thread
    (rule 16); ``commit_in_thread`` sends them all to a thread."""
    import threading

    db = make_db()
    loop_thread = threading.get_ident()
    committed_on: list[bool] = []
    event.listen(
        db.sync_engine,
        "commit",
        lambda connection: committed_on.append(threading.get_ident() == loop_thread),
    )
    app = build_app(db, commit_in_thread=commit_in_thread)
    async with client(app) as http:
        assert (await http.get("/items")).status_code == 200
        assert (await http.post("/items/flushed?status=201")).status_code == 201
        assert (await http.post("/add-only/pending")).status_code == 200
        assert (await http.post("/http-error/refused")).status_code == 409
        assert (await http.post("/orphan")).status_code == 500
    assert rows() == ["flushed", "pending"]
    # the read, flushed, pending, and the orphan's COMMIT attempt (add-only, so in a thread);
    # MariaDB refuses the orphan at the flush, before any COMMIT.
    expected = [not commit_in_thread, False, False]
    assert committed_on == expected + ([] if backend.name == "mariadb" else [False])
