"""``db.init_app(app)``: the teardown settle, the lazy WSGI unit and per-app databases, pushed
by the ways real apps and test suites use Flask (each test is a case that could break them).
"""

from __future__ import annotations

import gc
import http.client
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import copy_context
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, Response, abort, current_app, request, stream_with_context, url_for
from werkzeug.wrappers import Response as WerkzeugResponse

from sessionscope import Database

from .._models import Base, Item
from .._servers import fetch, wait_until, werkzeug_server
from ..conftest import Backend, assert_no_leaks, backend_params
from ._apps import answers_as_stored, items_app, leave_stream

sync_backends = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)

Rows = Callable[[], list[str]]


def memory_app(db: Database[Any], **config: Any) -> Flask:
    """An app on ``db`` (made without a URL) whose database is ``sqlite://``, tables made."""
    app = Flask(__name__)
    app.config.update(config, SQLALCHEMY_DATABASE_URI="sqlite://")
    db.init_app(app)
    with app.app_context():
        Base.metadata.create_all(db.sync_engine)

    @app.post("/<name>")
    def create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        return name, 201

    return app


# -- the teardown settle: what runs after the commit -------------------------------------------


@sync_backends
def test_teardown_appcontext_that_raises_never_gives_500_for_stored_data(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A 'teardown_appcontext' bug (it runs after the commit): the row is stored, so the
    client must not get a 500 for it, or it retries and stores it twice (rule 19)."""
    app = items_app(db)

    @app.teardown_appcontext
    def buggy(exc: BaseException | None) -> None:
        raise ValueError("teardown_appcontext bug")

    answers_as_stored(app, db, rows)
    assert_no_leaks(db, backend)


@sync_backends
def test_remove_in_teardown_appcontext_keeps_the_hooks_response(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """The commit fails and 'on_commit_error' answers 409; the SQLAlchemy-docs idiom
    'db.session.remove()' in 'teardown_appcontext' (README: 'harmless') must not turn it
    into an unhandled error and a 500 (rules 4, 20)."""

    def conflict(error: BaseException) -> WerkzeugResponse:
        return WerkzeugResponse("conflict", status=409)

    app = items_app(db, on_commit_error=conflict)

    @app.teardown_appcontext
    def shutdown_session(exc: BaseException | None) -> None:
        db.session.remove()

    with werkzeug_server(app) as port:
        assert fetch(port, "POST", "/dup") == (201, b"dup")
        reply = fetch(port, "POST", "/dup")  # unique name: the COMMIT fails
        wait_until(lambda: db.live_units == 0)
    assert reply == (409, b"conflict")
    assert rows() == ["dup"]
    assert_no_leaks(db, backend)


@sync_backends
def test_url_for_in_a_teardown_never_settles_before_the_other_teardowns(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A teardown function renders a link in a request context of its own (as an e-mail
    would), then another teardown function raises: the client gets a 500, so the request's
    row must not be stored (rule 19; README: 'one that raises rolls the request back')."""
    app = items_app(db)

    # Flask runs the teardown functions for the inner context too: only the request acts.
    @app.teardown_request
    def fails_last(exc: BaseException | None) -> None:  # runs second (reverse order)
        if request.path == "/paid":
            raise ValueError("teardown bug")

    @app.teardown_request
    def notify(exc: BaseException | None) -> None:  # runs first
        if request.path == "/paid":
            with app.test_request_context("/link"):
                url_for("create", name="x")

    answers_as_stored(app, db, rows)
    assert_no_leaks(db, backend)


@sync_backends
@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "stream_with_context"])
def test_request_context_inside_a_stream_never_commits_it_early(
    db: Database[Any], rows: Rows, backend: Backend, wrap: bool
) -> None:
    """A streamed body pushes a request context of its own (to render a link, a template)
    after writing, then the client goes away: the body's writes roll back, as they do
    without that context (rule 9)."""
    app = items_app(db)

    @app.get("/stream")
    def stream() -> Response:
        db.session.add(Item(name="before"))

        def body() -> Iterator[str]:
            yield "x" * 65_536
            db.session.add(Item(name="during"))
            db.session.flush()
            with app.test_request_context("/"):
                yield url_for("create", name="x")
            for _ in range(2_000):
                yield "x" * 65_536
                time.sleep(0.001)

        return Response(stream_with_context(body()) if wrap else body())

    with werkzeug_server(app) as port:
        leave_stream(port)
        wait_until(lambda: db.live_units == 0)
    assert rows() == ["before"]
    assert_no_leaks(db, backend)


# -- in-memory SQLite under a Flask test suite -------------------------------------------------


@pytest.mark.parametrize("release", ["commit", "close", "none"])
def test_memory_database_test_that_reads_between_requests(
    release: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The common Flask test: inside the fixture's app context, send a request, read what it
    stored, send another. The read holds the one connection until the app context's session
    lets it go (README): with a commit or close the next request runs; without, it waits
    'pool_timeout' and gets a 503, with nothing half-stored."""
    db: Database[Any] = Database()
    app = memory_app(db, SQLALCHEMY_ENGINE_OPTIONS={"pool_timeout": 0.5})
    client = app.test_client()
    try:
        with app.app_context():
            assert client.post("/first").status_code == 201
            assert db.session.scalar(sa.select(sa.func.count()).select_from(Item)) == 1
            if release == "commit":
                db.session.commit()
            elif release == "close":
                db.session.close()
            status = client.post("/second").status_code
            if release == "none":
                assert status == 503
                assert "POST /second got no connection to sqlite://" in caplog.text
                db.session.commit()
            else:
                assert status == 201
            count = db.session.scalar(sa.select(sa.func.count()).select_from(Item))
            assert count == (1 if release == "none" else 2)
    finally:
        with app.app_context():
            db.dispose()


# -- per-app databases -------------------------------------------------------------------------


def test_code_outside_any_app_is_refused_also_once_the_apps_are_collected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: outside any app, 'db.session' and 'db.begin()' 'are refused, since they could
    not tell which database to use'. That must not turn into a silent write to
    ./sessionscope.sqlite3 once the test suite's apps have been garbage collected."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    db: Database[Any] = Database()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    db.init_app(app)
    with pytest.raises(RuntimeError, match="outside any app"), db.begin() as session:
        session.execute(sa.text("SELECT 1"))
    del app
    gc.collect()
    try:
        with pytest.raises(RuntimeError, match="outside any app"), db.begin() as session:
            session.execute(sa.text("SELECT 1"))
    finally:
        db.dispose()
    assert not (tmp_path / "sessionscope.sqlite3").exists()


# -- errors around the settle ------------------------------------------------------------------


@sync_backends
@pytest.mark.parametrize("testing", [False, True], ids=["production", "testing"])
def test_abort_in_teardown_request_rolls_back_and_leaks_nothing(
    db: Database[Any], rows: Rows, backend: Backend, testing: bool
) -> None:
    """'abort(403)' in a 'teardown_request' function (Flask lets it escape): the request's
    row is not stored, the error reaches the caller, nothing stays open (rules 5, 8)."""
    app = items_app(db)
    app.testing = testing

    @app.teardown_request
    def forbid(exc: BaseException | None) -> None:
        abort(403)

    with pytest.raises(Exception) as raised:
        app.test_client().post("/denied")
    assert "403" in str(raised.value)
    assert rows() == []
    assert_no_leaks(db, backend)


@sync_backends
@pytest.mark.parametrize("where", ["after_request", "after_this_request"])
def test_after_request_that_raises_rolls_back(
    db: Database[Any], rows: Rows, backend: Backend, where: str
) -> None:
    """An 'after_request' function that raises turns the 201 into a 500: the row must not be
    stored (rule 3), and nothing stays open."""
    app = items_app(db)

    def broken(response: Response) -> Response:
        raise ValueError("after_request bug")

    if where == "after_request":
        app.after_request(broken)
    else:

        @app.before_request
        def register() -> None:
            from flask import after_this_request

            after_this_request(broken)

    with werkzeug_server(app) as port:
        status, _ = fetch(port, "POST", "/late")
        wait_until(lambda: db.live_units == 0)
    assert status == 500
    assert rows() == []
    assert_no_leaks(db, backend)


@sync_backends
@pytest.mark.parametrize("propagate", [False, True])
def test_view_error_in_testing_mode_rolls_back(
    db: Database[Any], rows: Rows, backend: Backend, propagate: bool
) -> None:
    """With 'PROPAGATE_EXCEPTIONS' Flask re-raises the view's error to the test client: the
    flushed row is rolled back, the unit ends (rule 5)."""
    app = items_app(db)
    app.config["PROPAGATE_EXCEPTIONS"] = propagate

    @app.post("/fails")
    def fails() -> str:
        db.session.add(Item(name="lost"))
        db.session.flush()
        raise ZeroDivisionError

    client = app.test_client()
    if propagate:
        with pytest.raises(ZeroDivisionError):
            client.post("/fails")
    else:
        assert client.post("/fails").status_code == 500
    assert client.post("/kept").status_code == 201
    assert rows() == ["kept"]
    assert_no_leaks(db, backend)


@sync_backends
def test_error_handler_that_answers_200_for_an_unhandled_error(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """An 'errorhandler(500)' answering 200 for an error the view raised after writing: the
    client is told it worked, so the row must be stored, or the 200 is a lie (rule 3: the
    status decides; rule 4: no 2xx for lost data)."""
    app = items_app(db)

    @app.errorhandler(500)
    def soft(error: Exception) -> tuple[str, int]:
        return "handled", 200

    @app.post("/soft")
    def soft_view() -> str:
        db.session.add(Item(name="soft"))
        raise ZeroDivisionError

    reply = app.test_client().post("/soft")
    stored_rows = rows()
    assert_no_leaks(db, backend)
    assert (reply.status_code < 400) == (stored_rows == ["soft"]), (reply.status, stored_rows)


# -- streams and work after the response -------------------------------------------------------


@sync_backends
def test_plain_generator_that_writes_then_raises_rolls_back(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A body without 'stream_with_context' writes then raises: its writes roll back, the
    view's are stored, nothing stays open (rule 9)."""
    app = items_app(db)

    @app.get("/stream")
    def stream() -> Response:
        db.session.add(Item(name="view"))

        def body() -> Iterator[str]:
            yield "a"
            db.session.add(Item(name="body"))
            db.session.flush()
            raise ZeroDivisionError

        return Response(body())

    with werkzeug_server(app) as port:
        with pytest.raises(http.client.HTTPException):
            fetch(port, "GET", "/stream")
        wait_until(lambda: db.live_units == 0)
    assert rows() == ["view"]
    assert_no_leaks(db, backend)


@sync_backends
def test_call_on_close_of_a_stream_the_client_left_never_drops_writes_silently(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """README: work in 'call_on_close' 'cannot use the request's session, which is gone: it
    gets an error'. When the client left a stream, it must get that error too, not a session
    whose writes are then rolled back without a word (rule 20)."""
    app = items_app(db)
    outcome: list[str] = []

    def after_response() -> None:
        try:
            db.session.add(Item(name="after"))
            db.session.flush()
            outcome.append("flushed")
        except RuntimeError:
            outcome.append("refused")

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            for _ in range(2_000):
                yield "x" * 65_536
                time.sleep(0.001)

        response = Response(body())
        response.call_on_close(after_response)
        return response

    with werkzeug_server(app) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/stream")
        response = connection.getresponse()
        response.read(70_000)
        response.close()
        connection.close()
        wait_until(lambda: bool(outcome) and db.live_units == 0)
    assert_no_leaks(db, backend)
    assert outcome == ["refused"] or rows() == ["after"], (outcome, rows())


@sync_backends
@pytest.mark.parametrize("first", ["after_commit", "set_rollback_only", "session"])
def test_thread_started_by_a_view_opens_the_unit_first(
    db: Database[Any], rows: Rows, backend: Backend, first: str
) -> None:
    """A view hands its work to a thread (context copied) that is the first to touch the
    unit, and waits for it: the unit is the request's, settled by its status (rules 3, 6)."""
    app = items_app(db)
    committed: list[str] = []

    @app.post("/threaded")
    def threaded() -> tuple[str, int]:
        def work() -> None:
            if first == "after_commit":
                db.after_commit(lambda: committed.append("yes"))
            elif first == "set_rollback_only":
                db.set_rollback_only()
            db.session.add(Item(name="threaded"))

        worker = threading.Thread(target=copy_context().run, args=(work,))
        worker.start()
        worker.join(10)
        return "ok", 201

    with werkzeug_server(app) as port:
        assert fetch(port, "POST", "/threaded") == (201, b"ok")
        wait_until(lambda: db.live_units == 0)
    assert rows() == ([] if first == "set_rollback_only" else ["threaded"])
    assert committed == (["yes"] if first == "after_commit" else [])
    assert_no_leaks(db, backend)


@sync_backends
def test_thread_that_outlives_the_request_gets_the_clear_error(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A thread started by a view (context copied) touches 'db.session' first after the
    response: it gets the error naming 'db.begin()', opens no unit, leaks nothing (8, 11)."""
    app = items_app(db)
    go = threading.Event()
    seen: list[str] = []

    def late() -> None:
        go.wait(10)
        try:
            db.session.add(Item(name="late"))
        except RuntimeError as exc:
            seen.append(str(exc))

    threads: list[threading.Thread] = []

    @app.post("/spawn")
    def spawn() -> tuple[str, int]:
        worker = threading.Thread(target=copy_context().run, args=(late,))
        worker.start()
        threads.append(worker)
        return "ok", 201

    with werkzeug_server(app) as port:
        assert fetch(port, "POST", "/spawn") == (201, b"ok")
        wait_until(lambda: db.live_units == 0)
        go.set()
        threads[0].join(10)
    assert len(seen) == 1, seen
    assert "db.begin()" in seen[0]
    assert rows() == []
    assert_no_leaks(db, backend)


@sync_backends
def test_async_teardown_request_writes_follow_the_status(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """An async 'teardown_request' function (run by asgiref in another thread) writes an
    audit row: it is the request's, committed with its 201 (rule 14)."""
    pytest.importorskip("asgiref")
    app = items_app(db)

    @app.teardown_request
    async def audit(exc: BaseException | None) -> None:
        if request.path == "/seen":
            db.session.add(Item(name="audit"))

    with werkzeug_server(app) as port:
        assert fetch(port, "POST", "/seen") == (201, b"seen")
        wait_until(lambda: db.live_units == 0)
    assert sorted(rows()) == ["audit", "seen"]
    assert_no_leaks(db, backend)


# -- one Database(), apps made and disposed while requests run --------------------------------


def _with_tables(path: Path) -> str:
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.NullPool)
    Base.metadata.create_all(engine)
    engine.dispose()
    return f"sqlite:///{path}"


def _stored(path: Path) -> list[str]:
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(sa.text("SELECT name FROM items ORDER BY id")))
    finally:
        engine.dispose()


def test_apps_registered_in_threads_while_others_serve_never_cross(tmp_path: Path) -> None:
    """Apps made in threads at once (an app per test under pytest-xdist's threads, a
    multi-tenant factory) while earlier apps serve requests: each row in its app's file."""
    db: Database[Any] = Database()
    barrier = threading.Barrier(8)
    apps: dict[int, Flask] = {}
    errors: list[BaseException] = []

    def build_and_serve(n: int) -> None:
        try:
            uri = _with_tables(tmp_path / f"t{n}.sqlite3")
            barrier.wait(10)
            app = Flask(f"tenant{n}")
            app.config["SQLALCHEMY_DATABASE_URI"] = uri
            db.init_app(app)

            @app.post("/<name>")
            def create(name: str) -> tuple[str, int]:
                db.session.add(Item(name=name))
                return name, 201

            apps[n] = app
            client = app.test_client()
            for k in range(10):
                assert client.post(f"/t{n}-{k}").status_code == 201
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build_and_serve, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert errors == []
        for n in range(8):
            assert _stored(tmp_path / f"t{n}.sqlite3") == [f"t{n}-{k}" for k in range(10)]
        assert (db.live_units, db.live_sessions) == (0, 0)
    finally:
        for app in apps.values():
            with app.app_context():
                db.dispose()


# -- the second commit, of what 'teardown_appcontext' functions write ---------------------------


@sync_backends
def test_teardown_appcontext_writes_are_flushed_inside_the_app_context(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A 'before_flush' listener reads 'current_app' (as one stamping 'current_user' does),
    and a 'teardown_appcontext' function writes an audit row: README says it is committed
    in a second commit, and rule 14 says flushes run inside the app context, so the row is
    stored (not logged as a failure outside the context)."""
    app = items_app(db)
    seen: list[str] = []

    def stamp(session: Any, context: object, instances: object) -> None:
        seen.append(current_app.name)

    @app.teardown_appcontext
    def audit(exc: BaseException | None) -> None:
        db.session.add(Item(name="audit"))

    sa.event.listen(db.session, "before_flush", stamp)
    try:
        with werkzeug_server(app) as port:
            assert fetch(port, "POST", "/page") == (201, b"page")
            wait_until(lambda: db.live_units == 0)
    finally:
        sa.event.remove(db.session, "before_flush", stamp)
    assert sorted(rows()) == ["audit", "page"]
    assert seen == [app.name, app.name]
    assert_no_leaks(db, backend)


@sync_backends
@pytest.mark.parametrize(
    ("method", "status", "streamed"),
    [("HEAD", 200, False), ("GET", 204, True), ("GET", 304, True), ("HEAD", 201, True)],
)
def test_bodiless_responses_commit_and_end_with_teardown_writes(
    db: Database[Any], rows: Rows, backend: Backend, method: str, status: int, streamed: bool
) -> None:
    """HEAD, 204 and 304 send no body (Werkzeug never iterates it): the view's write and a
    'teardown_appcontext' write are committed, and nothing stays in a transaction."""
    app = items_app(db)

    @app.route("/empty", methods=["GET", "HEAD"])
    def empty() -> Response:
        db.session.add(Item(name="view"))

        def body() -> Iterator[str]:
            db.session.add(Item(name="never"))
            yield "never sent"

        return Response(body() if streamed else "body", status=status)

    @app.teardown_appcontext
    def audit(exc: BaseException | None) -> None:
        db.session.add(Item(name="audit"))

    with werkzeug_server(app) as port:
        assert fetch(port, method, "/empty") == (status, b"")
        wait_until(lambda: db.live_units == 0)
    assert sorted(rows()) == ["audit", "view"]
    assert_no_leaks(db, backend)
