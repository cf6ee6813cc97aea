"""``SessionMiddleware(retries=N)``: a request whose transaction lost a race with a concurrent
one runs again, with a fresh unit, a fresh scope and its body replayed, while nothing of its
response has left; everything else is answered as it was without retries.

The races are real: concurrent requests through a real uvicorn server that read a counter and
write it back (PostgreSQL SERIALIZABLE: SQLSTATE 40001; MariaDB with
``innodb_snapshot_isolation``: 1020; SQLite in WAL mode under a deferred ``BEGIN``: 5 or
517), two requests locking two rows in opposite orders (a deadlock: 40P01, 1213), or, where
one request is enough, a request that reads a row, lets a plain connection of the test change
and commit it, then writes it (``lose_race``), in the endpoint or in the flush its commit
makes. Raw ASGI calls are used where the test must control the timing: websockets, and
cancelling a request during its backoff or during an attempt.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx
import pytest
import sqlalchemy as sa
from fastapi import BackgroundTasks, Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from sessionscope import Database, SessionMiddleware
from sessionscope._types import ASGIApp, Message
from sessionscope.adapters.starlette import session_dependency

from .._models import Item
from .._retry import (
    CONCURRENT_LOG,
    DEADLOCK_LOG,
    INCREMENT,
    LONG_WAIT,
    RACE_CODE,
    RACE_LOG,
    READ,
    Counters,
    counter_table,
    driver_code,
    logged,
    lose_race,
    no_connection_out,
    racy_database,
)
from .._uvicorn import Served, serve, wait_until
from ..conftest import Backend, DatabaseFactory, backend_params
from ._driver import http_scope

pytestmark = pytest.mark.anyio

T = TypeVar("T")

Rows = Callable[[], list[str]]

SQLITE = backend_params(["sqlite"])
SQLITE_SYNC = backend_params(["sqlite"], modes=["sync"])
SERVERS = backend_params(["postgresql", "mariadb"])
POSTGRESQL = backend_params(["postgresql"])

# The fixtures of ``_retry``, found by pytest under these names.
counters = pytest.fixture(counter_table)
racy_db = pytest.fixture(racy_database)

# Only a guard: a deadlock is detected long before (PostgreSQL: deadlock_timeout, 1 s).
LOCK_TIMEOUT = {
    "postgresql": "SET LOCAL lock_timeout = '5s'",
    "mariadb": "SET SESSION innodb_lock_wait_timeout = 5",
}

RETRY_LINE = re.compile(
    r"The request '(?P<label>[A-Z]+ [^']+)' lost a race with a concurrent transaction"
    r" \((?P<code>[^)]+)\) on attempt (?P<attempt>\d+) of (?P<attempts>\d+);"
    r" rolled back, running it again\."
)
# A failed commit at the response start names the request and the database; one after it
# (a stream's end) does not.
COMMIT_FAILED = re.compile(
    r"Commit failed( for [A-Z]+ \S+ on \S+)?; the unit of work was rolled back\."
)
NOT_RUN_AGAIN = (
    "Commit failed; the unit of work was rolled back. The request is not run again:"
    " its code stored something since, or its client left."
)

SET = sa.text("UPDATE retry_counters SET n = :n WHERE id = :id")


# -- what the tests share -------------------------------------------------------------------


@dataclass
class Probe:
    """What the app did, recorded from the server's threads: each run of an endpoint with its
    attempt number, each run that got as far as returning its response, and the after-commit
    callbacks and background tasks that ran."""

    runs: list[tuple[str, int]] = field(default_factory=list)
    returned: list[tuple[str, int]] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    background: list[str] = field(default_factory=list)

    def attempts(self, key: str) -> list[int]:
        return [attempt for who, attempt in self.runs if who == key]


@dataclass
class Retry:
    """One retry line of the log, parsed."""

    label: str
    code: str
    attempt: int
    attempts: int


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """What is logged meanwhile, by any thread (the server runs in one), WARNING and up."""
    caplog.set_level(logging.WARNING, logger="sessionscope")
    return caplog


# The one line a failed commit answered by 'on_commit_error' is logged with.
ANSWERED = re.compile(
    r"Commit failed for (?P<label>[A-Z]+ \S+) on \S+ \((?P<error>.+)\); rolled back, and"
    r" answered by 'on_commit_error'\.",
    re.DOTALL,
)


def answered_logged(logs: pytest.LogCaptureFixture) -> list[str]:
    """The requests whose failed commit 'on_commit_error' answered, as logged."""
    found = (ANSWERED.fullmatch(message) for message in logged(logs, logging.WARNING))
    return [match["label"] for match in found if match is not None]


def retries_logged(logs: pytest.LogCaptureFixture) -> list[Retry]:
    """The library's retry lines; fails on any other WARNING of the library but the line
    of a failed commit that 'on_commit_error' answered."""
    found: list[Retry] = []
    for message in logged(logs, logging.WARNING):
        if ANSWERED.fullmatch(message):
            continue
        match = RETRY_LINE.fullmatch(message)
        assert match is not None, f"not a retry line: {message!r}"
        found.append(
            Retry(match["label"], match["code"], int(match["attempt"]), int(match["attempts"]))
        )
    return found


def errors_logged(logs: pytest.LogCaptureFixture) -> list[str]:
    """Everything logged at ERROR or above, by any logger (uvicorn's included)."""
    return [f"{r.name}: {r.getMessage()}" for r in logs.records if r.levelno >= logging.ERROR]


def idle(db: Database[Any]) -> Callable[[], bool]:
    """Whether every unit has ended and the pool has every connection back."""

    def check() -> bool:
        checked_out: int = db.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        return db.live_units == 0 and db.live_sessions == 0 and checked_out == 0

    return check


def client(served: Served, connections: int = 10) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=served.url, limits=limits, timeout=LONG_WAIT * 3)


def starlette_app(db: Database[Any], routes: Sequence[BaseRoute], **options: Any) -> Starlette:
    app = Starlette(routes=list(routes))
    app.add_middleware(SessionMiddleware, db=db, **options)
    return app


async def in_db(db: Database[Any], work: Callable[[Session], T]) -> T:
    """``work`` on the request's session: in a worker thread for a sync session (a statement
    may wait for a row lock), through ``run_sync`` for an async one."""
    session = db.session()
    if isinstance(session, AsyncSession):
        return await session.run_sync(work)
    return await anyio.to_thread.run_sync(work, session)


async def execute(db: Database[Any], statement: sa.TextClause) -> None:
    """Execute ``statement`` on the request's session."""
    await in_db(db, lambda session: session.execute(statement))


def losing(checker: Engine) -> Callable[[Session], None]:
    """Work that loses a race (see ``lose_race``)."""
    return partial(lose_race, checker=checker)


def read_counter(session: Session) -> int:
    return int(session.execute(READ, {"id": 1}).scalar_one())


def set_counter(value: int, session: Session) -> None:
    session.execute(SET, {"n": value, "id": 1})


def increment(row: int, session: Session) -> None:
    session.execute(INCREMENT, {"id": row})


def load_item(session: Session) -> Item:
    """The first item (the one ``store_item`` stored first)."""
    return session.scalars(sa.select(Item).order_by(Item.id).limit(1)).one()


def add_item(name: str, session: Session) -> None:
    session.add(Item(name=name))
    session.flush()


def store_item(checker: Engine, name: str) -> None:
    with checker.begin() as connection:
        connection.execute(sa.insert(Item).values(name=name))


def rename_concurrently(checker: Engine, item_id: int, name: str) -> None:
    """A concurrent transaction renames an item and commits."""
    with checker.begin() as connection:
        connection.execute(sa.update(Item).where(Item.id == item_id).values(name=name))


def assert_lost_to(backend: Backend, error: BaseException) -> None:
    assert driver_code(backend, error) == RACE_CODE[backend.name]


# -- real concurrency through a real server -------------------------------------------------

BURST = 5


async def test_concurrent_increments_each_count_exactly_once(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    logs: pytest.LogCaptureFixture,
) -> None:
    """Concurrent requests each read the counter and write it back plus one: all but one lose
    their first race, yet every client gets its 200 with a value of its own, the counter ends
    at the number of requests, and each request's callback and background task ran once."""
    db = racy_db
    probe = Probe()
    # Every first attempt reads before any writes: all but one must lose.
    barrier = threading.Barrier(BURST, timeout=LONG_WAIT)

    async def bump(request: Request) -> Response:
        key = request.path_params["key"]
        attempt = db.attempt
        probe.runs.append((key, attempt))
        value = await in_db(db, read_counter)
        if attempt == 1:
            await anyio.to_thread.run_sync(barrier.wait)
        await in_db(db, partial(set_counter, value + 1))
        db.after_commit(partial(probe.callbacks.append, key))
        probe.returned.append((key, attempt))
        task = BackgroundTask(probe.background.append, key)
        return PlainTextResponse(str(value + 1), background=task)

    keys = [f"k{i}" for i in range(BURST)]
    app = starlette_app(db, [Route("/bump/{key}", bump, methods=["POST"])], retries=8)
    async with serve(app) as served:
        async with client(served, BURST) as http:
            answers: dict[str, httpx.Response] = {}

            async def one(key: str) -> None:
                answers[key] = await http.post(f"/bump/{key}")

            with anyio.fail_after(LONG_WAIT * 3):
                async with anyio.create_task_group() as tasks:
                    for key in keys:
                        tasks.start_soon(one, key)
        await wait_until(lambda: len(probe.background) == BURST)
        await wait_until(idle(db))

    assert {key: answer.status_code for key, answer in answers.items()} == dict.fromkeys(keys, 200)
    # Each request wrote a value no other request wrote: none of them lost an update.
    assert sorted(int(answer.text) for answer in answers.values()) == list(range(1, BURST + 1))
    assert counters() == {1: BURST, 2: 0}
    assert sorted(probe.callbacks) == keys, "one after-commit callback per request"
    assert sorted(probe.background) == keys, "one background task per request"
    for key in keys:
        runs = probe.attempts(key)
        assert runs == list(range(1, len(runs) + 1)), (key, runs)
    retried = [key for key in keys if len(probe.attempts(key)) > 1]
    assert len(retried) >= BURST - 1, f"all but one first attempt lost: {probe.runs}"
    assert max(attempt for _, attempt in probe.runs) >= 2
    lines = retries_logged(logs)
    assert len(lines) == len(probe.runs) - BURST, "one line per discarded attempt"
    for line in lines:
        assert line.label.startswith("POST /bump/k"), line
        assert line.code in CONCURRENT_LOG[backend.name], line
        assert line.attempts == 9
        assert (line.label.removeprefix("POST /bump/"), line.attempt) in probe.runs
    assert errors_logged(logs) == []
    assert served.errors() == [], served.log()
    no_connection_out(db)


@pytest.mark.parametrize("backend", SERVERS, indirect=True)
async def test_deadlock_victim_runs_again(
    backend: Backend,
    counters: Counters,
    make_db: DatabaseFactory,
    logs: pytest.LogCaptureFixture,
) -> None:
    """Two requests locking the same two rows in opposite orders deadlock: the victim's
    request runs again instead of failing, so both rows count both requests."""
    db = make_db()
    probe = Probe()
    barrier = threading.Barrier(2, timeout=LONG_WAIT)
    order = {"a": (1, 2), "b": (2, 1)}
    timeout = sa.text(LOCK_TIMEOUT[backend.name])

    async def lock_both(request: Request) -> Response:
        who = request.path_params["who"]
        attempt = db.attempt
        probe.runs.append((who, attempt))
        await execute(db, timeout)
        await in_db(db, partial(increment, order[who][0]))
        if attempt == 1:
            await anyio.to_thread.run_sync(barrier.wait)
        await in_db(db, partial(increment, order[who][1]))
        db.after_commit(partial(probe.callbacks.append, who))
        return PlainTextResponse(who, background=BackgroundTask(probe.background.append, who))

    app = starlette_app(db, [Route("/lock/{who}", lock_both, methods=["POST"])], retries=3)
    async with serve(app) as served:
        async with client(served) as http:
            answers: dict[str, httpx.Response] = {}

            async def one(who: str) -> None:
                answers[who] = await http.post(f"/lock/{who}")

            with anyio.fail_after(LONG_WAIT * 2):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(one, "a")
                    tasks.start_soon(one, "b")
        await wait_until(lambda: len(probe.background) == 2)
        await wait_until(idle(db))

    assert {who: (a.status_code, a.text) for who, a in answers.items()} == {
        "a": (200, "a"),
        "b": (200, "b"),
    }
    assert counters() == {1: 2, 2: 2}
    assert sorted(probe.callbacks) == ["a", "b"]
    assert sorted(probe.background) == ["a", "b"]
    assert sorted(attempt for _, attempt in probe.runs) == [1, 1, 2], probe.runs
    (victim,) = [who for who, attempt in probe.runs if attempt == 2]
    lines = retries_logged(logs)
    assert [(r.label, r.code, r.attempt, r.attempts) for r in lines] == [
        (f"POST /lock/{victim}", DEADLOCK_LOG[backend.name], 1, 4)
    ]
    assert errors_logged(logs) == []
    assert served.errors() == [], served.log()
    no_connection_out(db)


# -- the commit at the response's start lost the race ---------------------------------------


def rename_routes(db: Database[Any], checker: Engine, probe: Probe, stream: bool) -> list[Route]:
    """``POST /rename``: loads the only item, lets a concurrent transaction rename it on the
    first attempt (on every attempt with ``?always``), and renames it itself: the UPDATE is
    flushed by the commit the middleware makes when the response starts."""

    async def rename(request: Request) -> Response:
        attempt = db.attempt
        probe.runs.append(("rename", attempt))
        item = await in_db(db, load_item)
        if attempt == 1 or "always" in request.query_params:
            await anyio.to_thread.run_sync(
                rename_concurrently, checker, item.id, f"concurrent-{attempt}"
            )
        item.name = f"attempt-{attempt}"
        db.after_commit(partial(probe.callbacks.append, f"rename-{attempt}"))
        probe.returned.append(("rename", attempt))
        task = BackgroundTask(probe.background.append, f"rename-{attempt}")
        text = f"renamed on attempt {attempt}"
        if stream:
            chunks = [text[:8].encode(), text[8:].encode()]
            return StreamingResponse(iter(chunks), background=task)
        return PlainTextResponse(text, background=task)

    return [Route("/rename", rename, methods=["POST"])]


# Every backend with a plain response; SQLite alone with a streaming one (its start commits
# the same way).
RENAME_CASES = [
    *(
        pytest.param(case.values[0], False, id=f"{case.id}-plain", marks=case.marks)
        for case in backend_params()
    ),
    *(
        pytest.param(case.values[0], True, id=f"{case.id}-streaming", marks=case.marks)
        for case in SQLITE
    ),
]


@pytest.mark.parametrize(("backend", "stream"), RENAME_CASES, indirect=["backend"])
async def test_commit_that_lost_the_race_runs_the_request_again(
    backend: Backend,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    """The endpoint returned, and the flush of its commit at the response's start lost the
    race: nothing of that response leaves, neither its after-commit callback nor its
    background task runs, and the second attempt's response is the one the client gets."""
    db = racy_db
    store_item(checker, "original")
    probe = Probe()
    hooked: list[BaseException] = []

    def on_commit_error(error: BaseException) -> None:
        hooked.append(error)

    routes = rename_routes(db, checker, probe, stream)
    app = starlette_app(db, routes, retries=2, on_commit_error=on_commit_error)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/rename")
        await wait_until(lambda: len(probe.background) == 1)
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (200, "renamed on attempt 2")
    assert probe.returned == [("rename", 1), ("rename", 2)], "attempt 1 failed at its commit"
    assert probe.callbacks == ["rename-2"], "the discarded attempt's callback did not run"
    assert probe.background == ["rename-2"], "the discarded attempt's task did not run"
    assert rows() == ["attempt-2"]
    assert hooked == [], "a commit that is run again is not answered by 'on_commit_error'"
    lines = retries_logged(logs)
    assert [(r.label, r.code, r.attempt, r.attempts) for r in lines] == [
        ("POST /rename", RACE_LOG[backend.name], 1, 3)
    ]
    assert errors_logged(logs) == [], "a commit that is run again is not an error"
    assert served.errors() == [], served.log()
    no_connection_out(db)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_app_s_own_commit_that_lost_the_race_runs_again(
    backend: Backend,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
) -> None:
    """The app commits the request's session itself, and that commit loses the race: it
    stored nothing, so the request runs again (only a commit that succeeded forbids it)."""
    db = racy_db
    store_item(checker, "original")
    probe = Probe()

    async def rename_and_commit(request: Request) -> Response:
        attempt = db.attempt
        probe.runs.append(("commit", attempt))
        item = await in_db(db, load_item)
        if attempt == 1:
            await anyio.to_thread.run_sync(rename_concurrently, checker, item.id, "concurrent")
        item.name = f"attempt-{attempt}"
        await commit(db)
        probe.returned.append(("commit", attempt))
        return PlainTextResponse(f"committed on attempt {attempt}")

    routes = [Route("/commit", rename_and_commit, methods=["POST"])]
    app = starlette_app(db, routes, retries=2)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/commit")
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (200, "committed on attempt 2")
    assert probe.attempts("commit") == [1, 2]
    assert probe.returned == [("commit", 2)]
    assert rows() == ["attempt-2"]
    lines = retries_logged(logs)
    assert [(r.code, r.attempt) for r in lines] == [(RACE_LOG[backend.name], 1)]
    assert served.errors() == [], served.log()
    no_connection_out(db)


@pytest.mark.parametrize("backend", POSTGRESQL, indirect=True)
async def test_write_skew_failing_at_commit_runs_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """SERIALIZABLE write skew: the request reads both counters and writes the first, a
    concurrent transaction reads both and writes the second, and commits first. Every
    statement of the request succeeded; its COMMIT itself fails, and the request runs again."""
    db = racy_db
    probe = Probe()
    both = sa.text("SELECT sum(n) FROM retry_counters")

    def skew() -> None:
        with checker.connect() as other:
            other = other.execution_options(isolation_level="SERIALIZABLE")
            other.begin()
            total = int(other.execute(both).scalar_one())
            other.execute(SET, {"n": total + 10, "id": 2})
            other.commit()

    async def sum_then_write(request: Request) -> Response:
        attempt = db.attempt
        probe.runs.append(("skew", attempt))
        total = await in_db(db, lambda session: int(session.execute(both).scalar_one()))
        await in_db(db, partial(set_counter, total + 1))
        if attempt == 1:
            await anyio.to_thread.run_sync(skew)
        db.after_commit(partial(probe.callbacks.append, f"skew-{attempt}"))
        probe.returned.append(("skew", attempt))
        task = BackgroundTask(probe.background.append, f"skew-{attempt}")
        return PlainTextResponse(str(total + 1), background=task)

    app = starlette_app(db, [Route("/skew", sum_then_write, methods=["POST"])], retries=1)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/skew")
        await wait_until(lambda: len(probe.background) == 1)
        await wait_until(idle(db))

    # The retry saw the concurrent write: 0 + 10, plus one.
    assert (answer.status_code, answer.text) == (200, "11")
    assert counters() == {1: 11, 2: 10}
    assert probe.returned == [("skew", 1), ("skew", 2)]
    assert probe.callbacks == ["skew-2"]
    assert probe.background == ["skew-2"]
    lines = retries_logged(logs)
    assert [(r.code, r.attempt) for r in lines] == [("SQLSTATE 40001", 1)]
    assert errors_logged(logs) == []
    no_connection_out(db)


# -- the request body, replayed ---------------------------------------------------------------


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_json_body_and_scope_are_the_same_for_every_attempt(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """Each attempt reads the whole JSON body the client sent once, and gets a scope of its
    own: what the first attempt put in the request's state is not seen by the second."""
    db = racy_db
    payload = {"amount": 7, "note": "é" * 50}
    seen: list[tuple[int, Any, Any]] = []

    async def deposit(request: Request) -> Response:
        attempt = db.attempt
        body = await request.json()
        seen.append((attempt, body, getattr(request.state, "touched", None)))
        request.state.touched = attempt
        if attempt == 1:
            await in_db(db, losing(checker))
        await in_db(db, partial(increment, 2))
        return JSONResponse({"attempt": attempt, "body": body})

    app = starlette_app(db, [Route("/deposit", deposit, methods=["POST"])], retries=2)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/deposit", json=payload)
        await wait_until(idle(db))

    assert answer.status_code == 200
    assert answer.json() == {"attempt": 2, "body": payload}
    assert seen == [(1, payload, None), (2, payload, None)]
    assert counters() == {1: 1, 2: 1}, "the concurrent increment, then the retry's"
    assert [r.attempt for r in retries_logged(logs)] == [1]
    assert served.errors() == [], served.log()


CHUNKS = [b"first-chunk;", b"second-chunk;", b"third-chunk"]


async def post_chunks(
    port: int, target: str, chunks: list[bytes], wait: Callable[[int], Awaitable[None]]
) -> tuple[int, bytes]:
    """POST ``chunks`` with chunked encoding, awaiting ``wait(i)`` before chunk ``i`` (and
    ``wait(len(chunks))`` before the last, empty one); the answer's status and body."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        head = (
            f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        await stream.send(head.encode())
        for index, chunk in enumerate([*chunks, b""]):
            await wait(index)
            await stream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        received = b""
        with anyio.fail_after(LONG_WAIT):
            while True:
                try:
                    received += await stream.receive()
                except anyio.EndOfStream:
                    break
    head_part, _, body = received.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), body


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
@pytest.mark.parametrize("first_reads", ["all", "one", "none"])
async def test_streamed_body_is_replayed_chunk_by_chunk(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
    first_reads: str,
) -> None:
    """A body sent in chunks, each only once the app has received the previous one: the
    second attempt gets the chunks the first one received, in order, as separate messages,
    then the rest from the server, whether the first attempt read all of the body, part of
    it, or none of it."""
    db = racy_db
    read: list[tuple[int, bytes]] = []

    async def upload(request: Request) -> Response:
        attempt = db.attempt
        limit = {"all": len(CHUNKS), "one": 1, "none": 0}[first_reads] if attempt == 1 else None
        if limit != 0:
            async for chunk in request.stream():
                if chunk:
                    read.append((attempt, chunk))
                if limit is not None and len(read) >= limit:
                    break
        if attempt == 1:
            await in_db(db, losing(checker))
        return PlainTextResponse(b"|".join(c for a, c in read if a == attempt))

    async def after_received(index: int) -> None:
        # Chunk ``index`` leaves once the app has received the one before it.
        if index:
            wanted = CHUNKS[index - 1]
            await wait_until(lambda: any(chunk == wanted for _, chunk in read))

    app = starlette_app(db, [Route("/upload", upload, methods=["POST"])], retries=2)
    async with serve(app) as served:
        status, body = await post_chunks(served.port, "/upload", CHUNKS, after_received)
        await wait_until(idle(db))

    assert (status, body) == (200, b"|".join(CHUNKS))
    first = [chunk for attempt, chunk in read if attempt == 1]
    second = [chunk for attempt, chunk in read if attempt == 2]
    assert first == CHUNKS[: {"all": 3, "one": 1, "none": 0}[first_reads]]
    assert second == CHUNKS, "the same chunks, one message each, in order"
    assert [r.attempt for r in retries_logged(logs)] == [1]
    assert counters() == {1: 1, 2: 0}
    assert served.errors() == [], served.log()


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
@pytest.mark.parametrize(
    ("limit", "size", "runs_again"),
    [(16, 16, True), (16, 17, False), (0, 0, True)],
    ids=["at-the-limit", "over-the-limit", "empty-body-zero-limit"],
)
async def test_body_over_the_limit_is_not_run_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
    limit: int,
    size: int,
    runs_again: bool,
) -> None:
    """A body longer than ``retry_body_limit`` is not kept: its request gets one attempt,
    and its lost race its usual failure (a 500); one that fits runs again."""
    db = racy_db
    probe = Probe()

    async def once(request: Request) -> Response:
        probe.runs.append(("once", db.attempt))
        body = await request.body()
        if db.attempt == 1:
            await in_db(db, losing(checker))
        return PlainTextResponse(f"{len(body)} bytes")

    app = starlette_app(
        db, [Route("/once", once, methods=["POST"])], retries=2, retry_body_limit=limit
    )
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/once", content=b"x" * size)
        await wait_until(idle(db))

    if runs_again:
        assert (answer.status_code, answer.text) == (200, f"{size} bytes")
        assert probe.attempts("once") == [1, 2]
        assert [r.attempt for r in retries_logged(logs)] == [1]
        assert served.errors() == [], served.log()
    else:
        assert (answer.status_code, answer.text) == (500, "Internal Server Error")
        assert probe.attempts("once") == [1]
        assert retries_logged(logs) == []
        assert len(served.errors()) == 1, served.log()
    assert counters() == {1: 1, 2: 0}


# -- what is not run again --------------------------------------------------------------------


async def stream_losing_at_its_end(
    db: Database[Any], checker: Engine, opened: str, retries: int
) -> Probe:
    """Serve ``POST /stream``, whose body loads the first item, lets a concurrent transaction
    rename it, and renames it too: the commit before the final message loses the race. The
    request's unit is opened before the start, which commits an item (``"wrote-before"``)
    or nothing, for the unit holds no connection yet (``"opened-before"``); or by the body
    (``"in-body"``)."""
    probe = Probe()

    async def stream(request: Request) -> Response:
        # 'db.attempt' opens the request's unit (no session, no connection): the "in-body"
        # stream opens it only once the start has left.
        if opened != "in-body":
            probe.runs.append(("stream", db.attempt))
        if opened == "wrote-before":
            await in_db(db, partial(add_item, "before-start"))

        async def body() -> Any:
            yield b"first;"
            if opened == "in-body":
                probe.runs.append(("stream", db.attempt))
            item = await in_db(db, load_item)
            await anyio.to_thread.run_sync(rename_concurrently, checker, item.id, "concurrent")
            item.name = "streamed"
            yield b"last"

        return StreamingResponse(body())

    app = starlette_app(db, [Route("/stream", stream, methods=["POST"])], retries=retries)
    async with serve(app) as served:
        async with client(served) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post("/stream")
        await wait_until(lambda: bool(served.errors()))
        await wait_until(idle(db))
    assert len(served.errors()) == 1, served.log()
    return probe


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
@pytest.mark.parametrize("opened", ["wrote-before", "opened-before", "in-body"])
async def test_stream_whose_final_commit_lost_the_race_is_not_run_again(
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
    opened: str,
) -> None:
    """Once the start has left, the request cannot run again: the stream's final commit that
    lost a race leaves the response visibly incomplete, its write rolled back (what was
    committed at the start stays), the failed commit logged at ERROR as without retries,
    and nothing logged as a retry."""
    db = racy_db
    store_item(checker, "original")
    probe = await stream_losing_at_its_end(db, checker, opened, retries=3)

    assert probe.attempts("stream") == [1]
    expected = ["concurrent", "before-start"] if opened == "wrote-before" else ["concurrent"]
    assert rows() == expected
    assert retries_logged(logs) == []
    [message] = logged(logs, logging.ERROR)
    assert COMMIT_FAILED.fullmatch(message), message
    no_connection_out(db)


async def test_duplicate_key_gets_its_usual_failure_after_one_attempt(
    backend: Backend,
    make_db: DatabaseFactory,
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
) -> None:
    """A constraint violation fails the same way every time: at the commit it gets the
    middleware's 500 and its ERROR line, in the endpoint the app's 500, after one attempt."""
    db = make_db()
    store_item(checker, "taken")
    probe = Probe()

    async def duplicate(request: Request) -> Response:
        where = request.path_params["where"]
        probe.runs.append((where, db.attempt))
        if where == "commit":
            db.session.add(Item(name="taken"))  # flushed by the commit
        else:
            await in_db(db, partial(add_item, "taken"))
        return PlainTextResponse("never sent")

    app = starlette_app(db, [Route("/duplicate/{where}", duplicate, methods=["POST"])], retries=3)
    async with serve(app) as served:
        async with client(served) as http:
            at_commit = await http.post("/duplicate/commit")
            in_endpoint = await http.post("/duplicate/endpoint")
        await wait_until(idle(db))

    assert (at_commit.status_code, at_commit.text) == (500, "Internal Server Error")
    assert (in_endpoint.status_code, in_endpoint.text) == (500, "Internal Server Error")
    assert probe.runs == [("commit", 1), ("endpoint", 1)]
    assert rows() == ["taken"]
    assert retries_logged(logs) == []
    [message] = logged(logs, logging.ERROR)
    assert COMMIT_FAILED.fullmatch(message), message
    assert len(served.errors()) == 1, served.log()  # the endpoint's error, by uvicorn
    no_connection_out(db)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
@pytest.mark.parametrize("guard", ["no-retry", "no-retry-first", "session-commit", "nested-begin"])
async def test_request_that_must_not_repeat_is_not_run_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
    guard: str,
) -> None:
    """A request that said ``db.no_retry()`` (before or after touching the session), or that
    committed something itself or in a nested ``db.begin()``, gets its lost race as a 500
    after one attempt: running it again would repeat what it did."""
    db = racy_db
    probe = Probe()

    async def guarded(request: Request) -> Response:
        probe.runs.append((guard, db.attempt))
        if guard == "no-retry-first":
            db.no_retry()
        await in_db(db, read_counter)
        if guard == "no-retry":
            db.no_retry()
        elif guard == "session-commit":
            await commit_item(db, "committed")
        elif guard == "nested-begin":
            await nested_item(db, "nested")
        await in_db(db, losing(checker))
        return PlainTextResponse("never sent")

    app = starlette_app(db, [Route("/guarded", guarded, methods=["POST"])], retries=3)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/guarded")
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (500, "Internal Server Error")
    assert probe.attempts(guard) == [1]
    assert counters() == {1: 1, 2: 0}
    assert rows() == {"session-commit": ["committed"], "nested-begin": ["nested"]}.get(guard, [])
    assert retries_logged(logs) == []
    assert len(served.errors()) == 1, served.log()
    no_connection_out(db)


async def commit(db: Database[Any]) -> None:
    """Commit the request's session, as an app may do itself."""
    session = db.session()
    if isinstance(session, AsyncSession):
        await session.commit()
    else:
        await anyio.to_thread.run_sync(session.commit)


async def commit_item(db: Database[Any], name: str) -> None:
    """Add an item and commit the request's session itself."""
    db.session().add(Item(name=name))
    await commit(db)


async def nested_item(db: Database[Any], name: str) -> None:
    """Add an item in a ``db.begin()`` unit nested in the request's, which commits it."""
    if db.is_async:
        async with db.begin() as session:
            session.add(Item(name=name))
        return

    def nested() -> None:
        with db.begin() as session:
            session.add(Item(name=name))

    await anyio.to_thread.run_sync(nested)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_default_is_no_retry(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """Without ``retries`` a lost race is the 500 it always was, after one attempt, and the
    request's unit says it has no retries left."""
    db = racy_db
    probe = Probe()

    async def lose(request: Request) -> Response:
        probe.runs.append(("lose", db.attempt))
        await in_db(db, losing(checker))
        return PlainTextResponse("never sent")

    app = starlette_app(db, [Route("/lose", lose, methods=["POST"])])
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/lose")
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (500, "Internal Server Error")
    assert probe.attempts("lose") == [1]
    assert counters() == {1: 1, 2: 0}
    assert retries_logged(logs) == []
    assert len(served.errors()) == 1, served.log()


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_lost_race_the_app_answered_itself_is_not_run_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """An exception handler of the app turned the lost race into a response: that is the
    app's answer, sent after one attempt."""
    db = racy_db
    probe = Probe()

    async def lose(request: Request) -> Response:
        probe.runs.append(("lose", db.attempt))
        await in_db(db, losing(checker))
        return PlainTextResponse("never sent")

    async def database_error(request: Request, error: Exception) -> Response:
        return PlainTextResponse("database error", status_code=503)

    app = Starlette(
        routes=[Route("/lose", lose, methods=["POST"])],
        exception_handlers={DBAPIError: database_error},
    )
    app.add_middleware(SessionMiddleware, db=db, retries=3)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/lose")
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (503, "database error")
    assert probe.attempts("lose") == [1]
    assert counters() == {1: 1, 2: 0}
    assert retries_logged(logs) == []
    assert served.errors() == [], served.log()


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
async def test_pool_timeout_is_answered_503_not_run_again(
    make_db: DatabaseFactory, logs: pytest.LogCaptureFixture
) -> None:
    """No connection within the pool's timeout is a busy server, not a lost race: the usual
    503 after one attempt, logged as such and not as a retry."""
    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3})
    probe = Probe()

    async def read(request: Request) -> Response:
        probe.runs.append(("read", db.attempt))
        await in_db(db, read_counter)
        return PlainTextResponse("never sent")

    app = starlette_app(db, [Route("/read", read, methods=["POST"])], retries=3)
    engine = db.engine
    assert isinstance(engine, Engine)
    async with serve(app) as served:
        async with client(served) as http:
            with engine.connect():  # the pool's only connection
                answer = await http.post("/read")
        await wait_until(idle(db))

    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert probe.attempts("read") == [1]
    warnings = logged(logs, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "POST /read got no connection" in warnings[0]
    assert not RETRY_LINE.fullmatch(warnings[0])
    assert served.errors() == [], served.log()


async def test_attempts_run_out_in_the_endpoint(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """``retries=2`` is three attempts at most: the third lost race escapes the app as the
    usual 500, logged once at ERROR, after one retry line per discarded attempt."""
    db = racy_db
    probe = Probe()

    async def lose(request: Request) -> Response:
        probe.runs.append(("lose", db.attempt))
        db.after_commit(partial(probe.callbacks.append, "lose"))
        await in_db(db, losing(checker))
        return PlainTextResponse("never sent")

    app = starlette_app(db, [Route("/lose", lose, methods=["POST"])], retries=2)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/lose")
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (500, "Internal Server Error")
    assert probe.attempts("lose") == [1, 2, 3]
    assert probe.callbacks == []
    assert counters() == {1: 3, 2: 0}, "only the concurrent transaction's increments"
    lines = retries_logged(logs)
    assert [(r.label, r.code, r.attempt, r.attempts) for r in lines] == [
        ("POST /lose", RACE_LOG[backend.name], 1, 3),
        ("POST /lose", RACE_LOG[backend.name], 2, 3),
    ]
    errors = errors_logged(logs)
    assert len(errors) == 1, errors
    assert len(served.errors()) == 1, served.log()
    no_connection_out(db)


async def test_attempts_run_out_at_the_commit(
    backend: Backend,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
) -> None:
    """Every attempt's commit loses: the last failure gets ``on_commit_error``'s answer
    (called once, with the driver's error) and the one ERROR line of a failed commit; only
    the discarded attempts' background tasks never run (the last one's runs, as it does
    after any failed commit)."""
    db = racy_db
    store_item(checker, "original")
    probe = Probe()
    hooked: list[BaseException] = []

    def on_commit_error(error: BaseException) -> ASGIApp:
        hooked.append(error)
        return PlainTextResponse("try again later", status_code=409)

    routes = rename_routes(db, checker, probe, stream=False)
    app = starlette_app(db, routes, retries=2, on_commit_error=on_commit_error)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/rename?always")
        await wait_until(lambda: len(probe.background) == 1)
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (409, "try again later")
    assert probe.returned == [("rename", 1), ("rename", 2), ("rename", 3)]
    assert probe.callbacks == []
    assert probe.background == ["rename-3"]
    assert rows() == ["concurrent-3"]
    assert len(hooked) == 1
    assert_lost_to(backend, hooked[0])
    lines = retries_logged(logs)
    assert [(r.attempt, r.attempts) for r in lines] == [(1, 3), (2, 3)]
    # The app answered the last failure itself: one line says so, without a traceback.
    assert answered_logged(logs) == ["POST /rename"]
    assert logged(logs, logging.ERROR) == []
    assert served.errors() == [], served.log()
    no_connection_out(db)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_websocket_is_not_run_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """A socket's messages cannot be replayed: its lost race is raised after one run."""
    db = racy_db
    probe = Probe()

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        probe.runs.append(("socket", db.attempt))
        await in_db(db, losing(checker))

    app = starlette_app(db, [WebSocketRoute("/socket", socket)], retries=3)
    sent: list[Message] = []
    connected = False

    async def receive() -> Message:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope("GET", "/socket", type="websocket", scheme="ws", subprotocols=[])
    with anyio.fail_after(LONG_WAIT), pytest.raises(DBAPIError) as raised:
        await app(scope, receive, send)

    assert_lost_to(backend, raised.value)
    assert probe.attempts("socket") == [1]
    assert [m["type"] for m in sent] == ["websocket.accept"]
    assert counters() == {1: 1, 2: 0}
    assert retries_logged(logs) == []
    no_connection_out(db)


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("retries", -1),
        ("retries", True),
        ("retries", 1.5),
        ("retries", "2"),
        ("retries", None),
        ("retry_body_limit", -1),
        ("retry_body_limit", False),
        ("retry_body_limit", 1024.0),
        ("retry_body_limit", "1024"),
    ],
)
async def test_invalid_options_are_refused(
    make_db: DatabaseFactory, option: str, value: Any
) -> None:
    """A wrong count or limit is refused when the middleware is made, naming the option."""
    db = make_db()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=option):
        SessionMiddleware(app, db=db, **{option: value})
    middleware = SessionMiddleware(app, db=db, retries=0, retry_body_limit=0)
    assert (middleware.retries, middleware.retry_body_limit) == (0, 0)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_lost_races_raised_by_the_app_s_tasks_run_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """A lost race raised in a task of the app's own task group escapes as an exception
    group: the request runs again all the same."""
    db = racy_db
    probe = Probe()

    async def grouped(request: Request) -> Response:
        attempt = db.attempt
        probe.runs.append(("grouped", attempt))
        async with anyio.create_task_group() as tasks:
            if attempt == 1:
                tasks.start_soon(in_db, db, losing(checker))
            else:
                tasks.start_soon(in_db, db, partial(increment, 2))
        return PlainTextResponse(f"attempt {attempt}")

    app = starlette_app(db, [Route("/grouped", grouped, methods=["POST"])], retries=2)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/grouped")
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (200, "attempt 2")
    assert probe.attempts("grouped") == [1, 2]
    assert counters() == {1: 1, 2: 1}
    lines = retries_logged(logs)
    assert [(r.code, r.attempt) for r in lines] == [(RACE_LOG[backend.name], 1)]
    assert served.errors() == [], served.log()
    no_connection_out(db)


# -- FastAPI, the session injected ------------------------------------------------------------


class Deposit(BaseModel):
    amount: int


def fastapi_app(db: Database[Any], checker: Engine, probe: Probe, **options: Any) -> FastAPI:
    """``POST /deposit`` loses its race in the endpoint on the first attempt; ``POST
    /rename`` at its commit. Both get the session from ``session_dependency``."""
    app = FastAPI()
    session_dep = Depends(session_dependency(db))

    def note(key: str, session: Any, background: BackgroundTasks) -> int:
        attempt = db.attempt
        assert session is db.session(), "the injected session is the attempt's"
        probe.runs.append((key, attempt))
        sessions.append(session)
        db.after_commit(partial(probe.callbacks.append, f"{key}-{attempt}"))
        background.add_task(probe.background.append, f"{key}-{attempt}")
        return attempt

    sessions: list[Any] = []
    app.state.sessions = sessions

    if db.is_async:

        @app.post("/deposit")
        async def deposit_async(
            deposit: Deposit, background: BackgroundTasks, session: AsyncSession = session_dep
        ) -> dict[str, int]:
            attempt = note("deposit", session, background)
            if attempt == 1:
                await session.run_sync(lose_race, checker)
            await session.execute(SET, {"n": deposit.amount, "id": 2})
            return {"attempt": attempt, "amount": deposit.amount}

        @app.post("/rename")
        async def rename_async(
            background: BackgroundTasks, session: AsyncSession = session_dep
        ) -> dict[str, int]:
            attempt = note("rename", session, background)
            item = (await session.scalars(sa.select(Item))).one()
            if attempt == 1:
                rename_concurrently(checker, item.id, "concurrent")
            item.name = f"attempt-{attempt}"
            return {"attempt": attempt}

    else:

        @app.post("/deposit")
        def deposit(
            deposit: Deposit, background: BackgroundTasks, session: Session = session_dep
        ) -> dict[str, int]:
            attempt = note("deposit", session, background)
            if attempt == 1:
                lose_race(session, checker)
            session.execute(SET, {"n": deposit.amount, "id": 2})
            return {"attempt": attempt, "amount": deposit.amount}

        @app.post("/rename")
        def rename(background: BackgroundTasks, session: Session = session_dep) -> dict[str, int]:
            attempt = note("rename", session, background)
            item = session.scalars(sa.select(Item)).one()
            if attempt == 1:
                rename_concurrently(checker, item.id, "concurrent")
            item.name = f"attempt-{attempt}"
            return {"attempt": attempt}

    app.add_middleware(SessionMiddleware, db=db, **options)
    return app


async def test_fastapi_request_with_injected_session_runs_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
) -> None:
    """A FastAPI endpoint given the session by ``session_dependency`` and its body as a
    model runs again in a new session with the same body, whether it lost its race in the
    endpoint or at the commit; the discarded attempts' background tasks never run."""
    db = racy_db
    store_item(checker, "original")
    probe = Probe()
    app = fastapi_app(db, checker, probe, retries=2)
    async with serve(app) as served:
        async with client(served) as http:
            deposit = await http.post("/deposit", json={"amount": 42})
            rename = await http.post("/rename")
        await wait_until(lambda: len(probe.background) == 2)
        await wait_until(idle(db))

    assert (deposit.status_code, deposit.json()) == (200, {"attempt": 2, "amount": 42})
    assert (rename.status_code, rename.json()) == (200, {"attempt": 2})
    assert probe.runs == [("deposit", 1), ("deposit", 2), ("rename", 1), ("rename", 2)]
    sessions = app.state.sessions
    assert len({id(session) for session in sessions}) == 4, "a new session per attempt"
    assert sorted(probe.callbacks) == ["deposit-2", "rename-2"]
    assert sorted(probe.background) == ["deposit-2", "rename-2"]
    assert counters() == {1: 1, 2: 42}
    assert rows() == ["attempt-2"]
    lines = retries_logged(logs)
    assert [(r.label, r.code, r.attempt) for r in lines] == [
        ("POST /deposit", RACE_LOG[backend.name], 1),
        ("POST /rename", RACE_LOG[backend.name], 1),
    ]
    assert errors_logged(logs) == []
    assert served.errors() == [], served.log()
    no_connection_out(db)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_cleanup_that_stored_after_the_lost_commit_is_not_run_again(
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
) -> None:
    """The commit lost its race, and the cleanup of a FastAPI dependency then stored a row
    in a ``db.begin()`` of its own: running the request again would store it twice, so the
    client gets the usual answer to a failed commit, logged once at ERROR."""
    db = racy_db
    store_item(checker, "original")
    probe = Probe()
    app = FastAPI()

    async def audited() -> AsyncIterator[int]:
        attempt = db.attempt
        try:
            yield attempt
        finally:
            await nested_item(db, f"audit-{attempt}")

    audit = Depends(audited)

    @app.post("/rename")
    async def rename(attempt: int = audit) -> dict[str, int]:
        probe.runs.append(("rename", attempt))
        item = await in_db(db, load_item)
        await anyio.to_thread.run_sync(rename_concurrently, checker, item.id, "concurrent")
        item.name = "renamed"  # flushed by the commit at the start, which loses
        probe.returned.append(("rename", attempt))
        return {"attempt": attempt}

    app.add_middleware(SessionMiddleware, db=db, retries=3)
    async with serve(app) as served:
        async with client(served) as http:
            answer = await http.post("/rename")
        await wait_until(idle(db))

    assert (answer.status_code, answer.text) == (500, "Internal Server Error")
    assert probe.returned == [("rename", 1)]
    assert rows() == ["concurrent", "audit-1"]
    assert retries_logged(logs) == []
    assert logged(logs, logging.ERROR) == [NOT_RUN_AGAIN]
    assert served.errors() == [], served.log()
    no_connection_out(db)


# -- clients that leave, requests cancelled ---------------------------------------------------


# How the request learns that its client left, and what its attempt then loses:
# "told-before" / "told-after": the app's 'receive' said 'http.disconnect' (its unit opened
# before or after that), then the endpoint lost a race; "unnoticed": the attempt never asked
# nor read its body, lost a race, and the middleware finds the client gone (the body message
# the server still held, then the disconnect); "seen-in-endpoint" / "seen-at-commit": the app
# read the whole body and never asked again, and the middleware finds the client gone once
# the attempt lost its race in the endpoint or at the commit.
GONE = ["told-before", "told-after", "unnoticed", "seen-in-endpoint", "seen-at-commit"]


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
@pytest.mark.parametrize("how", GONE)
async def test_client_gone_is_not_run_again(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    logs: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """A request whose client is known to have left is not run again: nobody waits for
    another attempt. The lost race gets its usual failure (to nobody), the discarded
    attempt's writes are rolled back, and nothing is left behind."""
    db = racy_db
    store_item(checker, "original")
    probe = Probe()
    closed = threading.Event()

    async def wait_for_client(request: Request) -> Response:
        attempt = db.attempt
        probe.runs.append(("gone", attempt))
        if how == "told-before":
            await in_db(db, read_counter)
        if how.startswith("seen-"):
            await request.body()
            item = await in_db(db, load_item)
            assert await anyio.to_thread.run_sync(closed.wait, LONG_WAIT)
        elif how == "unnoticed" and attempt == 1:
            assert await anyio.to_thread.run_sync(closed.wait, LONG_WAIT)
        else:
            with anyio.fail_after(LONG_WAIT):
                while (await request.receive())["type"] != "http.disconnect":
                    pass
        probe.returned.append(("gone", attempt))
        if how == "seen-at-commit":
            await anyio.to_thread.run_sync(rename_concurrently, checker, item.id, "concurrent")
            item.name = "renamed"  # flushed by the commit at the start, which loses
        else:
            await in_db(db, losing(checker))
        return PlainTextResponse("nobody is listening")

    app = starlette_app(db, [Route("/gone", wait_for_client, methods=["POST"])], retries=3)
    async with serve(app) as served:
        stream = await anyio.connect_tcp("127.0.0.1", served.port)
        request = "POST /gone HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        await stream.send(request.encode())
        await wait_until(lambda: bool(probe.runs))
        await stream.aclose()
        if how.startswith("seen-") or how == "unnoticed":
            # The middleware asks without waiting: let the server see the socket close first.
            await anyio.sleep(0.3)
        closed.set()
        if how == "seen-at-commit":
            await wait_until(lambda: bool(logged(logs, logging.ERROR)))
        else:
            # The last attempt's error escapes the app once the request is over.
            await wait_until(lambda: bool(served.errors()))
        await wait_until(idle(db))

    expected = [1]
    assert probe.attempts("gone") == expected
    assert [attempt for _, attempt in probe.returned] == expected
    assert [r.attempt for r in retries_logged(logs)] == expected[:-1]
    if how == "seen-at-commit":
        assert rows() == ["concurrent"]
        assert logged(logs, logging.ERROR) == [NOT_RUN_AGAIN]
        assert served.errors() == [], served.log()
    else:
        assert counters() == {1: len(expected), 2: 0}
        assert logged(logs, logging.ERROR) == []
        assert len(served.errors()) == 1, served.log()
    no_connection_out(db)


class CancelOnRetry(logging.Handler):
    """Cancels ``scope`` when the retry line is logged: the request is then in its backoff."""

    def __init__(self, scope: anyio.CancelScope) -> None:
        super().__init__(logging.WARNING)
        self.scope = scope
        self.fired = 0

    def emit(self, record: logging.LogRecord) -> None:
        if RETRY_LINE.fullmatch(record.getMessage()):
            self.fired += 1
            self.scope.cancel()


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_cancelled_during_the_backoff_leaves_nothing_behind(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """A request cancelled while it waits to run again (the server shutting down) ends
    there: no further attempt, nothing sent, every connection back."""
    db = racy_db
    probe = Probe()

    async def lose(request: Request) -> Response:
        probe.runs.append(("lose", db.attempt))
        await in_db(db, losing(checker))
        return PlainTextResponse("never sent")

    app = starlette_app(db, [Route("/lose", lose, methods=["POST"])], retries=3)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    sessionscope_logger = logging.getLogger("sessionscope")
    with anyio.fail_after(LONG_WAIT), anyio.CancelScope() as scope:
        handler = CancelOnRetry(scope)
        sessionscope_logger.addHandler(handler)
        try:
            await app(http_scope("POST", "/lose"), receive, send)
        finally:
            sessionscope_logger.removeHandler(handler)

    assert scope.cancelled_caught
    assert handler.fired == 1
    assert probe.attempts("lose") == [1]
    assert sent == []
    assert counters() == {1: 1, 2: 0}
    no_connection_out(db)


@pytest.mark.parametrize("backend", SQLITE, indirect=True)
async def test_cancelled_during_a_later_attempt_leaves_nothing_behind(
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    logs: pytest.LogCaptureFixture,
) -> None:
    """A request cancelled in its second attempt, with a transaction open on a connection,
    gives the connection back and stores nothing of that attempt."""
    db = racy_db
    probe = Probe()
    never = anyio.Event()

    async def lose_then_hang(request: Request) -> Response:
        attempt = db.attempt
        probe.runs.append(("hang", attempt))
        if attempt == 1:
            await in_db(db, losing(checker))
        await in_db(db, partial(increment, 2))
        probe.returned.append(("hang", attempt))
        await never.wait()
        return PlainTextResponse("never sent")

    app = starlette_app(db, [Route("/hang", lose_then_hang, methods=["POST"])], retries=3)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(app, http_scope("POST", "/hang"), receive, send)
        await wait_until(lambda: bool(probe.returned))
        assert db.sync_engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        tasks.cancel_scope.cancel()

    assert probe.runs == [("hang", 1), ("hang", 2)]
    assert sent == []
    assert counters() == {1: 1, 2: 0}, "the second attempt's increment was rolled back"
    assert [r.attempt for r in retries_logged(logs)] == [1]
    no_connection_out(db)
