"""FastAPI with ``session_dependency`` and ``dispose_on_shutdown``, served by a real uvicorn.

The dependency hands out the request's session, which ``SessionMiddleware`` commits before
the status leaves; these tests check that FastAPI's ways of running code (the threadpool
for ``def``, yield dependencies whose exit runs after the response, exception handlers,
``TestClient``'s portal thread) all see that one session and leave nothing behind.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import event

from sessionscope import Database, SessionMiddleware
from sessionscope.adapters.starlette import dispose_on_shutdown, session_dependency

from .._models import Item
from .._uvicorn import PROTOCOL_ERRORS, Served, serve, wait_until
from ..conftest import DatabaseFactory
from ..middleware._asgi_apps import resolve

pytestmark = pytest.mark.anyio

Rows = Callable[[], list[str]]


def client(served: Served) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=served.url, timeout=30)


def idle(db: Database[Any]) -> Callable[[], bool]:
    def check() -> bool:
        checked_out: int = db.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        return db.live_units == 0 and db.live_sessions == 0 and checked_out == 0

    return check


def fastapi_app(db: Database[Any]) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, db=db)
    return app


@pytest.mark.parametrize("endpoint", ["async def", "def", "def dependency first"])
async def test_dependency_gives_the_request_session(
    make_db: DatabaseFactory, rows: Rows, endpoint: str
) -> None:
    """Depends(session_dependency(db)) is db.session() in async, def and threadpool code."""
    db = make_db()
    app = fastapi_app(db)
    current = Depends(session_dependency(db))

    if endpoint == "async def":

        @app.post("/write/{name}")
        async def write_async(name: str, session: Any = current) -> dict[str, bool]:
            session.add(Item(name=name))
            await resolve(session.flush())
            return {"same": session is db.session()}

    elif endpoint == "def":

        @app.post("/write/{name}")
        def write_sync(name: str, session: Any = current) -> dict[str, bool]:
            session.add(Item(name=name))
            return {"same": session is db.session()}

    else:

        def first_touch(request: Request) -> Any:
            # A def dependency runs in a worker thread, on a copy of the request's context.
            session = db.session()
            session.add(Item(name=request.path_params["name"] + "-dependency"))
            return session

        first_dependency = Depends(first_touch)

        @app.post("/write/{name}")
        async def write_after_dependency(
            name: str, first: Any = first_dependency, session: Any = current
        ) -> dict[str, bool]:
            session.add(Item(name=name))
            return {"same": first is session is db.session()}

    async with serve(app) as served, client(served) as http:
        response = await http.post("/write/a")
    assert response.json() == {"same": True}
    expected = ["a-dependency", "a"] if endpoint == "def dependency first" else ["a"]
    assert sorted(rows()) == sorted(expected)
    assert served.errors() == []


async def test_http_exception_after_a_write_rolls_back(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """HTTPException(409) is turned into a response by FastAPI; the write must not stay."""
    db = make_db()
    app = fastapi_app(db)

    current = Depends(session_dependency(db))

    @app.post("/conflict/{name}")
    async def conflict(name: str, session: Any = current) -> None:
        session.add(Item(name=name))
        await resolve(session.flush())
        raise HTTPException(409, "taken")

    async with serve(app) as served, client(served) as http:
        response = await http.post("/conflict/a")
    assert (response.status_code, response.json()) == (409, {"detail": "taken"})
    assert rows() == []
    assert served.errors() == []


async def test_route_without_the_dependency_creates_no_session(
    make_db: DatabaseFactory,
) -> None:
    """Routes that never ask for the session cost no session and no connection."""
    db = make_db()
    checkouts: list[object] = []
    event.listen(db.sync_engine, "checkout", lambda *args: checkouts.append(args))
    app = fastapi_app(db)

    def settings() -> dict[str, str]:
        return {"mode": "test"}

    settings_dependency = Depends(settings)

    @app.get("/health")
    async def health(config: dict[str, str] = settings_dependency) -> dict[str, int]:
        return {"sessions": db.live_sessions}

    async with serve(app) as served, client(served) as http:
        answers = [(await http.get("/health")).json() for _ in range(3)]
    assert answers == [{"sessions": 0}] * 3
    assert checkouts == []


# -- a yield dependency that owns the transaction (finding 16) ----------------------------


def transaction_dependency(db: Database[Any]) -> Any:
    """``with db.session.begin(): yield``: the pattern many FastAPI apps already have."""
    if db.is_async:

        async def transaction_async() -> AsyncIterator[Any]:
            async with db.session.begin():
                yield db.session()

        return transaction_async

    def transaction_sync() -> Iterator[Any]:
        with db.session.begin():
            yield db.session()

    return transaction_sync


@pytest.mark.parametrize(
    ("scope", "outcome", "status"),
    [
        ("request", "ok", 200),
        ("request", "http-error", 409),
        ("request", "crash", 500),
        ("function", "ok", 200),
        ("function", "http-error", 409),
    ],
)
async def test_yield_dependency_owning_the_transaction(
    make_db: DatabaseFactory,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
    scope: Literal["function", "request"],
    outcome: str,
    status: int,
) -> None:
    """A dependency wrapping the request in session.begin() keeps its rows on 200 only."""
    db = make_db()
    app = fastapi_app(db)
    transaction = Depends(transaction_dependency(db), scope=scope)

    @app.post("/in-transaction/{name}")
    async def in_transaction(name: str, session: Any = transaction) -> dict[str, str]:
        session.add(Item(name=name))
        await resolve(session.flush())
        if outcome == "http-error":
            raise HTTPException(409)
        if outcome == "crash":
            raise RuntimeError("endpoint failed inside the transaction")
        return {"stored": name}

    with caplog.at_level(logging.WARNING, logger="sessionscope"):
        async with serve(app) as served:
            async with client(served) as http:
                response = await http.post("/in-transaction/a")
            await wait_until(idle(db))
    assert response.status_code == status
    assert rows() == (["a"] if status == 200 else [])
    log = served.log()
    assert not any(text in log for text in PROTOCOL_ERRORS), log
    if outcome == "crash":
        assert "endpoint failed inside the transaction" in log
    else:
        assert served.errors() == [], log
    assert [r.getMessage() for r in caplog.records if r.name == "sessionscope"] == []


# -- lifespan and TestClient --------------------------------------------------------------


async def test_dispose_on_shutdown_closes_the_pool(make_db: DatabaseFactory, rows: Rows) -> None:
    """Without the middleware, the lifespan helper still closes pooled connections at exit."""
    db = make_db()
    closed: list[object] = []
    event.listen(db.sync_engine, "close", lambda *args: closed.append(args))
    app = FastAPI(lifespan=dispose_on_shutdown(db))

    if db.is_async:

        @app.post("/job/{name}")
        async def job_async(name: str) -> dict[str, int]:
            async with db.begin() as session:
                session.add(Item(name=name))
            return {"pooled": db.sync_engine.pool.checkedin()}  # type: ignore[attr-defined]

    else:

        @app.post("/job/{name}")
        def job_sync(name: str) -> dict[str, int]:
            with db.begin() as session:
                session.add(Item(name=name))
            return {"pooled": db.sync_engine.pool.checkedin()}  # type: ignore[attr-defined]

    async with serve(app) as served, client(served) as http:
        assert (await http.post("/job/a")).json() == {"pooled": 1}
        assert closed == []
    assert len(closed) == 1
    assert rows() == ["a"]


# Starlette 1.x prefers 'httpx2' for its TestClient; the venv has httpx, which still works.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
async def test_test_client_with_the_middleware_leaves_nothing_behind(
    make_db: DatabaseFactory, rows: Rows
) -> None:
    """FastAPI's TestClient runs the app on a portal thread; units still end and commit."""
    from fastapi.testclient import TestClient

    db = make_db()
    app = fastapi_app(db)
    current = Depends(session_dependency(db))

    @app.post("/items/{name}", status_code=201)
    async def create(name: str, session: Any = current) -> dict[str, str]:
        session.add(Item(name=name))
        await resolve(session.flush())
        if name == "conflict":
            raise HTTPException(409)
        return {"created": name}

    @app.post("/sync/items/{name}", status_code=201)
    def create_sync(name: str, session: Any = current) -> dict[str, bool]:
        session.add(Item(name=name))
        return {"same": session is db.session()}

    def exercise() -> list[int]:
        # 'with' runs the lifespan, so an async engine is disposed on the portal's loop.
        with TestClient(app) as test_client:
            return [
                test_client.post("/items/a").status_code,
                test_client.post("/items/conflict").status_code,
                test_client.post("/sync/items/b").status_code,
            ]

    assert await anyio.to_thread.run_sync(exercise) == [201, 409, 201]
    assert rows() == ["a", "b"]
    assert idle(db)()


DEFAULT_DB_APP = """
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sessionscope import SessionMiddleware, db
from sessionscope.adapters.starlette import session_dependency


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


Base.metadata.create_all(db.sync_engine)
app = FastAPI()
app.add_middleware(SessionMiddleware)
SessionDep = Annotated[Session, Depends(session_dependency)]


@app.post("/items", status_code=201)
async def create(name: str, session: SessionDep) -> dict[str, bool]:
    session.add(Item(name=name))
    return {"same": session is db.session()}


@app.get("/items")
def names(session: SessionDep) -> list[str]:
    return list(session.scalars(select(Item.name)))


with TestClient(app) as client:
    created = client.post("/items", params={"name": "apple"})
    assert (created.status_code, created.json()) == (201, {"same": True}), created.text
    assert client.get("/items").json() == ["apple"]
assert db.live_units == 0 and db.sync_engine.pool.checkedout() == 0
print("ok")
"""


def test_the_plain_function_is_the_default_database_dependency(tmp_path: Path) -> None:
    """``Depends(session_dependency)``, without ``(db)``, is what a user writes first: FastAPI
    accepts it at start-up and it gives the default database's session, in async and
    ``def`` endpoints alike (it used to fail with FastAPI's error about an invalid field)."""
    script = tmp_path / "app.py"
    script.write_text(DEFAULT_DB_APP)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
    assert (tmp_path / "sessionscope.sqlite3").exists()


async def test_the_plain_function_under_another_database_names_the_fix(
    make_db: DatabaseFactory,
) -> None:
    """An app whose middleware has a database of its own, but whose endpoints ask for
    ``Depends(session_dependency)`` (the default database's session), gets an error that
    says which database the middleware has and what to pass instead."""
    db = make_db()
    app = fastapi_app(db)

    @app.post("/items")
    async def create(session: Any = Depends(session_dependency)) -> None:  # noqa: B008
        raise AssertionError("not reached")

    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        with pytest.raises(RuntimeError) as raised:
            await http.post("/items")
    assert "handled by a middleware for" in str(raised.value)
    assert "another Database" in str(raised.value)
    assert db.live_units == 0
