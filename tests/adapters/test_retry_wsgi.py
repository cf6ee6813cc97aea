"""``WSGISessionMiddleware(app, db, retries=N)`` and ``db.init_app(app, retries=N)``: a
request whose transaction lost a race with a concurrent one runs again, with a fresh unit
and the same body, and nothing else does.

The races are real: concurrent requests through a threaded Werkzeug server (and gunicorn's
gthread worker) whose transactions overlap on the server, met at a barrier so that all have
read before any writes; or, where one request is enough, a request that reads a row, lets a
plain connection of the test change and commit it, then writes it (PostgreSQL SERIALIZABLE:
SQLSTATE 40001; MariaDB with ``innodb_snapshot_isolation``: 1020; SQLite in WAL mode under a
deferred ``BEGIN``: 517).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import flask
import pytest
import sqlalchemy as sa
from flask import Flask, g
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from sessionscope import Database
from sessionscope.middleware.wsgi import WSGISessionMiddleware

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
from .._servers import fetch, gunicorn_server, wait_until, werkzeug_server
from ..conftest import Backend, DatabaseFactory, backend_params

sync_backends = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
servers_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["postgresql", "mariadb"], modes=["sync"]), indirect=True
)
postgresql_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["postgresql"], modes=["sync"]), indirect=True
)
sqlite_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["sqlite"], modes=["sync"]), indirect=True
)

# The fixtures of ``_retry``, found by pytest under these names.
counters = pytest.fixture(counter_table)
racy_db = pytest.fixture(racy_database)

Rows = Callable[[], list[str]]

SET = sa.text("UPDATE retry_counters SET n = :n WHERE id = :id")

# Only a guard against a broken run waiting long on a row lock.
LOCK_GUARD = {
    "postgresql": "SET LOCAL lock_timeout = '10s'",
    "mariadb": "SET SESSION innodb_lock_wait_timeout = 10",
}

RETRY_LINE = re.compile(
    r"The request '(?P<method>[A-Z]+) (?P<path>\S+)' lost a race with a concurrent transaction"
    r" \((?P<code>[^)]+)\) on attempt (?P<attempt>\d+) of (?P<attempts>\d+); rolled back,"
    r" running it again\."
)
NOT_RUN_AGAIN = re.compile(r"The request lost a race\b.*\bnot run again\b.*")
# A failed commit at the response start names the request and the database; one after it
# (a stream's end) does not.
COMMIT_FAILED = re.compile(
    r"Commit failed( for [A-Z]+ \S+ on \S+)?; the unit of work was rolled back\."
)
FLASK_LOG = "Exception on /race [POST]"

# How many requests race at once through a real server.
CLIENTS = 4

# The app kinds: Flask answering the race with its 500 (production), Flask letting it out
# (PROPAGATE_EXCEPTIONS, as in testing), and a plain WSGI app under the middleware.
ADAPTERS = ["flask", "flask-propagate", "wsgi"]


class CounterBase(DeclarativeBase):
    pass


class Counter(CounterBase):
    """A row of ``retry_counters``, for writes the commit flushes."""

    __tablename__ = "retry_counters"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


@dataclass
class Seen:
    """What the app saw: each run's label and attempt number, the bodies it read, whose
    after-commit callbacks ran, and which runs' own code returned."""

    runs: list[tuple[str, int]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    committed: list[tuple[str, int]] = field(default_factory=list)
    returned: list[tuple[str, int]] = field(default_factory=list)

    def attempts(self, label: str = "") -> list[int]:
        return [attempt for who, attempt in self.runs if who == label]


def note_run(db: Database[Any], seen: Seen, label: str = "") -> int:
    """Note a run of the view: its attempt, and an after-commit callback naming it."""
    attempt = db.attempt
    seen.runs.append((label, attempt))
    db.after_commit(lambda: seen.committed.append((label, attempt)))
    return attempt


def bump(checker: Engine) -> None:
    """Another transaction increments counter 1 and commits."""
    with checker.begin() as connection:
        connection.execute(INCREMENT, {"id": 1})


def race_once(db: Database[Session], checker: Engine) -> None:
    """Lose the race on the first attempt; increment counter 1 on the others."""
    if db.attempt == 1:
        lose_race(db.session(), checker)
    else:
        db.session.execute(INCREMENT, {"id": 1})


# -- apps and clients ------------------------------------------------------------------------

View = Callable[[Request], tuple[int, str]]


def build(
    adapter: str, db: Database[Any], views: dict[str, View], **options: Any
) -> WSGIApplication:
    """An app serving ``views`` (path -> view) through ``adapter`` (see ``ADAPTERS``)."""
    if adapter == "wsgi":

        @Request.application
        def app(request: Request) -> Response:
            status, text = views[request.path](request)
            return Response(text, status=status)

        return WSGISessionMiddleware(app, db, **options)
    return flask_app(adapter, db, views, **options)


def flask_app(adapter: str, db: Database[Any], views: dict[str, View], **options: Any) -> Flask:
    app = Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = adapter == "flask-propagate"
    for path, view in views.items():
        app.add_url_rule(path, path, _endpoint(view), methods=["GET", "POST", "DELETE"])
    db.init_app(app, **options)
    return app


def _endpoint(view: View) -> Callable[[], tuple[str, int]]:
    def endpoint() -> tuple[str, int]:
        status, text = view(flask.request)
        return text, status

    return endpoint


def call(app: WSGIApplication, path: str = "/race", **request: Any) -> tuple[int, bytes]:
    """POST ``path`` through Werkzeug's client, as a server would: read, then close."""
    with Client(app).post(path, **request) as response:
        return response.status_code, response.get_data()


def call_raising(app: WSGIApplication, backend: Backend) -> tuple[int, bytes]:
    """``call``, for an app that lets the lost race out: the server's 500."""
    with pytest.raises(DBAPIError) as raised:
        call(app)
    assert driver_code(backend, raised.value) == RACE_CODE[backend.name]
    return 500, b""


def post(
    port: int,
    path: str,
    body: bytes | Iterable[bytes] | None = b"",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, bytes]:
    """One request over a new connection to a real server: the status and the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def race_all(port: int, path: str, clients: Iterable[str]) -> list[tuple[int, bytes]]:
    """POST ``path`` once per client at once, each naming itself in its body."""
    names = list(clients)
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda who: post(port, path, who.encode()), names))


# -- logs --------------------------------------------------------------------------------------


# The one line a failed commit answered by 'on_commit_error' is logged with.
ANSWERED = re.compile(
    r"Commit failed for (?P<label>[A-Z]+ \S+) on \S+ \((?P<error>.+)\); rolled back, and"
    r" answered by 'on_commit_error'\.",
    re.DOTALL,
)


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    """The retry lines logged, each checked against the documented format."""
    lines = [line for line in logged(caplog, logging.WARNING) if not ANSWERED.fullmatch(line)]
    matches = [RETRY_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    return [match for match in matches if match is not None]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Every record at ERROR or above, whoever logged it (Flask, Werkzeug, the library)."""
    return [record for record in caplog.records if record.levelno >= logging.ERROR]


def raised_for_race(record: logging.LogRecord, backend: Backend) -> bool:
    """Whether ``record`` carries the traceback of a lost race (the backend's code)."""
    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, DBAPIError) and driver_code(backend, error) == RACE_CODE[backend.name]


def flask_logged_the_race(caplog: pytest.LogCaptureFixture, backend: Backend) -> None:
    """Flask logged the lost race once, with its traceback, and nothing else is an error."""
    errors = errors_logged(caplog)
    assert [error.getMessage() for error in errors] == [FLASK_LOG]
    assert raised_for_race(errors[0], backend)


def server_logged_once(adapter: str, caplog: pytest.LogCaptureFixture, backend: Backend) -> None:
    """A lost race a real server answered with a 500 was logged once: by Flask, with its
    traceback, or by Werkzeug's server for an error a plain app let out (after it sent the
    500, so it is waited for)."""
    if adapter == "wsgi":
        wait_until(lambda: bool(errors_logged(caplog)))
        errors = errors_logged(caplog)
        assert len(errors) == 1, errors
        assert errors[0].name == "werkzeug"
        assert errors[0].getMessage().startswith("Error on request")
        assert "OperationalError" in errors[0].getMessage()
    else:
        errors = errors_logged(caplog)
        assert len(errors) == 1, errors
        assert raised_for_race(errors[0], backend), errors


def settled(db: Database[Any]) -> None:
    """The server's threads are done with the requests: every unit and connection is back.

    Waited for as a whole: a unit leaves the count of live ones before its session has
    given its connection back, in the thread that closes the response.
    """

    def back() -> bool:
        checked_out = db.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        return db.live_units == 0 and db.live_sessions == 0 and checked_out == 0

    wait_until(back)
    no_connection_out(db)


# -- 1. concurrent requests through real servers -------------------------------------------


def increment_view(db: Database[Session], backend_name: str, seen: Seen, clients: int) -> View:
    """A view that reads counter 1 and stores it plus one; on their first attempt the
    requests wait until all ``clients`` have read, so that all but one lose."""
    barrier = threading.Barrier(clients, timeout=LONG_WAIT)

    def increment(request: Request) -> tuple[int, str]:
        who = request.get_data(as_text=True)
        attempt = note_run(db, seen, who)
        if backend_name in LOCK_GUARD:
            db.session.execute(sa.text(LOCK_GUARD[backend_name]))
        read = int(db.session.execute(READ, {"id": 1}).scalar_one())
        if attempt == 1:
            barrier.wait()
        db.session.execute(SET, {"n": read + 1, "id": 1})
        return 201, str(read + 1)

    return increment


def check_increments(
    replies: list[tuple[int, bytes]],
    runs: list[tuple[str, int]],
    committed: list[tuple[str, int]],
    clients: list[str],
    counters: Counters,
) -> None:
    """Every client got its 201 with its own count, every increment is stored, and each
    request's last attempt (only it) ran its after-commit callback."""
    assert [status for status, _ in replies] == [201] * len(clients), replies
    assert sorted(int(body) for _, body in replies) == list(range(1, len(clients) + 1))
    assert counters()[1] == len(clients)
    assert sorted(who for who, _ in committed) == clients, "one callback per request"
    for who in clients:
        attempts = [attempt for name, attempt in runs if name == who]
        assert attempts == list(range(1, len(attempts) + 1)), (who, attempts)
        assert (who, attempts[-1]) in committed, "the last attempt's callback"
    assert max(attempt for _, attempt in runs) > 1


@sync_backends
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_concurrent_increments_through_a_threaded_server_all_count(
    adapter: str,
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests that each read the counter and store it plus one, all at once: every client
    gets its 201, every increment counts, each request's after-commit callback runs once,
    each retry is logged once, and no error is logged for them."""
    db: Database[Session] = racy_db
    seen = Seen()
    view = increment_view(db, backend.name, seen, CLIENTS)
    app = build(adapter, db, {"/increment": view}, retries=5)
    clients = [f"c{n}" for n in range(CLIENTS)]
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        replies = race_all(port, "/increment", clients)
        settled(db)

    check_increments(replies, seen.runs, seen.committed, clients, counters)
    lines = retry_lines(caplog)
    assert len(lines) == len(seen.runs) - CLIENTS, "one line per retry"
    assert len(lines) >= CLIENTS - 1, "all but the first writer lost their first attempt"
    for line in lines:
        assert (line["method"], line["path"], line["attempts"]) == ("POST", "/increment", "6")
        assert line["code"] in CONCURRENT_LOG[backend.name], line[0]
    assert errors_logged(caplog) == [], "a race run again is no error"


@servers_sync
@pytest.mark.parametrize("adapter", ["flask", "wsgi"])
def test_deadlock_between_two_requests_runs_the_victim_again(
    adapter: str,
    backend: Backend,
    counters: Counters,
    make_db: DatabaseFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two requests locking two rows in opposite orders deadlock; the victim runs again and
    both get their 201, so that each row is incremented by both exactly once."""
    db: Database[Session] = make_db()
    seen = Seen()
    barrier = threading.Barrier(2, timeout=LONG_WAIT)
    order = {"a": (1, 2), "b": (2, 1)}

    def lock_both(request: Request) -> tuple[int, str]:
        who = request.get_data(as_text=True)
        attempt = note_run(db, seen, who)
        db.session.execute(sa.text(LOCK_GUARD[backend.name]))
        db.session.execute(INCREMENT, {"id": order[who][0]})
        if attempt == 1:
            barrier.wait()  # each holds its first row before it asks for the other
        db.session.execute(INCREMENT, {"id": order[who][1]})
        return 201, who

    app = build(adapter, db, {"/lock": lock_both}, retries=3)
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        replies = race_all(port, "/lock", "ab")
        settled(db)

    assert replies == [(201, b"a"), (201, b"b")]
    assert counters() == {1: 2, 2: 2}
    assert sorted(attempt for _, attempt in seen.runs) == [1, 1, 2], seen.runs
    victim = next(who for who, attempt in seen.runs if attempt == 2)
    survivor = "b" if victim == "a" else "a"
    assert sorted(seen.committed) == sorted([(survivor, 1), (victim, 2)])
    lines = retry_lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0]["code"] == DEADLOCK_LOG[backend.name]
    assert (lines[0]["attempt"], lines[0]["attempts"]) == ("1", "4")
    assert errors_logged(caplog) == []


def _racy_options(backend_name: str) -> dict[str, Any]:
    """The options of ``racy_database`` (the WAL mode it sets stays in the SQLite file)."""
    if backend_name == "postgresql":
        return {"engine_options": {"isolation_level": "SERIALIZABLE"}}
    if backend_name == "mariadb":
        snapshot = "SET SESSION innodb_snapshot_isolation = ON"
        return {"engine_options": {"connect_args": {"init_command": snapshot}}}
    return {"sqlite_begin": "deferred"}


class _Records(logging.Handler):
    def __init__(self, into: list[tuple[str, str, str]]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append((record.levelname, record.name, record.getMessage()))


def gunicorn_app() -> WSGIApplication:
    """The Flask app the gunicorn tests serve, set up by environment: ``/increment`` races
    as in the threaded-server test, ``/bump`` loses to a connection of its own on its first
    attempt, ``/report`` says what the worker saw."""
    backend_name = os.environ["SESSIONSCOPE_TEST_BACKEND"]
    url = os.environ["SESSIONSCOPE_TEST_URL"]
    db: Database[Session] = Database(url, **_racy_options(backend_name))
    checker = sa.create_engine(url, poolclass=NullPool)
    seen = Seen()
    records: list[tuple[str, str, str]] = []
    logging.getLogger().addHandler(_Records(records))
    clients = int(os.environ["SESSIONSCOPE_TEST_CLIENTS"])
    views = {"/increment": increment_view(db, backend_name, seen, clients)}

    def bump_once(request: Request) -> tuple[int, str]:
        attempt = note_run(db, seen, "bump")
        race_once(db, checker)
        return 200, f"attempt {attempt}"

    views["/bump"] = bump_once
    app = flask_app("flask", db, views, retries=5)

    @app.get("/report")
    def report() -> dict[str, Any]:
        checked_out = db.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
        return {
            "runs": seen.runs,
            "committed": seen.committed,
            "records": records,
            "live_units": db.live_units,
            "checked_out": checked_out,
        }

    return app


def report_of(port: int) -> dict[str, Any]:
    status, body = fetch(port, "GET", "/report")
    assert status == 200, body
    report: dict[str, Any] = json.loads(body)
    return report


def quiet(port: int) -> bool:
    report = report_of(port)
    return bool(report["live_units"] == 0 and report["checked_out"] == 0)


def gunicorn_env(backend: Backend, clients: int) -> dict[str, str]:
    return {
        "SESSIONSCOPE_TEST_URL": backend.url,
        "SESSIONSCOPE_TEST_BACKEND": backend.name,
        "SESSIONSCOPE_TEST_CLIENTS": str(clients),
    }


GUNICORN_APP = "tests.adapters.test_retry_wsgi:gunicorn_app()"


@sync_backends
def test_concurrent_increments_under_gunicorn_threads_all_count(
    backend: Backend, counters: Counters, racy_db: Database[Any]
) -> None:
    """The same race under gunicorn's gthread worker (whose environ is not Werkzeug's: it
    sets 'wsgi.input_terminated' on every request): every request stored once, every
    client its 201, one retry line per retry and no error."""
    clients = [f"c{n}" for n in range(CLIENTS)]
    with gunicorn_server(GUNICORN_APP, gunicorn_env(backend, CLIENTS)) as port:
        replies = race_all(port, "/increment", clients)
        wait_until(lambda: quiet(port))
        report = report_of(port)

    runs = [(str(who), int(attempt)) for who, attempt in report["runs"]]
    committed = [(str(who), int(attempt)) for who, attempt in report["committed"]]
    check_increments(replies, runs, committed, clients, counters)
    warnings = [message for level, _, message in report["records"] if level == "WARNING"]
    assert len(warnings) == len(runs) - CLIENTS, report["records"]
    assert all(RETRY_LINE.fullmatch(line) for line in warnings), warnings
    assert [r for r in report["records"] if r[0] in ("ERROR", "CRITICAL")] == []


@sqlite_sync
@pytest.mark.parametrize("server", ["werkzeug", "gunicorn"])
def test_a_request_without_a_body_runs_again_on_any_server(
    server: str, backend: Backend, counters: Counters, racy_db: Database[Any]
) -> None:
    """A DELETE without a body (no Content-Length, no chunked transfer: HTTP says its body
    is empty) has nothing that could not be replayed: it runs again on every server, also
    under gunicorn, which sets 'wsgi.input_terminated' on every request."""
    if server == "werkzeug":
        db: Database[Session] = racy_db
        checker = sa.create_engine(backend.check_url, poolclass=NullPool)
        seen = Seen()

        def bump_once(request: Request) -> tuple[int, str]:
            attempt = note_run(db, seen)
            race_once(db, checker)
            return 200, f"attempt {attempt}"

        app = build("flask", db, {"/bump": bump_once}, retries=5)
        with werkzeug_server(app) as port:
            reply = post(port, "/bump", None, method="DELETE")
            settled(db)
        checker.dispose()
    else:
        with gunicorn_server(GUNICORN_APP, gunicorn_env(backend, 1)) as port:
            reply = post(port, "/bump", None, method="DELETE")
            wait_until(lambda: quiet(port))
    assert reply == (200, b"attempt 2")
    assert counters()[1] == 2


# -- 2. a commit that fails at settle time ------------------------------------------------


def _commit_time_work(db: Database[Session], checker: Engine, seen: Seen, always: bool) -> str:
    """Read counter 1 through the ORM, let another transaction change it (on the first
    attempt, or on every one with ``always``), and change it too: the UPDATE is flushed by
    the commit, which fails on the stale read."""
    attempt = note_run(db, seen)
    counter = db.session.get(Counter, 1)
    assert counter is not None
    if attempt == 1 or always:
        bump(checker)
    counter.n += 1
    seen.returned.append(("", attempt))
    return f"attempt {attempt}"


def commit_time_app(
    kind: str,
    db: Database[Session],
    checker: Engine,
    seen: Seen,
    always: bool = False,
    **options: Any,
) -> WSGIApplication:
    """An app whose commit (never its own code) meets the lost race.

    ``flask``: settled in Flask's teardown; ``werkzeug``: a Werkzeug response, settled once
    the app returned; ``list``: a list body; ``write``: the body given to ``write()``, which
    settles first; ``lazy``: a generator that calls ``start_response`` on first iteration,
    so that the commit runs after the app call returned.
    """
    if kind == "flask":
        app = Flask(__name__)
        db.init_app(app, **options)

        @app.post("/commit")
        def commit() -> tuple[str, int]:
            return _commit_time_work(db, checker, seen, always), 201

        return app

    if kind == "werkzeug":

        @Request.application
        def werkzeug_app(request: Request) -> Response:
            return Response(_commit_time_work(db, checker, seen, always), status=201)

        return WSGISessionMiddleware(werkzeug_app, db, **options)

    def raw_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        headers = [("Content-Type", "text/plain")]
        if kind == "lazy":

            def body() -> Iterator[bytes]:
                text = _commit_time_work(db, checker, seen, always)
                start_response("201 Created", headers)
                yield text.encode()

            return body()
        text = _commit_time_work(db, checker, seen, always)
        write = start_response("201 Created", headers)
        if kind == "write":
            write(text.encode())
            return []
        return [text.encode()]

    return WSGISessionMiddleware(raw_app, db, **options)


@sync_backends
def test_a_commit_that_lost_the_race_runs_the_request_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The view returned, the status is held, and the commit's flush fails on the stale
    read: the attempt is discarded before anything left, and the second one is what the
    client gets; the failed attempt's after-commit callback never runs. Whether the commit
    runs in Flask's teardown, once a plain app returned its response or a list, or at its
    first 'write()'."""
    db: Database[Session] = racy_db
    for number, kind in enumerate(["flask", "werkzeug", "list", "write"], start=1):
        seen = Seen()
        caplog.clear()
        app = commit_time_app(kind, db, checker, seen, retries=2)
        with caplog.at_level(logging.WARNING):
            reply = call(app, "/commit")

        assert reply == (201, b"attempt 2"), kind
        assert seen.returned == [("", 1), ("", 2)], "the app's own code never raised"
        assert seen.committed == [("", 2)], f"{kind}: the failed attempt's callback is dropped"
        assert counters()[1] == 2 * number, "the other transaction's increment and the retry's"
        lines = retry_lines(caplog)
        assert len(lines) == 1, (kind, lines)
        assert lines[0]["code"] == RACE_LOG[backend.name]
        assert (lines[0]["attempt"], lines[0]["attempts"]) == ("1", "3")
        assert lines[0]["path"] == "/commit"
        assert errors_logged(caplog) == [], f"{kind}: a failed commit run again is no error"
        no_connection_out(db)


@postgresql_sync
@pytest.mark.parametrize("adapter", ["flask", "wsgi"])
def test_write_skew_failing_at_commit_runs_the_loser_again(
    adapter: str,
    counters: Counters,
    racy_db: Database[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two SERIALIZABLE requests each read both counters and set their own to the sum plus
    one, flushed by the commit; both flush, then both COMMIT: the second COMMIT fails
    (write skew), and that request runs again and counts the first one's row."""
    db: Database[Session] = racy_db
    seen = Seen()
    barrier = threading.Barrier(2, timeout=LONG_WAIT)
    own = {"a": 1, "b": 2}

    def meet(session: Session, context: object) -> None:
        barrier.wait()  # both have flushed: the two COMMITs race

    def take(request: Request) -> tuple[int, str]:
        who = request.get_data(as_text=True)
        attempt = note_run(db, seen, who)
        session = db.session()
        if attempt == 1:
            event.listen(session, "after_flush", meet, once=True)
        total = sum(session.scalars(sa.select(Counter.n)))
        counter = session.get(Counter, own[who])
        assert counter is not None
        counter.n = total + 1
        seen.returned.append((who, attempt))
        return 201, str(total + 1)

    app = build(adapter, db, {"/take": take}, retries=4)
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        replies = race_all(port, "/take", "ab")
        settled(db)

    assert sorted(replies) == [(201, b"1"), (201, b"2")]
    assert sorted(counters().values()) == [1, 2], "the loser counted the winner's row"
    assert sorted(seen.runs) == sorted(seen.returned), "no view raised: a COMMIT failed"
    # The loser's retry may start while the winner's COMMIT is still in flight, overlap it
    # and lose again: it runs until it no longer overlaps.
    loser = next(who for who, attempt in seen.runs if attempt == 2)
    winner = "b" if loser == "a" else "a"
    attempts = seen.attempts(loser)
    assert attempts == list(range(1, len(attempts) + 1))
    assert seen.attempts(winner) == [1], "the first COMMIT won"
    assert sorted(seen.committed) == sorted([(winner, 1), (loser, attempts[-1])])
    lines = retry_lines(caplog)
    assert len(lines) == len(attempts) - 1, lines
    assert {line["code"] for line in lines} == {"SQLSTATE 40001"}
    assert lines[0]["attempt"] == "1"
    assert errors_logged(caplog) == []


# -- 3. the body each attempt reads ---------------------------------------------------------


PAYLOAD = {"name": "ünïcode", "note": "x" * 5000}


@sync_backends
@pytest.mark.parametrize("form", ["json", "form"])
def test_every_attempt_parses_the_whole_body(
    form: str,
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through a real server: the body Flask parsed on the first attempt (JSON, a form) is
    parsed again, whole, by the second."""
    db: Database[Session] = racy_db
    seen = Seen()

    def read_body(request: Request) -> tuple[int, str]:
        seen.bodies.append(request.get_json() if form == "json" else request.form.to_dict())
        attempt = note_run(db, seen)
        race_once(db, checker)
        return 201, f"attempt {attempt}"

    app = build("flask", db, {"/body": read_body}, retries=2)
    if form == "json":
        body = json.dumps(PAYLOAD).encode()
        headers = {"Content-Type": "application/json"}
    else:
        body = "&".join(f"{key}={value}" for key, value in PAYLOAD.items()).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        reply = post(port, "/body", body, headers)
        settled(db)

    assert reply == (201, b"attempt 2")
    assert seen.attempts() == [1, 2]
    assert seen.bodies == [PAYLOAD, PAYLOAD]
    assert counters()[1] == 2
    assert len(retry_lines(caplog)) == 1
    assert errors_logged(caplog) == []


@sqlite_sync
def test_a_plain_app_reads_the_body_and_a_fresh_environ_every_attempt(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain WSGI app that reads 'wsgi.input' to its end and marks its environ: each
    attempt reads the whole body again, in an environ without the last attempt's marks."""
    db: Database[Session] = racy_db
    seen = Seen()
    body = json.dumps(PAYLOAD).encode()

    def raw(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.bodies.append(("marked" in environ, environ["wsgi.input"].read()))
        environ["marked"] = True
        attempt = note_run(db, seen)
        race_once(db, checker)
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [f"attempt {attempt}".encode()]

    app = WSGISessionMiddleware(raw, db, retries=2)
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        reply = post(port, "/body", body, {"Content-Type": "application/octet-stream"})
        settled(db)

    assert reply == (201, b"attempt 2")
    assert seen.bodies == [(False, body), (False, body)]
    assert counters()[1] == 2
    assert len(retry_lines(caplog)) == 1
    assert errors_logged(caplog) == []


LIMIT = 64


@sqlite_sync
def test_a_body_longer_than_the_limit_runs_once(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A body of exactly ``retry_body_limit`` bytes is kept for another attempt; one byte
    more is not read ahead: the app reads it from the server once, whole, and its lost race
    is the usual 500 with Flask's error log."""
    db: Database[Session] = racy_db
    seen = Seen()

    def read_body(request: Request) -> tuple[int, str]:
        seen.bodies.append(request.get_data())
        attempt = note_run(db, seen)
        race_once(db, checker)
        return 201, f"attempt {attempt}"

    app = build("flask", db, {"/body": read_body}, retries=2, retry_body_limit=LIMIT)
    alphabet = bytes(range(97, 97 + 26)) * 3
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        kept = post(port, "/body", alphabet[:LIMIT], {"Content-Type": "text/plain"})
        settled(db)
        assert kept == (201, b"attempt 2")
        assert seen.attempts() == [1, 2]
        assert seen.bodies == [alphabet[:LIMIT]] * 2
        assert len(retry_lines(caplog)) == 1
        assert errors_logged(caplog) == []

        seen.runs.clear()
        seen.bodies.clear()
        caplog.clear()
        longer = post(port, "/body", alphabet[: LIMIT + 1], {"Content-Type": "text/plain"})
        settled(db)
    assert longer[0] == 500
    assert seen.attempts() == [1]
    assert seen.bodies == [alphabet[: LIMIT + 1]]
    assert counters()[1] == 3, "two increments of the other transaction, one of the retry"
    assert logged(caplog, logging.WARNING) == []
    server_logged_once("flask", caplog, backend)


@sqlite_sync
@pytest.mark.parametrize("adapter", ["flask", "wsgi"])
def test_a_chunked_body_is_replayed_up_to_the_limit(
    adapter: str,
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chunked request body (Werkzeug's server dechunks it and says the stream ends by
    itself) is read ahead up to ``retry_body_limit``: of exactly that length, every attempt
    reads it whole; one byte longer, the app reads the whole of it from the server, once,
    and a lost race is the usual 500."""
    db: Database[Session] = racy_db
    seen = Seen()

    def read_body(request: Request) -> tuple[int, str]:
        seen.bodies.append(request.get_data())
        attempt = note_run(db, seen)
        race_once(db, checker)
        return 201, f"attempt {attempt}"

    app = build(adapter, db, {"/body": read_body}, retries=2, retry_body_limit=LIMIT)
    within = [b"a" * 20, b"b" * 20, b"c" * (LIMIT - 40)]
    beyond = [b"x" * 20, b"y" * 20, b"z" * (LIMIT - 39)]
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        reply = post(port, "/body", iter(within), {"Content-Type": "text/plain"})
        settled(db)
        assert reply == (201, b"attempt 2")
        assert seen.attempts() == [1, 2]
        assert seen.bodies == [b"".join(within)] * 2
        assert len(retry_lines(caplog)) == 1
        assert errors_logged(caplog) == []

        seen.runs.clear()
        seen.bodies.clear()
        caplog.clear()
        reply = post(port, "/body", iter(beyond), {"Content-Type": "text/plain"})
        settled(db)
        server_logged_once(adapter, caplog, backend)

    assert reply[0] == 500
    assert seen.attempts() == [1]
    assert seen.bodies == [b"".join(beyond)], "the stream was read once, whole"
    assert counters()[1] == 3, "two increments of the other transaction, one of the retry"
    assert logged(caplog, logging.WARNING) == []


@sqlite_sync
def test_a_body_cut_short_by_the_client_runs_once(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that sends fewer bytes than its Content-Length and stops: the app gets what
    came, once, and a lost race is not run again on a body that is not whole."""
    db: Database[Session] = racy_db
    seen = Seen()

    def raw(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.bodies.append(environ["wsgi.input"].read())
        note_run(db, seen)
        race_once(db, checker)
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"stored"]

    app = WSGISessionMiddleware(raw, db, retries=2)
    with caplog.at_level(logging.WARNING), werkzeug_server(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(
                b"POST /short HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                b"Connection: close\r\n\r\nonly ten b"
            )
            client.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        settled(db)
        server_logged_once("wsgi", caplog, backend)

    assert answer.startswith(b"HTTP/1.1 500"), answer[:100]
    assert seen.attempts() == [1]
    assert seen.bodies == [b"only ten b"]
    assert counters()[1] == 1
    assert logged(caplog, logging.WARNING) == []


# -- 4. what is never run again -------------------------------------------------------------


@sync_backends
def test_a_generator_calling_start_response_lazily_is_not_run_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same work, its commit losing the race: with the status set during the app call
    the request runs again; set on a generator's first iteration, after the app call, its
    failed commit is the usual 500, logged as an error once."""
    db: Database[Session] = racy_db
    seen = Seen()
    with caplog.at_level(logging.WARNING):
        reply = call(commit_time_app("list", db, checker, seen, retries=2), "/commit")
    assert reply == (201, b"attempt 2")
    assert seen.attempts() == [1, 2]
    assert counters()[1] == 2
    assert len(retry_lines(caplog)) == 1

    seen = Seen()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reply = call(commit_time_app("lazy", db, checker, seen, retries=2), "/commit")
    assert reply == (500, b"Internal Server Error")
    assert seen.attempts() == [1]
    assert seen.committed == []
    assert counters()[1] == 3, "the other transaction's increment only"
    assert logged(caplog, logging.WARNING) == []
    [message] = logged(caplog, logging.ERROR)
    assert COMMIT_FAILED.fullmatch(message), message
    assert len(errors_logged(caplog)) == 1
    no_connection_out(db)


@sync_backends
@pytest.mark.parametrize("why", ["no_retry", "nested_begin", "own_commit", "retries_0"])
def test_a_request_that_must_not_run_again_is_not_run_again(
    why: str,
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request that said so (``db.no_retry()``), stored something already (a nested
    ``db.begin()`` that committed, its own ``db.session.commit()``), or runs under the
    default ``retries=0``, loses its race for good, on every adapter: one run, what it
    stored stays stored once, no retry line, and the error is the usual one (Flask's 500
    and its log, or raised to the server)."""
    db: Database[Session] = racy_db
    stored: list[str] = []
    for number, adapter in enumerate(["flask", "flask-propagate", "wsgi"], start=1):
        seen = Seen()
        caplog.clear()

        def race(request: Request, adapter: str = adapter, seen: Seen = seen) -> tuple[int, str]:
            note_run(db, seen)
            if why == "no_retry":
                db.no_retry()
            elif why == "nested_begin":
                with db.begin() as session:
                    session.add(Item(name=f"nested {adapter}"))
            elif why == "own_commit":
                db.session.add(Item(name=f"own {adapter}"))
                db.session.commit()
            lose_race(db.session(), checker)
            return 201, "stored"

        options = {} if why == "retries_0" else {"retries": 3}
        app = build(adapter, db, {"/race": race}, **options)
        with caplog.at_level(logging.WARNING):
            if adapter == "flask":
                assert call(app)[0] == 500
            else:
                call_raising(app, backend)

        assert seen.attempts() == [1], adapter
        assert counters()[1] == number
        if why in ("nested_begin", "own_commit"):
            stored.append(f"{why.split('_')[0]} {adapter}")
        assert rows() == stored
        assert logged(caplog, logging.WARNING) == [], adapter
        if adapter == "flask":
            flask_logged_the_race(caplog, backend)
        else:
            assert errors_logged(caplog) == [], adapter
        no_connection_out(db)


@sync_backends
def test_a_constraint_violation_is_not_run_again(
    backend: Backend,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A duplicate key is the request's own fault: running it again would fail the same
    way. Raised in the view (flushed there) or by the commit, it runs once."""
    db: Database[Session] = racy_db
    with checker.begin() as connection:
        connection.execute(sa.text("INSERT INTO items (name) VALUES ('taken')"))
    for adapter in ["flask", "wsgi"]:
        for where in ["view", "commit"]:
            seen = Seen()
            caplog.clear()

            def duplicate(
                request: Request, where: str = where, seen: Seen = seen
            ) -> tuple[int, str]:
                note_run(db, seen)
                db.session.add(Item(name="taken"))
                if where == "view":
                    db.session.flush()
                return 201, "stored"

            app = build(adapter, db, {"/race": duplicate}, retries=3)
            with caplog.at_level(logging.WARNING):
                if adapter == "wsgi" and where == "view":
                    with pytest.raises(IntegrityError):
                        call(app)
                else:
                    assert call(app)[0] == 500

            assert seen.attempts() == [1], (adapter, where)
            assert rows() == ["taken"]
            assert logged(caplog, logging.WARNING) == []
            messages = [error.getMessage() for error in errors_logged(caplog)]
            if where == "commit":
                assert len(messages) == 1, messages
                assert COMMIT_FAILED.fullmatch(messages[0]), messages
            elif adapter == "flask":
                assert messages == [FLASK_LOG]
            else:
                assert messages == []
            no_connection_out(db)


@sync_backends
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_attempts_run_out_and_the_last_error_is_the_usual_one(
    adapter: str,
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request that loses every race runs ``retries + 1`` times, logs a retry line for
    each but the last, then fails as it would without retries: Flask's 500 and its error
    log once, or the error raised to the server."""
    db: Database[Session] = racy_db
    seen = Seen()

    def always_lose(request: Request) -> tuple[int, str]:
        note_run(db, seen)
        lose_race(db.session(), checker)
        return 201, "stored"

    app = build(adapter, db, {"/race": always_lose}, retries=2)
    with caplog.at_level(logging.WARNING):
        if adapter == "flask":
            assert call(app)[0] == 500
        else:
            call_raising(app, backend)

    assert seen.attempts() == [1, 2, 3]
    assert seen.committed == []
    assert counters()[1] == 3, "only the other transaction's increments"
    lines = retry_lines(caplog)
    assert [(m["attempt"], m["attempts"]) for m in lines] == [("1", "3"), ("2", "3")]
    assert all(m["code"] == RACE_LOG[backend.name] for m in lines)
    if adapter == "flask":
        flask_logged_the_race(caplog, backend)
    else:
        assert errors_logged(caplog) == []
    no_connection_out(db)


@sync_backends
def test_a_commit_losing_every_race_ends_with_on_commit_error(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attempts run out at the commit: 'on_commit_error' answers the last one (only it), and
    its failed commit, which the app answered, is logged once, as answered."""
    db: Database[Session] = racy_db
    for number, kind in enumerate(["flask", "werkzeug"], start=1):
        seen = Seen()
        caplog.clear()
        replaced: list[BaseException] = []

        def on_commit_error(
            error: BaseException, replaced: list[BaseException] = replaced
        ) -> WSGIApplication:
            replaced.append(error)
            return Response("try again later", status=409)

        app = commit_time_app(
            kind, db, checker, seen, always=True, retries=2, on_commit_error=on_commit_error
        )
        with caplog.at_level(logging.WARNING):
            reply = call(app, "/commit")

        assert reply == (409, b"try again later"), kind
        assert seen.attempts() == [1, 2, 3]
        assert seen.committed == []
        assert len(replaced) == 1
        assert driver_code(backend, replaced[0]) == RACE_CODE[backend.name]
        assert counters()[1] == 3 * number
        lines = retry_lines(caplog)
        assert [(m["attempt"], m["attempts"]) for m in lines] == [("1", "3"), ("2", "3")]
        # The app answered the last failure itself: one line says so, without a traceback.
        answered = [ANSWERED.fullmatch(line) for line in logged(caplog, logging.WARNING)]
        assert len([m for m in answered if m is not None]) == 1
        assert errors_logged(caplog) == []
        no_connection_out(db)


# -- Flask's own handling of the error ------------------------------------------------------


def handled_race_app(
    db: Database[Session], checker: Engine, seen: Seen, status: int, rollback: bool = True
) -> Flask:
    """A Flask app whose view loses the race on its first attempt and whose 500 handler
    answers ``status`` (rolling the session back first, with ``rollback``)."""

    def race(request: Request) -> tuple[int, str]:
        attempt = note_run(db, seen)
        race_once(db, checker)
        return 201, f"attempt {attempt}"

    app = flask_app("flask", db, {"/race": race}, retries=2)

    @app.errorhandler(500)
    def handled(error: Exception) -> tuple[str, int]:
        if rollback:
            db.session.rollback()
        return "handled", status

    return app


@sync_backends
def test_a_race_answered_below_500_by_an_error_handler_is_not_run_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The app's 500 handler turned the lost race into a 200 or a 409: that response stands
    (the attempt is not discarded), and the error Flask's log was spared is logged once by
    the middleware, with its traceback."""
    db: Database[Session] = racy_db
    for number, status in enumerate([200, 409], start=1):
        seen = Seen()
        caplog.clear()
        app = handled_race_app(db, checker, seen, status)
        with caplog.at_level(logging.WARNING):
            reply = call(app)

        assert reply == (status, b"handled")
        assert seen.attempts() == [1]
        assert counters()[1] == number
        assert logged(caplog, logging.WARNING) == []
        errors = errors_logged(caplog)
        assert len(errors) == 1, errors
        assert NOT_RUN_AGAIN.fullmatch(errors[0].getMessage()), errors[0].getMessage()
        assert errors[0].name == "sessionscope"
        assert raised_for_race(errors[0], backend)
        no_connection_out(db)


@sync_backends
def test_a_race_answered_with_a_5xx_by_an_error_handler_runs_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 503 from the app's 500 handler is discarded with its attempt like Flask's own 500."""
    db: Database[Session] = racy_db
    seen = Seen()
    app = handled_race_app(db, checker, seen, 503)
    with caplog.at_level(logging.WARNING):
        reply = call(app)

    assert reply == (201, b"attempt 2")
    assert seen.attempts() == [1, 2]
    assert seen.committed == [("", 2)]
    assert counters()[1] == 2
    assert len(retry_lines(caplog)) == 1
    assert errors_logged(caplog) == []
    no_connection_out(db)


@sync_backends
def test_a_race_answered_200_without_rollback_is_refused_and_still_logged(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 500 handler that answers 200 without rolling back: the commit is refused (the
    failed statement was not rolled back), the client gets a 500, the request is not run
    again, and the lost race, spared Flask's log, is logged with its traceback."""
    db: Database[Session] = racy_db
    seen = Seen()
    app = handled_race_app(db, checker, seen, 200, rollback=False)
    with caplog.at_level(logging.WARNING):
        reply = call(app)

    assert reply == (500, b"Internal Server Error")
    assert seen.attempts() == [1]
    assert seen.committed == []
    assert counters()[1] == 1
    assert logged(caplog, logging.WARNING) == []
    errors = errors_logged(caplog)
    races = [error for error in errors if raised_for_race(error, backend)]
    assert len(races) == 1, errors
    assert NOT_RUN_AGAIN.fullmatch(races[0].getMessage()), races[0].getMessage()
    assert any(COMMIT_FAILED.fullmatch(error.getMessage()) for error in errors), errors
    no_connection_out(db)


def stores_in_teardown_app(db: Database[Session], checker: Engine, seen: Seen, where: str) -> Flask:
    """A Flask app whose view loses the race and whose teardown function (``where``) stores
    a row in a unit of its own."""

    def race(request: Request) -> tuple[int, str]:
        attempt = note_run(db, seen)
        race_once(db, checker)
        return 201, f"attempt {attempt}"

    app = flask_app("flask", db, {"/race": race}, retries=2)

    def audit(error: BaseException | None) -> None:
        with db.begin() as session:
            session.add(Item(name="audit"))

    if where == "teardown_request":
        app.teardown_request(audit)
    else:
        app.teardown_appcontext(audit)
    return app


@sync_backends
@pytest.mark.parametrize("where", ["teardown_request", "teardown_appcontext"])
def test_a_teardown_that_stored_something_keeps_the_request_from_running_again(
    where: str,
    backend: Backend,
    racy_db: Database[Any],
    counters: Counters,
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Flask caught the race, then a teardown function committed a row in a unit of its own
    (while the attempt's unit is still open, or once it has ended): running the request
    again would store that row twice, so it is not run again; its 500 is an unhandled
    error, logged once with the race's traceback."""
    db: Database[Session] = racy_db
    seen = Seen()
    app = stores_in_teardown_app(db, checker, seen, where)
    with caplog.at_level(logging.WARNING):
        reply = call(app)

    assert reply[0] == 500
    assert seen.attempts() == [1]
    assert rows() == ["audit"], "stored once"
    assert counters()[1] == 1
    assert logged(caplog, logging.WARNING) == []
    errors = errors_logged(caplog)
    assert len(errors) == 1, errors
    assert raised_for_race(errors[0], backend), errors
    assert NOT_RUN_AGAIN.fullmatch(errors[0].getMessage()), errors[0].getMessage()
    no_connection_out(db)


# -- 5. Flask's per-request state, per attempt ----------------------------------------------


@sync_backends
@pytest.mark.parametrize("adapter", ["flask", "flask-propagate"])
def test_flask_teardowns_and_g_belong_to_each_attempt(
    adapter: str,
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    rows: Rows,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each attempt is a request of its own to Flask: a fresh 'g', before_request run again,
    teardown functions run once per attempt (the first given the race's error), and what a
    teardown wrote in the discarded attempt is rolled back with it."""
    db: Database[Session] = racy_db
    seen = Seen()
    before: list[object] = []
    torn_down: list[tuple[object, object, BaseException | None]] = []
    contexts: list[tuple[object, BaseException | None]] = []

    def race(request: Request) -> tuple[int, str]:
        attempt = note_run(db, seen)
        g.view = attempt
        race_once(db, checker)
        return 201, f"attempt {attempt}"

    app = flask_app(adapter, db, {"/race": race}, retries=2)

    @app.before_request
    def fresh() -> None:
        before.append(g.get("attempt"))
        g.attempt = db.attempt

    @app.teardown_request
    def request_torn_down(error: BaseException | None) -> None:
        torn_down.append((g.attempt, g.get("view"), error))
        db.session.add(Item(name=f"teardown {db.attempt}"))

    @app.teardown_appcontext
    def context_torn_down(error: BaseException | None) -> None:
        contexts.append((g.attempt, error))

    with caplog.at_level(logging.WARNING):
        reply = call(app)

    assert reply == (201, b"attempt 2")
    assert before == [None, None], "every attempt starts with an empty 'g'"
    assert len(torn_down) == 2
    first, second = torn_down
    assert first[:2] == (1, 1)
    assert second == (2, 2, None)
    assert isinstance(first[2], DBAPIError)
    assert driver_code(backend, first[2]) == RACE_CODE[backend.name]
    assert contexts == [(1, first[2]), (2, None)]
    assert rows() == ["teardown 2"], "the discarded attempt's teardown write rolled back"
    assert counters()[1] == 2
    assert len(retry_lines(caplog)) == 1
    assert errors_logged(caplog) == []
    no_connection_out(db)


# -- configuration -----------------------------------------------------------------------------


INVALID: list[dict[str, Any]] = [
    {"retries": -1},
    {"retries": True},
    {"retries": 1.5},
    {"retries": "3"},
    {"retry_body_limit": -1},
    {"retry_body_limit": False},
    {"retry_body_limit": 1024.0},
    {"retry_body_limit": None},
]


@sqlite_sync
def test_invalid_retry_settings_are_refused(db: Database[Any]) -> None:
    """A setting that is not a whole number (0 or more) fails at start-up on both adapters,
    and a refused 'init_app' leaves the app as it was."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return []

    for options in INVALID:
        name = next(iter(options))
        with pytest.raises(ValueError, match=f"'{name}' must be a whole number"):
            WSGISessionMiddleware(app, db, **options)
        application = Flask(__name__)
        wsgi_app = application.wsgi_app
        with pytest.raises(ValueError, match=f"'{name}' must be a whole number"):
            db.init_app(application, **options)
        assert application.wsgi_app == wsgi_app
        db.init_app(application, retries=1, retry_body_limit=0)


@sqlite_sync
def test_a_zero_body_limit_still_runs_a_request_without_a_body_again(
    backend: Backend,
    counters: Counters,
    racy_db: Database[Any],
    checker: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """'retry_body_limit=0' keeps no body, but a request with none has nothing to keep; one
    byte of body is one too many."""
    db: Database[Session] = racy_db
    seen = Seen()

    def race(request: Request) -> tuple[int, str]:
        attempt = note_run(db, seen)
        race_once(db, checker)
        return 201, f"attempt {attempt}"

    app = build("flask", db, {"/race": race}, retries=1, retry_body_limit=0)
    with caplog.at_level(logging.WARNING):
        assert call(app) == (201, b"attempt 2")
        assert call(app, data=b"x")[0] == 500
    assert seen.attempts() == [1, 2, 1]
    assert len(retry_lines(caplog)) == 1
    flask_logged_the_race(caplog, backend)
    no_connection_out(db)
