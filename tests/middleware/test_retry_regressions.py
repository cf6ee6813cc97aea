"""Regressions of ``SessionMiddleware(retries=N)`` found by review, each a real race on
PostgreSQL (SERIALIZABLE) through a real server:

- two databases, each with its own middleware: the inner one committed at the response
  start, then the outer one's commit lost its race; running the request again would store the
  inner database's row twice;
- a raw ASGI app that catches the error its ``send(start)`` raised after a lost commit race,
  stores a fallback row in ``db.begin()`` and answers itself: the fallback is stored;
- a client that gave up before its request lost a race at the commit (a GET without a body,
  a POST whose body the endpoint never read), under uvicorn and hypercorn: nobody is waiting;
- an app's ``handle_error`` listener on the engine translating the driver's error
  (``raise X from ...``): the lost race is still recognised and run again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware
from sessionscope._types import ASGIApp, Receive, Scope, Send

from .._models import Item
from .._retry import (
    LONG_WAIT,
    Counters,
    counter_table,
    logged,
    lose_race,
    no_connection_out,
)
from .._uvicorn import serve, wait_until
from ..conftest import Backend, DatabaseFactory, backend_params
from .test_asgi_streams import hypercorn_h2c

pytestmark = pytest.mark.anyio

POSTGRESQL = backend_params(["postgresql"], modes=["sync"])

counters = pytest.fixture(counter_table)

NOT_RUN_AGAIN = (
    "Commit failed; the unit of work was rolled back. The request is not run again:"
    " its code stored something since, or its client left."
)


class _Base(DeclarativeBase):
    pass


class Counter(_Base):
    """The counters of ``counter_table``, loaded and dirtied through the ORM."""

    __tablename__ = "retry_counters"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="sessionscope")
    return caplog


@pytest.fixture
def serializable(backend: Backend, make_db: DatabaseFactory, counters: Counters) -> Database[Any]:
    """A PostgreSQL database in SERIALIZABLE, the counters table ready."""
    return make_db(engine_options={"isolation_level": "SERIALIZABLE"})


def names(checker: Engine) -> list[str]:
    with checker.connect() as connection:
        return list(connection.scalars(sa.text("SELECT name FROM items ORDER BY id")))


def dirty_loser(session: Session, checker: Engine, lose: bool) -> None:
    """Load counter 1, let another transaction bump it when ``lose``, then dirty it: the
    flush inside the middleware's commit then fails with 40001."""
    counter = session.get(Counter, 1)
    assert counter is not None
    if lose:
        with checker.begin() as connection:
            connection.execute(sa.text("UPDATE retry_counters SET n = n + 1 WHERE id = 1"))
    counter.n = counter.n + 1000


def retry_lines(logs: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in logged(logs, logging.WARNING) if "lost a race" in m]


def check_clean(*dbs: Database[Any]) -> None:
    for db in dbs:
        no_connection_out(db)
        assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert db.live_units == 0
        assert db.live_sessions == 0


async def one_request(app: ASGIApp, method: str, path: str) -> httpx.Response:
    async with (
        serve(app) as served,
        httpx.AsyncClient(base_url=served.url, timeout=LONG_WAIT) as client,
    ):
        return await client.request(method, path)


# -- two databases, each with its own middleware --------------------------------------------


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
async def test_outer_commit_lost_after_inner_db_committed_is_not_run_again(
    serializable: Database[Any],
    make_db: DatabaseFactory,
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """db2's middleware (inner) commits at the response start, then db1's (outer, retries=2)
    commit loses its race: running the request again would store db2's row twice."""
    db1 = serializable
    db2 = make_db()
    calls: list[int] = []

    def work() -> None:
        attempt = db1.attempt
        calls.append(attempt)
        db2.session.add(Item(name=f"db2 attempt {attempt}"))
        db1.session.add(Item(name=f"db1 attempt {attempt}"))
        dirty_loser(db1.session, checker, lose=attempt == 1)

    async def endpoint(request: Request) -> Response:
        await anyio.to_thread.run_sync(work)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", endpoint, methods=["POST"])])
    app.add_middleware(SessionMiddleware, db=db2)
    app.add_middleware(SessionMiddleware, db=db1, retries=2)
    response = await one_request(app, "POST", "/x")

    assert response.status_code == 500
    assert calls == [1]
    assert names(checker) == ["db2 attempt 1"]
    assert retry_lines(logs) == []
    check_clean(db1, db2)


# -- an app that catches the error of its send(start) ---------------------------------------


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
async def test_app_catching_lost_commit_and_storing_a_fallback_is_not_run_again(
    serializable: Database[Any], checker: Engine, logs: pytest.LogCaptureFixture
) -> None:
    """The commit at the response start loses its race; the app catches the error its
    ``send`` raised, stores a fallback row in ``db.begin()`` and answers itself. That row is
    stored: the request must not run again."""
    db = serializable
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        attempt = db.attempt
        calls.append(attempt)

        def work() -> None:
            db.session.add(Item(name=f"main{attempt}"))
            dirty_loser(db.session, checker, lose=attempt == 1)

        await anyio.to_thread.run_sync(work)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        except Exception:
            with db.begin() as session:
                session.add(Item(name=f"fallback{attempt}"))
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"fallback"})

    response = await one_request(SessionMiddleware(app, db=db, retries=2), "POST", "/x")

    assert response.status_code == 500
    assert calls == [1]
    assert names(checker) == ["fallback1"]
    assert retry_lines(logs) == []
    check_clean(db)


# -- a client that gave up, under uvicorn and hypercorn -------------------------------------


@asynccontextmanager
async def hypercorn_serve(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` with hypercorn (HTTP/1.1 and h2c) in a thread; yield its URL."""
    async with hypercorn_h2c(app) as port:
        yield f"http://127.0.0.1:{port}"


@asynccontextmanager
async def uvicorn_serve(app: ASGIApp) -> AsyncIterator[str]:
    async with serve(app) as served:
        yield served.url


SERVERS: dict[str, Callable[[ASGIApp], Any]] = {
    "uvicorn": uvicorn_serve,
    "hypercorn": hypercorn_serve,
}


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
@pytest.mark.parametrize("case", ["get-without-body", "post-body-unread"])
async def test_client_that_gave_up_before_a_lost_race_is_not_run_again(
    serializable: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
    server: str,
    case: str,
) -> None:
    """The client times out and leaves while the first attempt runs; that attempt then loses
    its race at the commit. Nobody waits for another attempt: none is run, nothing stored."""
    if server == "hypercorn":
        pytest.importorskip("hypercorn")
    db = serializable
    calls: list[int] = []
    client_gone = threading.Event()
    finished = threading.Event()

    async def endpoint(request: Request) -> Response:
        attempt = db.attempt
        calls.append(attempt)
        if attempt == 1:
            assert await anyio.to_thread.run_sync(client_gone.wait, LONG_WAIT)

        def work() -> None:
            db.session.add(Item(name=f"a{attempt}"))
            dirty_loser(db.session, checker, lose=attempt == 1)

        await anyio.to_thread.run_sync(work)
        await anyio.lowlevel.checkpoint()
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/x", endpoint, methods=["POST", "GET"])])
    inner.add_middleware(SessionMiddleware, db=db, retries=2)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await inner(scope, receive, send)
        finally:
            if scope["type"] == "http":
                finished.set()

    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([65 + i]) * 10000
            await anyio.sleep(0.05)

    async with SERVERS[server](app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.4) as client:
            if case == "get-without-body":
                sent = client.build_request("GET", "/x")
            else:
                sent = client.build_request("POST", "/x", content=body())
            with pytest.raises(httpx.TimeoutException):
                await client.send(sent)
        # Let the server see the connection close before the attempt goes on.
        await anyio.sleep(0.3)
        client_gone.set()
        await wait_until(finished.is_set, LONG_WAIT)

    assert calls == [1]
    assert names(checker) == []
    assert retry_lines(logs) == []
    assert logged(logs, logging.ERROR) == [NOT_RUN_AGAIN]
    check_clean(db)


# -- an app's handle_error listener translating the driver's error ---------------------------


class Translated(Exception):
    pass


def translate(context: ExceptionContext) -> None:
    raise Translated("translated") from context.sqlalchemy_exception


@pytest.fixture
def translating(serializable: Database[Any]) -> Iterator[Database[Any]]:
    sa.event.listen(serializable.sync_engine, "handle_error", translate)
    yield serializable
    sa.event.remove(serializable.sync_engine, "handle_error", translate)


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
async def test_lost_race_translated_by_an_engine_handle_error_listener_runs_again(
    translating: Database[Any], checker: Engine, logs: pytest.LogCaptureFixture
) -> None:
    """A ``handle_error`` listener on the engine raises the app's own error from the
    driver's 40001: the lost race is still found (in the cause) and the request runs again,
    its row stored once."""
    db = translating
    calls: list[int] = []

    def work() -> None:
        attempt = db.attempt
        calls.append(attempt)
        db.session.add(Item(name=f"a{attempt}"))
        if attempt == 1:
            lose_race(db.session, checker)

    async def endpoint(request: Request) -> Response:
        await anyio.to_thread.run_sync(work)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", endpoint, methods=["POST"])])
    app.add_middleware(SessionMiddleware, db=db, retries=2)
    response = await one_request(app, "POST", "/x")

    assert (response.status_code, response.text) == (200, "ok")
    assert calls == [1, 2]
    assert names(checker) == ["a2"]
    assert len(retry_lines(logs)) == 1
    check_clean(db)
