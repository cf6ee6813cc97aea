"""``Database(url, pgbouncer=True)`` behind a real PgBouncer in transaction pooling mode.

Each test gets its own PgBouncer (``tests/_pgbouncer.py``: 4 server connections) in front of
the worker's PostgreSQL database, and a real uvicorn server running ``SessionMiddleware``:
psycopg 3 for the sync sessions, asyncpg for the async ones. Without ``pgbouncer=True`` the
drivers' server-side prepared statements meet server connections that another client
prepared on, or that never saw them; the tests measure that too, so the setting is shown
to matter. Leaks (pool, units, registry, backends idle in a transaction) are checked after
every test.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sessionscope import Database

from ._models import Child, Item
from ._pgbouncer import pgbouncer, require_pgbouncer
from ._uvicorn import Served, serve, wait_until
from .conftest import Backend, backend_params, leak_checked
from .middleware._asgi_apps import build_app, nothing_left, resolve

pytestmark = pytest.mark.anyio

POSTGRESQL = backend_params(["postgresql"])
BouncedDatabase = Callable[..., Database[Any]]
Answer = tuple[int, str]
# What the server answers when a driver's prepared statement meets the wrong connection.
PREPARED_STATEMENT_ERROR = re.compile(r'prepared statement "\w+" (does not exist|already exists)')


@pytest.fixture
async def bounced(backend: Backend, anyio_backend: str) -> AsyncIterator[BouncedDatabase]:
    """Build ``Database`` objects that reach the test's database through a PgBouncer of this
    test's own; check each for leaks, dispose it, then stop PgBouncer."""
    require_pgbouncer()
    made: list[Database[Any]] = []
    with pgbouncer(backend.database) as port:
        url = sa.make_url(backend.url).set(port=port).render_as_string(hide_password=False)

        def make(**options: Any) -> Database[Any]:
            options.setdefault("pgbouncer", True)
            db: Database[Any] = Database(url, **options)
            made.append(db)
            return db

        try:
            with leak_checked(made, backend):
                yield make
        finally:
            for db in made:
                await db.dispose_async()


def build_bouncer_app(db: Database[Any]) -> Starlette:
    """``build_app`` plus GET /lookup/{name}: one SELECT, the same statement every time; a
    database error there is rolled back and answered as a 500 that carries its message."""

    def query(request: Request) -> sa.Select[Any]:
        name = request.path_params["name"]
        return sa.select(sa.func.count(Item.id)).where(Item.name == name)

    # A database error is rolled back here, in the endpoint (a worker thread for psycopg):
    # without 'pgbouncer=True', psycopg follows that ROLLBACK with a DEALLOCATE ALL, a
    # transaction of its own that waits for a free server connection, and left to the end
    # of a read-only unit, which runs on the event loop, it can stall the whole server.
    async def lookup(request: Request) -> Response:
        try:
            result = await resolve(db.session.execute(query(request)))
        except sa.exc.DBAPIError as exc:
            await resolve(db.session.rollback())
            return PlainTextResponse(str(exc.orig), status_code=500)
        return PlainTextResponse(str(result.scalar_one()))

    def lookup_sync(request: Request) -> Response:
        try:
            count = db.session.execute(query(request)).scalar_one()
        except sa.exc.DBAPIError as exc:
            db.session.rollback()
            return PlainTextResponse(str(exc.orig), status_code=500)
        return PlainTextResponse(str(count))

    app = build_app(db)
    endpoint = lookup if db.is_async else lookup_sync
    app.router.routes.insert(0, Route("/lookup/{name}", endpoint))
    return app


def client(served: Served, connections: int = 10) -> httpx.AsyncClient:
    # No keep-alive: uvicorn closes a connection once an app raised, after its 500 went
    # out, and a request already sent on it would fail with a ReadError.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=served.url, limits=limits, timeout=60)


async def settled(db: Database[Any]) -> None:
    await wait_until(lambda: nothing_left(db) == (0, 0, 0))


# Path, the status the client gets, what stays stored.
OUTCOMES = {
    "created": ("/items/kept?status=201", 201, ["kept"]),
    "client-error": ("/http-error/refused?status=409", 409, []),
    "endpoint-raises": ("/crash/crashed", 500, []),
    "commit-fails": ("/orphan", 500, []),  # its deferred foreign key fails the COMMIT
}


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
@pytest.mark.parametrize("outcome", list(OUTCOMES))
async def test_request_outcomes_through_pgbouncer(
    bounced: BouncedDatabase, rows: Callable[[], list[str]], checker: sa.Engine, outcome: str
) -> None:
    """Commit, rollback and a refused COMMIT behave as without PgBouncer, and the server
    connection a failed request used serves the next request cleanly."""
    path, status, stored = OUTCOMES[outcome]
    db = bounced()
    async with serve(build_bouncer_app(db)) as served:
        async with client(served) as http:
            assert (await http.post(path)).status_code == status
            assert (await http.post("/items/after?status=201")).status_code == 201
        await settled(db)
    assert rows() == [*stored, "after"]
    with checker.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(Child)) == 0


async def repeat_lookups(served: Served, clients: int = 8, times: int = 20) -> list[Answer]:
    """``clients`` clients at once, each sending ``times`` GET /lookup/seen one after another:
    more runs of one statement on each pooled connection than psycopg's prepare_threshold
    (5), spread over more client connections than PgBouncer has server connections. (One
    client alone would not do: PgBouncer gives it the same server connection every time.)"""
    answers: list[Answer] = []
    async with client(served, connections=clients) as http:

        async def one_client() -> None:
            for _ in range(times):
                response = await http.get("/lookup/seen")
                answers.append((response.status_code, response.text))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(clients):
                    tg.start_soon(one_client)
    return answers


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
async def test_a_statement_repeated_many_times_works(bounced: BouncedDatabase) -> None:
    """The workload that breaks the drivers' prepared statements behind transaction pooling
    (see the test below) passes with 'pgbouncer=True'."""
    db = bounced()
    async with serve(build_bouncer_app(db)) as served:
        async with client(served) as http:
            assert (await http.post("/items/seen?status=201")).status_code == 201
        answers = await repeat_lookups(served)
        await settled(db)
    assert answers == [(200, "1")] * 160
    assert served.errors() == []


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
async def test_without_the_setting_prepared_statements_break(bounced: BouncedDatabase) -> None:
    """Without 'pgbouncer=True' the same workload fails with the driver's prepared-statement
    error: the reason the setting exists, and proof that the workload reaches it."""
    db = bounced(pgbouncer=False)
    async with serve(build_bouncer_app(db)) as served:
        async with client(served) as http:
            assert (await http.post("/items/seen?status=201")).status_code == 201
        answers = await repeat_lookups(served)
        await settled(db)
    failures = [text for status, text in answers if status != 200]
    assert failures, "every request succeeded"
    assert all(PREPARED_STATEMENT_ERROR.search(text) for text in failures), failures
    assert {(status, text) for status, text in answers if status == 200} == {(200, "1")}


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
async def test_more_concurrent_requests_than_server_connections(
    bounced: BouncedDatabase, rows: Callable[[], list[str]]
) -> None:
    """32 writers at once on PgBouncer's 4 server connections: every one is stored."""
    db = bounced()
    template = "/items/c{}?status=201" if db.is_async else "/sync/items/c{}"
    statuses: list[int] = []
    async with serve(build_bouncer_app(db)) as served:
        async with client(served, connections=32) as http:

            async def one(i: int) -> None:
                statuses.append((await http.post(template.format(i))).status_code)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(32):
                        tg.start_soon(one, i)
        await settled(db)
    assert statuses == [201] * 32
    assert sorted(rows()) == sorted(f"c{i}" for i in range(32))
    assert served.errors() == []


# -- what 'pgbouncer=True' refuses -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mysql+pymysql://root@127.0.0.1:3306/test", "PgBouncer pools PostgreSQL"),
        ("sqlite:///{tmp_path}/test.sqlite3", "PgBouncer pools PostgreSQL"),
        ("postgresql+pg8000://postgres@127.0.0.1:5432/test", "cannot tell how"),
    ],
    ids=["mariadb", "sqlite", "unknown-postgresql-driver"],
)
def test_urls_it_cannot_make_safe_are_refused(tmp_path: Path, url: str, reason: str) -> None:
    """A database PgBouncer does not pool, or a driver whose prepared statements the library
    does not know how to turn off, fails at construction instead of at the first request."""
    with pytest.raises(ValueError, match=reason):
        Database(url.format(tmp_path=tmp_path), pgbouncer=True)


@pytest.mark.parametrize("given", ["engine", "session_factory"])
def test_a_ready_made_engine_cannot_take_the_setting(given: str) -> None:
    """The settings go into the engine sessionscope creates; silently ignoring them on an
    engine the caller built would leave prepared statements on."""
    engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    options: dict[str, Any] = {given: engine if given == "engine" else sessionmaker(engine)}
    try:
        with pytest.raises(TypeError, match="'pgbouncer=True' applies when"):
            Database(**options, pgbouncer=True)
    finally:
        engine.dispose()
