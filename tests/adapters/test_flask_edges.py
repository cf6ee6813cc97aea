"""``db.init_app(app)`` at its edges: teardown functions, per-app databases, memory SQLite.

Each test is a way a real app or test suite uses Flask that the commit inside Flask's
contexts, the per-app databases or the one-connection in-memory database could get wrong.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask, Response, g, request, stream_with_context
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client, EnvironBuilder
from werkzeug.wrappers import Response as WerkzeugResponse

from sessionscope import Database

from .._models import Base, Child, Item
from .._servers import fetch, wait_until, werkzeug_server
from ..conftest import Backend, backend_params
from ._apps import answers_as_stored, items_app, leave_stream

sync_backends = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)

Rows = Callable[[], list[str]]


class NoteBase(DeclarativeBase):
    pass


class Note(NoteBase):
    """A row whose author comes from the request's 'g' when the INSERT runs."""

    __tablename__ = "edge_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(100))
    author: Mapped[str] = mapped_column(String(100), default=lambda: g.user)


@pytest.fixture
def notes(checker: Engine) -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """The ``edge_notes`` table for one test: (text, author) rows."""
    NoteBase.metadata.drop_all(checker)
    NoteBase.metadata.create_all(checker)

    def read() -> list[tuple[str, str]]:
        with checker.connect() as connection:
            stored = connection.execute(sa.select(Note.text, Note.author).order_by(Note.id))
            return [(text, author) for text, author in stored]

    yield read
    NoteBase.metadata.drop_all(checker)


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def stored(path: Path) -> list[str]:
    """The item names in the SQLite file at ``path``, read from outside."""
    engine = sa.create_engine(sqlite_uri(path), poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(sa.text("SELECT name FROM items ORDER BY id")))
    finally:
        engine.dispose()


def with_tables(path: Path) -> str:
    """An SQLite file at ``path`` with the test tables; its URI."""
    engine = sa.create_engine(sqlite_uri(path), poolclass=sa.NullPool)
    Base.metadata.create_all(engine)
    engine.dispose()
    return sqlite_uri(path)


def per_app(db: Database[Any], uri: str, name: str = "app", **config: Any) -> Flask:
    """An app on ``db`` (made without a URL) whose config names ``uri``; POST /<n> stores."""
    app = Flask(name)
    app.config.update(config, SQLALCHEMY_DATABASE_URI=uri)
    db.init_app(app)

    @app.post("/<item>")
    def create(item: str) -> tuple[str, int]:
        db.session.add(Item(name=item))
        return item, 201

    return app


def dispose_all(db: Database[Any], *apps: Flask) -> None:
    for app in apps:
        with app.app_context():
            db.dispose()


# -- teardown functions run before the commit, still inside Flask's contexts ----------------


@sync_backends
def test_teardown_that_raises_after_the_commit_never_gives_500_for_stored_data(
    db: Database[Any], rows: Rows
) -> None:
    """A 'teardown_request' bug after the view succeeded: the server answers 500, so the
    request's row must not be stored, or the client retries and stores it twice (rule 19)."""
    app = items_app(db)

    @app.teardown_request
    def buggy(exc: BaseException | None) -> None:
        raise ValueError("teardown bug")

    answers_as_stored(app, db, rows)


@sync_backends
def test_teardown_write_that_fails_to_commit_never_gives_500_for_stored_data(
    db: Database[Any], rows: Rows
) -> None:
    """An audit row written in 'teardown_request' violates a constraint: the client gets a
    500, and then the request's own row must not be stored either (rules 4, 19)."""
    app = items_app(db)

    @app.teardown_request
    def audit(exc: BaseException | None) -> None:
        db.session.add(Item(name="audit"))  # unique: the second request's audit fails

    with werkzeug_server(app) as port:
        assert fetch(port, "POST", "/first") == (201, b"first")
        status, _ = fetch(port, "POST", "/second")
        wait_until(lambda: db.live_units == 0)
    stored_rows = rows()
    assert (status < 400) == ("second" in stored_rows), (status, stored_rows)


@sync_backends
def test_teardown_write_after_a_failed_commit_keeps_the_hooks_response(
    db: Database[Any], rows: Rows
) -> None:
    """The request's commit fails and 'on_commit_error' answers 409; an audit write in
    'teardown_request' must not turn that into an unhandled error and a 500 (rule 4)."""

    def conflict(error: BaseException) -> WerkzeugResponse:
        return WerkzeugResponse("conflict", status=409)

    app = items_app(db, on_commit_error=conflict)

    @app.post("/orphan")
    def orphan() -> tuple[str, int]:
        db.session.add(Child(parent_id=999_999))  # its foreign key fails the COMMIT
        return "created", 201

    @app.teardown_request
    def audit(exc: BaseException | None) -> None:
        db.session.add(Item(name=f"audit-{request.path.strip('/')}"))

    with werkzeug_server(app) as port:
        reply = fetch(port, "POST", "/orphan")
        wait_until(lambda: db.live_units == 0)
    assert reply == (409, b"conflict")
    assert rows() == []


@sync_backends
def test_teardown_write_is_flushed_inside_the_app_context(
    db: Database[Any], notes: Callable[[], list[tuple[str, str]]]
) -> None:
    """A row added in 'teardown_request' whose default reads 'g' (as 'current_user' does):
    its flush must run while the request's app context is active (rule 14)."""
    app = items_app(db)

    @app.before_request
    def log_in() -> None:
        g.user = "ada"

    @app.teardown_request
    def audit(exc: BaseException | None) -> None:
        db.session.add(Note(text=f"visited {request.path}"))

    with werkzeug_server(app) as port:
        reply = fetch(port, "POST", "/page")
        wait_until(lambda: db.live_units == 0)
    assert reply == (201, b"page")
    assert notes() == [("visited /page", "ada")]


@sync_backends
@pytest.mark.parametrize("via", ["test_client", "werkzeug"])
def test_stream_with_context_writes_are_flushed_inside_the_app_context(
    db: Database[Any], notes: Callable[[], list[tuple[str, str]]], via: str
) -> None:
    """'stream_with_context' keeps the request's contexts for the body: a row it adds, with
    a default that reads 'g', is flushed by the stream's commit while they are active (14)."""
    app = items_app(db)

    @app.get("/stream")
    def stream() -> Response:
        g.user = "bob"

        def body() -> Iterator[str]:
            yield "a"
            db.session.add(Note(text="streamed"))
            yield "b"

        return Response(stream_with_context(body()))

    if via == "test_client":
        with app.test_client().get("/stream") as response:
            reply = (response.status_code, response.get_data())
    else:
        with werkzeug_server(app) as port:
            reply = fetch(port, "GET", "/stream")
            wait_until(lambda: db.live_units == 0)
    assert reply == (200, b"ab")
    assert notes() == [("streamed", "bob")]
    assert (db.live_units, db.live_sessions) == (0, 0)


# -- in-memory SQLite: one connection for every thread, one unit at a time --------------------


def test_memory_database_rollback_of_one_request_never_loses_anothers_201(
    tmp_path: Path,
) -> None:
    """Two concurrent requests on 'sqlite://': the one that answers 400 rolls back, the one
    that answers 201 must keep its row (rule 4: no 2xx accompanies lost data)."""
    db: Database[Any] = Database()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db.init_app(app)
    with app.app_context():
        Base.metadata.create_all(db.sync_engine)
    flushed = threading.Event()

    @app.post("/kept")
    def kept() -> tuple[str, int]:
        db.session.add(Item(name="kept"))
        db.session.flush()
        flushed.set()
        time.sleep(0.3)
        return "kept", 201

    @app.post("/refused")
    def refused() -> tuple[str, int]:
        flushed.wait(5)
        db.session.add(Item(name="refused"))
        db.session.flush()
        return "refused", 400

    try:
        with werkzeug_server(app) as port, ThreadPoolExecutor(2) as pool:
            first = pool.submit(fetch, port, "POST", "/kept")
            second = pool.submit(fetch, port, "POST", "/refused")
            assert second.result()[0] == 400
            assert first.result() == (201, b"kept")
            wait_until(lambda: db.live_units == 0)
        with app.app_context():
            assert list(db.session.scalars(sa.select(Item.name))) == ["kept"]
    finally:
        dispose_all(db, app)


def test_memory_database_request_never_commits_an_outer_app_contexts_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A test holds an app context with a flushed, uncommitted row (rolled back at teardown
    for isolation) and sends a request: that request's commit must not store it (rule 14:
    an app context's unit is never committed automatically). The one connection is the
    app context's: the request waits for it, then gets a 503, with nothing stored."""
    db: Database[Any] = Database()
    app = per_app(db, "sqlite://", SQLALCHEMY_ENGINE_OPTIONS={"pool_timeout": 0.5})
    try:
        with app.app_context():
            Base.metadata.create_all(db.sync_engine)
        with app.app_context():
            db.session.add(Item(name="fixture"))
            db.session.flush()
            assert app.test_client().post("/request").status_code == 503
        assert "POST /request got no connection to sqlite://" in caplog.text
        with app.app_context():
            assert list(db.session.scalars(sa.select(Item.name))) == []
    finally:
        dispose_all(db, app)


# -- one Database(), several apps -------------------------------------------------------------


@pytest.fixture
def no_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own and no 'DATABASE_URL'."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return cwd


@pytest.mark.parametrize("first", ["named", "unnamed"])
def test_app_naming_no_database_works_beside_one_that_names_one(
    tmp_path: Path, no_database_url: Path, first: str
) -> None:
    """The README: an app whose config names no database uses 'DATABASE_URL', else the
    embedded default, also when another app of the same Database() names its own."""
    db: Database[Any] = Database()
    named_path = tmp_path / "named.sqlite3"
    with_tables(named_path)
    with_tables(no_database_url / "sessionscope.sqlite3")
    apps: dict[str, Flask] = {}

    def make(kind: str) -> None:
        app = Flask(kind)
        if kind == "named":
            app.config["SQLALCHEMY_DATABASE_URI"] = sqlite_uri(named_path)
        db.init_app(app)

        @app.post("/<item>")
        def create(item: str) -> tuple[str, int]:
            db.session.add(Item(name=item))
            return item, 201

        apps[kind] = app
        assert app.test_client().post(f"/{kind}").status_code == 201

    try:
        make(first)
        make("unnamed" if first == "named" else "named")
        assert stored(named_path) == ["named"]
        assert stored(no_database_url / "sessionscope.sqlite3") == ["unnamed"]
    finally:
        db.dispose()


def test_db_begin_after_the_response_works_for_an_app_with_its_own_database(
    tmp_path: Path,
) -> None:
    """The README: work in 'call_on_close' gets an error naming 'with db.begin()', 'which
    works there'; it must for an app whose database comes from its config too."""
    db: Database[Any] = Database()
    path = tmp_path / "app.sqlite3"
    app = per_app(db, with_tables(path))
    errors: list[str] = []

    @app.post("/later")
    def later() -> Response:
        def after() -> None:
            try:
                with db.begin() as session:
                    session.add(Item(name="after"))
            except RuntimeError as exc:
                errors.append(str(exc))

        response = Response("ok", status=201)
        response.call_on_close(after)
        return response

    try:
        with app.test_client().post("/later") as response:
            assert response.status_code == 201
        assert errors == []
        assert stored(path) == ["after"]
    finally:
        dispose_all(db, app)


def test_db_begin_in_a_thread_a_view_started_uses_the_apps_database(tmp_path: Path) -> None:
    """A view hands work to a thread with 'copy_context()' (as 'copy_current_request_context'
    does); that work outlives the request and opens 'db.begin()': the app's database."""
    db: Database[Any] = Database()
    path = tmp_path / "app.sqlite3"
    app = per_app(db, with_tables(path))
    errors: list[str] = []
    threads: list[threading.Thread] = []
    released = threading.Event()

    def work() -> None:
        released.wait(5)
        try:
            with db.begin() as session:
                session.add(Item(name="from-thread"))
        except RuntimeError as exc:
            errors.append(str(exc))

    @app.post("/spawn")
    def spawn() -> tuple[str, int]:
        context = copy_context()
        thread = threading.Thread(target=context.run, args=(work,))
        thread.start()
        threads.append(thread)
        return "spawned", 202

    try:
        with app.test_client().post("/spawn") as response:
            assert response.status_code == 202
        released.set()
        threads[0].join(10)
        assert errors == []
        assert stored(path) == ["from-thread"]
    finally:
        dispose_all(db, app)


def test_other_apps_context_inside_a_request_uses_that_apps_database(tmp_path: Path) -> None:
    """A view of app A pushes app B's context to write there (an admin app, a tenant app):
    the write must land in B's database, not silently in A's."""
    db: Database[Any] = Database()
    path_a, path_b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    app_a = per_app(db, with_tables(path_a), "a")
    app_b = per_app(db, with_tables(path_b), "b")

    @app_a.post("/copy-to-b")
    def copy_to_b() -> tuple[str, int]:
        with app_b.app_context():
            db.session.add(Item(name="for-b"))
            db.session.commit()
        return "ok", 201

    try:
        assert app_a.test_client().post("/copy-to-b").status_code == 201
        assert (stored(path_a), stored(path_b)) == ([], ["for-b"])
    finally:
        dispose_all(db, app_a, app_b)


def test_a_collected_app_does_not_keep_its_engine(tmp_path: Path) -> None:
    """A test suite builds an app per test on one module-level Database(): each app's
    engine (and its pooled connections: PostgreSQL's 'too many clients') must go with it."""
    db: Database[Any] = Database()
    app = per_app(db, with_tables(tmp_path / "app.sqlite3"))
    assert app.test_client().post("/one").status_code == 201
    with app.app_context():
        engine = weakref.ref(db.engine)
    del app
    gc.collect()
    try:
        # The engine object may linger in SQLAlchemy's own cycles; its connections must not.
        left = engine()
        assert left is None or left.pool.checkedin() == 0, "a collected app kept connections"
    finally:
        db.dispose()


def test_async_database_url_in_the_environment_does_not_block_a_sync_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'DATABASE_URL' names an async driver (for the FastAPI service next to it) and the
    Flask app's config a sync one: the app works, or the error names 'DATABASE_URL'."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'async.sqlite3'}")
    db: Database[Any] = Database()
    path = tmp_path / "app.sqlite3"
    refused: RuntimeError | None = None
    try:
        app = per_app(db, with_tables(path))
    except RuntimeError as exc:
        refused = exc
    if refused is not None:
        assert "DATABASE_URL" in str(refused), str(refused)
        return
    try:
        assert app.test_client().post("/sync").status_code == 201
        assert stored(path) == ["sync"]
    finally:
        dispose_all(db, app)


@pytest.mark.anyio
async def test_database_url_set_after_a_listener_is_not_half_applied(
    tmp_path: Path, no_database_url: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module registers a listener on 'db.session' at import; the app factory then loads
    '.env', which sets an async 'DATABASE_URL': the Database is that one, or says it cannot
    be, never an async engine behind sync sessions that call itself synchronous."""
    db: Database[Any] = Database()
    sa.event.listen(db.session, "before_flush", lambda *args: None)
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'late.sqlite3'}")
    assert db.url.startswith("sqlite:///"), "the Database names the URL it was made for"
    with pytest.raises(TypeError, match="synchronous driver"):
        async with db.begin():
            pass
    try:
        with pytest.raises(RuntimeError, match="'DATABASE_URL' changed"), db.begin():
            pass
        assert db.live_units == 0
    finally:
        await db.dispose_async()


def test_sqlalchemy_echo_does_not_move_the_database_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turning on 'SQLALCHEMY_ECHO' to debug must not switch the app to another (empty)
    database: a relative 'DATABASE_URL' names the same file with it and without it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///relative.sqlite3")
    urls = []
    for echo in (False, True):
        db: Database[Any] = Database()
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config["SQLALCHEMY_ECHO"] = echo
        db.init_app(app)
        with app.app_context():
            urls.append(str(db.sync_engine.url.database))
            db.dispose()
        db.dispose()
    assert Path(urls[0]).resolve() == Path(urls[1]).resolve(), urls


# -- real servers, streams, dispatch -----------------------------------------------------------


@sync_backends
def test_client_gone_mid_stream_with_context_rolls_back_the_stream_only(
    db: Database[Any], rows: Rows
) -> None:
    """A 'stream_with_context' body whose client hangs up: what the view wrote is stored,
    what the body wrote is rolled back, and nothing is left open (rules 8, 9)."""
    app = items_app(db)

    @app.get("/stream")
    def stream() -> Response:
        db.session.add(Item(name="before"))

        def body() -> Iterator[str]:
            yield "x" * 65_536
            db.session.add(Item(name=f"during-{request.path.strip('/')}"))
            db.session.flush()
            for _ in range(2_000):
                yield "x" * 65_536
                time.sleep(0.001)

        return Response(stream_with_context(body()))

    with werkzeug_server(app) as port:
        leave_stream(port)
        wait_until(lambda: db.live_units == 0)
    assert rows() == ["before"]


@sync_backends
def test_head_of_a_streamed_response_commits_and_ends_the_unit(
    db: Database[Any], rows: Rows
) -> None:
    """HEAD never iterates a streamed body: the view's write is committed, the unit ends."""
    app = items_app(db)

    @app.route("/stream", methods=["GET", "HEAD"])
    def stream() -> Response:
        db.session.add(Item(name=f"seen-{request.method}"))

        def body() -> Iterator[str]:
            yield "never sent"

        return Response(stream_with_context(body()))

    with werkzeug_server(app) as port:
        assert fetch(port, "HEAD", "/stream") == (200, b"")
        wait_until(lambda: db.live_units == 0)
    assert rows() == ["seen-HEAD"]


def test_two_apps_with_their_own_databases_on_one_server_never_cross(tmp_path: Path) -> None:
    """One Database(), two apps on other files, dispatched by one threaded server under
    concurrency: every row lands in the database of the app that handled it."""
    db: Database[Any] = Database()
    path_a, path_b = tmp_path / "a.sqlite3", tmp_path / "b.sqlite3"
    app_a = per_app(db, with_tables(path_a), "a")
    app_b = per_app(db, with_tables(path_b), "b")
    served = DispatcherMiddleware(app_a, {"/b": app_b})
    paths = [f"/b/b{n}" if n % 2 else f"/a{n}" for n in range(40)]
    try:
        with werkzeug_server(served) as port, ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda path: fetch(port, "POST", path)[0], paths))
            wait_until(lambda: db.live_units == 0)
        assert set(replies) == {201}
        assert sorted(stored(path_a)) == sorted(f"a{n}" for n in range(0, 40, 2))
        assert sorted(stored(path_b)) == sorted(f"b{n}" for n in range(1, 40, 2))
    finally:
        dispose_all(db, app_a, app_b)


@sync_backends
def test_close_from_another_thread_ends_the_unit_once(db: Database[Any], rows: Rows) -> None:
    """A server that closes the response from another thread (an async server's pool): the
    stream's writes roll back, the unit ends, and nothing raises or stays bound. (A
    'stream_with_context' body cannot be closed there: Flask's own contexts refuse it.)"""
    app = items_app(db)

    @app.get("/stream")
    def stream() -> Response:
        db.session.add(Item(name="before"))

        def body() -> Iterator[str]:
            yield "a"
            db.session.add(Item(name="during"))
            yield "b"

        return Response(body())

    environ: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        environ["status"] = status
        return lambda data: None

    built = EnvironBuilder(path="/stream").get_environ()
    iterable = app(built, start_response)
    chunks = iter(iterable)
    assert next(chunks) == b"a"
    assert next(chunks) == b"b"
    closer = threading.Thread(target=iterable.close)  # type: ignore[attr-defined]
    closer.start()
    closer.join(10)
    assert environ["status"] == "200 OK"
    assert rows() == ["before"]
    assert (db.live_units, db.live_sessions) == (0, 0)
    with pytest.raises(RuntimeError, match="No unit of work"):
        db.session()


@sync_backends
def test_deferred_constraint_failing_at_the_commit_is_a_clean_500(
    db: Database[Any], rows: Rows, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The COMMIT itself fails inside Flask's teardown (a deferred foreign key): a
    500, nothing stored, the error logged once, no transaction left open (rule 4)."""
    app = items_app(db)

    @app.post("/orphan")
    def orphan() -> tuple[str, int]:
        db.session.add(Item(name="with-orphan"))
        db.session.add(Child(parent_id=999_999))
        return "created", 201

    with caplog.at_level(logging.ERROR, logger="sessionscope"), werkzeug_server(app) as port:
        assert fetch(port, "POST", "/orphan") == (500, b"Internal Server Error")
        assert fetch(port, "POST", "/after") == (201, b"after")
        wait_until(lambda: db.live_units == 0)
    assert rows() == ["after"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert len(errors) == 1, [r.getMessage() for r in errors]


@sync_backends
def test_nested_contexts_in_a_request_keep_its_session(db: Database[Any], rows: Rows) -> None:
    """'with app.app_context()', 'app.test_request_context()' and 'db.begin()' inside a
    view: the request's session survives, 'db.begin()' commits on its own (rule 14)."""
    app = items_app(db)

    @app.post("/nested")
    def nested() -> tuple[str, int]:
        session = db.session()
        session.add(Item(name="outer"))
        with app.app_context():
            assert db.session() is session
        with app.test_request_context("/elsewhere"):
            assert db.session() is session
        with db.begin() as inner:
            assert inner is not session
            inner.add(Item(name="inner"))
        assert db.session() is session
        return "ok", 201

    with Client(app).post("/nested") as response:
        assert response.status_code == 201
    assert sorted(rows()) == ["inner", "outer"]


def test_cli_db_begin_of_an_app_with_its_own_database_uses_it(tmp_path: Path) -> None:
    """A CLI command of an app whose config names its database: 'db.begin()' there writes
    to that database, not to 'DATABASE_URL' or the embedded default."""
    db: Database[Any] = Database()
    path = tmp_path / "cli.sqlite3"
    app = per_app(db, with_tables(path))

    @app.cli.command("seed")
    def seed() -> None:
        with db.begin() as session:
            session.add(Item(name="seeded"))
        assert isinstance(db.session(), Session)

    try:
        result = app.test_cli_runner().invoke(args=["seed"])
        assert result.exit_code == 0, result.output
        assert stored(path) == ["seeded"]
        assert (db.live_units, db.live_sessions) == (0, 0)
    finally:
        dispose_all(db, app)
