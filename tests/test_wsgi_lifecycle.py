"""The request lifecycle, shared by ``WSGISessionMiddleware`` and ``db.init_app(app)``.

Every scenario runs on both adapters and every sync backend: one test body, two adapters, so
that any difference between the plain-WSGI and the Flask path fails here.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import http.client
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn
from wsgiref.types import WSGIApplication

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from werkzeug.exceptions import Conflict, HTTPException, NotFound, UnprocessableEntity
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from sessionscope import Database
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from ._models import Child, Item
from ._servers import fetch, gunicorn_server, wait_until, werkzeug_server
from .conftest import Backend, backend_params

pytestmark = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)

Rows = Callable[[], list[str]]


class Boom(Exception):
    """An error that a view raises and nothing handles."""


def boom(*args: object) -> NoReturn:
    """A listener or callback that fails."""
    raise Boom("boom")


@dataclass
class Reply:
    """What a view returns, the same for both adapters."""

    status: int = 200
    body: str | Iterable[str] = "ok"


View = Callable[[], Reply]


@pytest.fixture(params=["wsgi", "flask"])
def adapter(request: pytest.FixtureRequest) -> str:
    """The plain WSGI middleware, or the Flask extension."""
    return str(request.param)


def build(
    adapter: str, db: Database[Any], views: dict[str, View], **options: Any
) -> WSGIApplication:
    """An app serving ``views`` (path -> view) through ``adapter``."""
    if adapter == "wsgi":

        @Request.application
        def app(request: Request) -> Response:
            reply = views[request.path]()
            return Response(reply.body, status=reply.status)

        return WSGISessionMiddleware(app, db, **options)
    flask_app = Flask(__name__)
    for path, view in views.items():
        flask_app.add_url_rule(path, path, _endpoint(view), methods=["GET", "POST"])
    db.init_app(flask_app, **options)
    return flask_app


def _endpoint(view: View) -> Callable[[], Response]:
    def endpoint() -> Response:
        reply = view()
        return Response(reply.body, status=reply.status)

    return endpoint


def call(app: WSGIApplication, path: str = "/") -> tuple[int, bytes]:
    """POST ``path`` as a server would: read the body, close the response.

    An error the app lets out counts as the 500 a server sends for it (Flask answers it with
    a 500 itself).
    """
    try:
        with Client(app).post(path) as response:
            return response.status_code, response.get_data()
    except Boom:
        return 500, b""


def add(db: Database[Any], name: str, status: int = 201) -> View:
    """A view that stores an item named ``name`` and answers ``status``."""

    def view() -> Reply:
        db.session.add(Item(name=name))
        return Reply(status)

    return view


# -- commit or roll back by status -----------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 303])
def test_success_status_commits(adapter: str, db: Database[Any], rows: Rows, status: int) -> None:
    """A 2xx or 3xx response stores what the request wrote."""
    app = build(adapter, db, {"/": add(db, "created", status)})
    assert call(app)[0] == status
    assert rows() == ["created"]


@pytest.mark.parametrize("status", [400, 404, 409, 500])
def test_error_status_rolls_back(adapter: str, db: Database[Any], rows: Rows, status: int) -> None:
    """A handled error that becomes a 4xx or 5xx response stores nothing."""
    app = build(adapter, db, {"/": add(db, "refused", status)})
    assert call(app)[0] == status
    assert rows() == []


@pytest.mark.parametrize("error", [NotFound, Conflict, UnprocessableEntity])
def test_raised_http_exception_rolls_back(
    adapter: str, db: Database[Any], rows: Rows, error: type[HTTPException]
) -> None:
    """An HTTP error raised after a write ('abort(409)') answers its status and stores nothing."""

    def view() -> Reply:
        db.session.add(Item(name="refused"))
        db.session.flush()
        raise error()

    app = build(adapter, db, {"/": view, "/next": add(db, "next")})
    assert call(app)[0] == error.code
    assert rows() == []
    assert call(app, "/next")[0] == 201
    assert rows() == ["next"]


def test_unhandled_exception_rolls_back(adapter: str, db: Database[Any], rows: Rows) -> None:
    """A view that raises leaves nothing behind, and the next request still works."""

    def fails() -> Reply:
        db.session.add(Item(name="lost"))
        db.session.flush()
        raise Boom("view failed")

    app = build(adapter, db, {"/": fails, "/next": add(db, "next")})
    assert call(app)[0] == 500
    assert call(app, "/next")[0] == 201
    assert rows() == ["next"]


def test_custom_commit_predicate_decides(adapter: str, db: Database[Any], rows: Rows) -> None:
    """'commit_on' replaces the default rule: here a 404 commits and a 201 does not."""
    app = build(
        adapter,
        db,
        {"/404": add(db, "kept", 404), "/201": add(db, "dropped", 201)},
        commit_on=lambda status: status == 404,
    )
    assert call(app, "/404")[0] == 404
    assert call(app, "/201")[0] == 201
    assert rows() == ["kept"]


def test_rollback_only_rolls_back_a_success(adapter: str, db: Database[Any], rows: Rows) -> None:
    """A unit marked rollback-only stores nothing even with a 2xx (dry runs)."""

    def dry_run() -> Reply:
        db.session.add(Item(name="dry"))
        db.set_rollback_only()
        return Reply(200)

    app = build(adapter, db, {"/": dry_run})
    assert call(app)[0] == 200
    assert rows() == []


def test_after_commit_callbacks_run_only_after_a_commit(adapter: str, db: Database[Any]) -> None:
    """Callbacks run after a commit, in order; a rolled-back request drops its own."""
    calls: list[str] = []

    def view(name: str, status: int) -> View:
        def registered() -> Reply:
            db.after_commit(lambda: calls.append(f"{name}-1"))
            db.after_commit(boom)
            db.after_commit(lambda: calls.append(f"{name}-2"))
            db.session.add(Item(name=name))
            return Reply(status)

        return registered

    app = build(adapter, db, {"/ok": view("ok", 201), "/bad": view("bad", 400)})
    assert call(app, "/ok")[0] == 201
    assert call(app, "/bad")[0] == 400
    assert calls == ["ok-1", "ok-2"]


def test_statements_without_orm_objects_commit(adapter: str, db: Database[Any], rows: Rows) -> None:
    """Raw SQL and bulk statements count as writes: nothing looks at 'session.dirty' (19)."""

    def run(statement: sa.Executable) -> View:
        def view() -> Reply:
            db.session.execute(statement)
            return Reply(200)

        return view

    views = {
        "/text": run(sa.text("INSERT INTO items (name) VALUES ('text')")),
        "/insert": run(sa.insert(Item).values(name="insert")),
        "/update": run(sa.update(Item).where(Item.name == "text").values(name="updated")),
        "/delete": run(sa.delete(Item).where(Item.name == "insert")),
    }
    app = build(adapter, db, views)
    expected = [["text"], ["text", "insert"], ["updated", "insert"], ["updated"]]
    for path, stored in zip(views, expected, strict=True):
        assert call(app, path)[0] == 200
        assert sorted(rows()) == sorted(stored)


def test_ddl_commits_with_the_request(
    adapter: str, db: Database[Any], checker: Engine, backend: Backend
) -> None:
    """A table created in a request exists afterwards, and not after an error status (19)."""

    def create(name: str, status: int) -> View:
        def view() -> Reply:
            db.session.execute(sa.text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY)"))
            return Reply(status)

        return view

    app = build(adapter, db, {"/kept": create("ddl_kept", 201), "/gone": create("ddl_gone", 409)})
    assert call(app, "/kept")[0] == 201
    assert call(app, "/gone")[0] == 409
    tables = set(sa.inspect(checker).get_table_names())
    assert "ddl_kept" in tables
    if backend.name == "postgresql":
        # MariaDB commits DDL implicitly, and so does Python's sqlite3 module (it opens a
        # transaction only before INSERT, UPDATE, DELETE and REPLACE).
        assert "ddl_gone" not in tables
    with checker.begin() as connection:
        for name in ("ddl_kept", "ddl_gone"):
            connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))


# -- failed commits ----------------------------------------------------------------------------


def test_failed_commit_gives_500_and_stores_nothing(
    adapter: str, db: Database[Any], rows: Rows
) -> None:
    """A commit that fails never reaches the client as its 2xx, and the next request works."""

    def orphan() -> Reply:
        db.session.add(Item(name="lost"))
        db.session.add(Child(parent_id=999_999))  # refused at COMMIT (MariaDB: at its flush)
        return Reply(201, "created")

    app = build(adapter, db, {"/": orphan, "/next": add(db, "next"), "/third": add(db, "third")})
    assert call(app) == (500, b"Internal Server Error")
    assert rows() == []
    # On SQLite a failed COMMIT leaves the connection in its transaction unless reset.
    assert call(app, "/next")[0] == 201
    assert call(app, "/third")[0] == 201
    assert rows() == ["next", "third"]


def test_before_commit_listener_that_raises_aborts(
    adapter: str, db: Database[Any], rows: Rows
) -> None:
    """A pre-commit hook that raises rolls back and gives a 5xx; the next requests commit (34)."""

    def hooked() -> Reply:
        session = db.session()
        event.listen(session, "before_commit", boom)
        session.add(Item(name="refused"))
        return Reply(201)

    app = build(adapter, db, {"/": hooked, "/next": add(db, "next"), "/third": add(db, "third")})
    assert call(app)[0] == 500
    assert db.live_sessions == 0
    assert call(app, "/next")[0] == 201
    assert call(app, "/third")[0] == 201
    assert rows() == ["next", "third"]


def test_commit_error_hook_gives_the_response(adapter: str, db: Database[Any], rows: Rows) -> None:
    """'on_commit_error' maps the failed commit to the response the client gets."""

    def orphan() -> Reply:
        db.session.add(Child(parent_id=999_999))
        return Reply(201)

    def hook(error: BaseException) -> WSGIApplication:
        return Response(f"not stored: {type(error).__name__}", status=503)

    app = build(adapter, db, {"/": orphan, "/next": add(db, "next")}, on_commit_error=hook)
    status, body = call(app)
    assert status == 503
    assert body in (b"not stored: IntegrityError", b"not stored: PendingRollbackError")
    assert call(app, "/next")[0] == 201
    assert rows() == ["next"]


def test_after_commit_listener_that_raises_keeps_the_response(
    adapter: str, db: Database[Any], rows: Rows
) -> None:
    """The data is committed, so the 2xx stands; the next request gets a clean session (13)."""

    def hooked() -> Reply:
        session = db.session()
        event.listen(session, "after_commit", boom)
        session.add(Item(name="kept"))
        return Reply(201)

    app = build(adapter, db, {"/": hooked, "/next": add(db, "next")})
    assert call(app)[0] == 201
    assert call(app, "/next")[0] == 201
    assert rows() == ["kept", "next"]


# -- isolation between requests ----------------------------------------------------------------


def test_poisoned_session_is_not_reused(adapter: str, db: Database[Any], rows: Rows) -> None:
    """A session whose flush failed is never handed to the next request (04)."""
    sessions: list[Session] = []

    def duplicate() -> Reply:
        session = db.session()
        sessions.append(session)
        session.info["poisoned"] = True
        session.add(Item(name="taken"))
        with contextlib.suppress(sa.exc.IntegrityError):
            session.flush()
        return Reply(200, "swallowed")

    def healthy() -> Reply:
        session = db.session()
        sessions.append(session)
        session.add(Item(name="healthy"))
        return Reply(201, ",".join(session.info))

    app = build(adapter, db, {"/seed": add(db, "taken"), "/dup": duplicate, "/ok": healthy})
    assert call(app, "/seed")[0] == 201
    # Its transaction was lost with the flush, so the 200 it meant to send would be a lie.
    assert call(app, "/dup")[0] == 500
    assert call(app, "/ok") == (201, b"")
    assert sessions[0] is not sessions[1]
    assert rows() == ["taken", "healthy"]


def test_next_request_sees_fresh_data(adapter: str, db: Database[Any], checker: Engine) -> None:
    """Nothing cached by one request's session survives into the next (05a)."""
    sessions: list[Session] = []
    with checker.begin() as connection:
        connection.execute(sa.insert(Item).values(name="old"))

    def read() -> Reply:
        sessions.append(db.session())
        return Reply(200, db.session.scalars(sa.select(Item)).one().name)

    app = build(adapter, db, {"/": read})
    assert call(app) == (200, b"old")
    with checker.begin() as connection:
        connection.execute(sa.update(Item).values(name="new"))
    assert call(app) == (200, b"new")
    assert sessions[0] is not sessions[1]


def test_session_touched_after_the_request_raises(adapter: str, db: Database[Any]) -> None:
    """Work that outlives the request gets a clear error, never an orphan transaction (06)."""
    contexts: list[contextvars.Context] = []

    def view() -> Reply:
        db.session.execute(sa.text("SELECT 1"))
        contexts.append(contextvars.copy_context())
        return Reply(200)

    app = build(adapter, db, {"/": view})
    assert call(app)[0] == 200
    with pytest.raises(RuntimeError, match="already finished"):
        contexts[0].run(lambda: db.session.execute(sa.text("SELECT 1")))
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert db.live_sessions == 0


# -- streaming bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "stored"), [(200, ["before", "during"]), (400, [])], ids=["200", "400"]
)
def test_streamed_body_keeps_the_session(
    adapter: str, db: Database[Any], rows: Rows, status: int, stored: list[str]
) -> None:
    """The body streams with the request's session; its writes follow the status (rule 9)."""

    def stream() -> Reply:
        item = Item(name="before")
        db.session.add(item)

        def body() -> Iterator[str]:
            yield "start,"
            # Committed: still in the session; rolled back: the pending object was expunged.
            yield f"attached={item in db.session},"
            db.session.add(Item(name="during"))
            yield "end"

        return Reply(status, body())

    app = build(adapter, db, {"/": stream})
    attached = status < 400
    assert call(app) == (status, f"start,attached={attached},end".encode())
    assert rows() == stored


def test_body_closed_early_rolls_back_its_writes(
    adapter: str, db: Database[Any], rows: Rows
) -> None:
    """A body the server stops reading (client gone) rolls back what it wrote, and removes (20b)."""

    def stream() -> Reply:
        db.session.add(Item(name="before"))

        def body() -> Iterator[str]:
            yield "first"
            db.session.add(Item(name="during"))
            db.session.flush()
            yield "second"
            yield "never read"

        return Reply(200, body())

    app = build(adapter, db, {"/": stream})
    with Client(app).post("/", buffered=False) as response:
        chunks = iter(response.response)
        assert next(chunks) == b"first"
        assert next(chunks) == b"second"
        assert db.live_sessions == 1
    assert db.live_sessions == 0
    assert rows() == ["before"]


def test_registry_is_empty_after_every_exit_path(adapter: str, db: Database[Any]) -> None:
    """No path leaves a session in the registry or alive at all (12)."""
    sessions: weakref.WeakSet[Session] = weakref.WeakSet()
    counter = iter(range(1_000))

    def write(status: int = 201, *, fail: str = "") -> View:
        def view() -> Reply:
            if fail != "commit":
                # A failed commit is logged with its traceback, whose frames hold the
                # session for as long as pytest keeps the log record.
                sessions.add(db.session())
            db.session.add(Item(name=f"item-{next(counter)}"))
            if fail == "raise":
                raise Boom("view failed")
            if fail == "commit":
                db.session.add(Child(parent_id=999_999))
            if fail == "stream":

                def body() -> Iterator[str]:
                    yield "first"
                    db.session.add(Item(name=f"item-{next(counter)}"))
                    yield "second"

                return Reply(status, body())
            return Reply(status)

        return view

    views = {
        "/ok": write(),
        "/handled": write(409),
        "/raises": write(fail="raise"),
        "/commit-fails": write(fail="commit"),
        "/stream": write(fail="stream"),
    }
    app = build(adapter, db, views)
    for _ in range(5):
        for path in views:
            call(app, path)
            assert (db.live_units, db.live_sessions) == (0, 0), path
        with Client(app).post("/stream", buffered=False) as response:
            next(iter(response.response))
        assert (db.live_units, db.live_sessions) == (0, 0), "closed early"
        assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    gc.collect()
    assert len(sessions) == 0


# -- real servers ------------------------------------------------------------------------------


def test_concurrent_requests_each_get_their_own_session(
    adapter: str, db: Database[Any], rows: Rows
) -> None:
    """100 requests at once on a threaded server: each sees only its own session (05b)."""
    sessions: list[Session] = []
    lock = threading.Lock()

    def mark() -> Reply:
        marker = uuid.uuid4().hex
        session = db.session()
        with lock:
            sessions.append(session)
        session.info["marker"] = marker
        session.add(Item(name=marker))
        time.sleep(0.05)
        pending = ",".join(item.name for item in session.new)
        return Reply(201, f"{marker}|{db.session().info['marker']}|{pending}")

    app = build(adapter, db, {"/": mark})
    with werkzeug_server(app) as port, ThreadPoolExecutor(100) as pool:
        replies = list(pool.map(lambda _: fetch(port, "POST", "/"), range(100)))
        wait_until(lambda: db.live_units == 0)
    markers = []
    for status, body in replies:
        assert status == 201
        marker, seen, pending = body.decode().split("|")
        assert marker == seen == pending
        markers.append(marker)
    assert len({id(session) for session in sessions}) == 100
    assert sorted(rows()) == sorted(markers)


def test_client_gone_mid_stream_rolls_back_and_removes(
    adapter: str, db: Database[Any], rows: Rows
) -> None:
    """A client that hangs up mid-body costs no connection and stores no stream writes."""

    def stream() -> Reply:
        db.session.add(Item(name="before"))

        def body() -> Iterator[str]:
            yield "x" * 65_536
            db.session.add(Item(name="during"))
            db.session.flush()
            for _ in range(2_000):
                yield "x" * 65_536
                time.sleep(0.001)

        return Reply(200, body())

    app = build(adapter, db, {"/": stream})
    with werkzeug_server(app) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200
        response.read(70_000)
        wait_until(lambda: db.live_sessions == 1)
        response.close()
        connection.close()
        wait_until(lambda: db.live_units == 0)
    assert rows() == ["before"]


def test_gunicorn_threads_commit_refuse_and_replace(
    adapter: str, backend: Backend, rows: Rows
) -> None:
    """Under gunicorn with threads: 201 commits, 400 rolls back, a failed commit is a 500."""
    env = {"SESSIONSCOPE_TEST_URL": backend.url, "SESSIONSCOPE_TEST_ADAPTER": adapter}
    with gunicorn_server("tests._gunicorn_app:create()", env) as port:
        assert fetch(port, "GET", "/create/a") == (201, b"a")
        assert fetch(port, "GET", "/refuse/b")[0] == 400
        assert fetch(port, "GET", "/commit-fails/c") == (500, b"Internal Server Error")
        with ThreadPoolExecutor(8) as pool:
            statuses = pool.map(lambda n: fetch(port, "GET", f"/create/n{n}")[0], range(16))
            assert set(statuses) == {201}
        wait_until(lambda: fetch(port, "GET", "/leaks") == (200, b"0 0 0"))
    assert sorted(rows()) == sorted(["a", *(f"n{n}" for n in range(16))])
