"""``db.init_app(app)``: Flask specifics (the shared lifecycle is in ``test_wsgi_lifecycle``)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
import sqlalchemy as sa
from flask import Flask, Response, abort, request, stream_with_context
from sqlalchemy.orm import Session

from sessionscope import Database
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from .._models import Item
from .._servers import fetch, wait_until, werkzeug_server
from ..conftest import backend_params
from ._apps import items_app

sync_backends = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)

Rows = Callable[[], list[str]]
ROOT = Path(__file__).resolve().parent.parent.parent


class Boom(Exception):
    """An error that nothing handles."""


make_app = items_app


# -- registration and configuration ----------------------------------------------------------


@sync_backends
def test_second_registration_on_one_app_is_refused(db: Database[Any]) -> None:
    """Registering a database twice on one app would nest its units; it is refused."""
    app = make_app(db)
    with pytest.raises(RuntimeError, match="already registered"):
        db.init_app(app)


@sync_backends
def test_plain_middleware_on_a_flask_app_too_is_refused(db: Database[Any], rows: Rows) -> None:
    """'init_app' and a hand-added 'WSGISessionMiddleware' for one database are caught."""
    app = make_app(db)
    app.wsgi_app = WSGISessionMiddleware(app.wsgi_app, db)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="installed twice"):
        app.test_client().post("/twice")
    assert rows() == []


@pytest.mark.parametrize("key", ["SQLALCHEMY_DATABASE_URI", "DATABASE_URL"])
def test_app_config_configures_a_database_made_without_url(tmp_path: Path, key: str) -> None:
    """The factory pattern: the URL and options come from 'app.config'."""
    db: Database[Any] = Database()
    app = Flask(__name__)
    app.config[key] = f"sqlite:///{tmp_path / 'config.sqlite3'}"
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 3}
    app.config["SQLALCHEMY_SESSION_OPTIONS"] = {"info": {"source": "config"}}
    db.init_app(app)
    try:
        with app.app_context():
            assert db.url == app.config[key]
            assert db.sync_engine.pool.size() == 3  # type: ignore[attr-defined]
            assert db.session().info == {"source": "config"}
        # A second app with the same settings (one app per test) gets the same settings.
        other = Flask(__name__)
        other.config.update(app.config)
        db.init_app(other)
        with other.app_context():
            assert db.url == app.config[key]
    finally:
        db.dispose()


def test_app_config_naming_another_database_is_refused(tmp_path: Path) -> None:
    """One Database has one engine: an app that names another database gets told so."""
    db: Database[Any] = Database(f"sqlite:///{tmp_path / 'one.sqlite3'}")
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'two.sqlite3'}"
    try:
        with pytest.raises(RuntimeError, match="names another database"):
            db.init_app(app)
        app.config["SQLALCHEMY_DATABASE_URI"] = db.url
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 3}
        with pytest.raises(RuntimeError, match="SQLALCHEMY_ENGINE_OPTIONS"):
            db.init_app(app)
    finally:
        db.dispose()


def test_async_driver_is_refused_at_init_app(tmp_path: Path) -> None:
    """Flask drives sessions from sync code; an async driver fails at start-up, not per request."""
    db: Database[Any] = Database(f"sqlite+aiosqlite:///{tmp_path / 'async.sqlite3'}")
    app = Flask(__name__)
    with pytest.raises(RuntimeError, match="async driver"):
        db.init_app(app)
    assert "sessionscope" not in app.extensions


def test_importing_sessionscope_loads_no_flask() -> None:
    """Flask is an optional extra: 'import sessionscope' must not need it."""
    code = "import sys, sessionscope; sys.exit('flask' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- app contexts outside requests ------------------------------------------------------------


@sync_backends
def test_bare_app_context_session_is_removed_never_committed(db: Database[Any], rows: Rows) -> None:
    """Scripts and tests get a session in 'app_context()'; only an explicit commit stores."""
    app = make_app(db)
    with app.app_context():
        db.session.add(Item(name="uncommitted"))
        db.session.flush()
        assert db.live_sessions == 1
    assert (db.live_units, db.live_sessions) == (0, 0)
    with app.app_context():
        db.session.add(Item(name="committed"))
        db.session.commit()
    assert rows() == ["committed"]


@sync_backends
def test_cli_command_uses_and_removes_a_session(db: Database[Any], rows: Rows) -> None:
    """A CLI command runs in an app context with a session, removed when it ends."""
    app = make_app(db)
    live: list[int] = []

    @app.cli.command("add")
    @click.argument("name")
    @click.option("--commit", is_flag=True)
    def add(name: str, commit: bool) -> None:
        db.session.add(Item(name=name))
        db.session.flush()
        live.append(db.live_sessions)
        if commit:
            db.session.commit()

    runner = app.test_cli_runner()
    assert runner.invoke(args=["add", "kept", "--commit"]).exit_code == 0
    assert runner.invoke(args=["add", "dropped"]).exit_code == 0
    assert live == [1, 1]
    assert (db.live_units, db.live_sessions) == (0, 0)
    assert rows() == ["kept"]


@sync_backends
def test_request_inside_an_app_context_gets_its_own_session(db: Database[Any], rows: Rows) -> None:
    """A test holding an app context still gives each request a unit of its own."""
    app = make_app(db)
    with app.app_context():
        outer = db.session()
        outer.add(Item(name="outer"))
        assert app.test_client().post("/request").status_code == 201
        assert db.session() is outer
    assert rows() == ["request"]


@sync_backends
def test_raising_teardown_neither_leaks_nor_reuses_a_session(db: Database[Any]) -> None:
    """A teardown function that raises cannot skip the removal or hand on a stale session (05c)."""
    app = make_app(db)

    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        raise Boom("teardown failed")

    sessions: list[Session] = []
    for _ in range(5):
        context = app.app_context()
        context.push()
        sessions.append(db.session())
        db.session.execute(sa.text("SELECT 1"))
        with pytest.raises(Boom):
            context.pop()
        assert (db.live_units, db.live_sessions) == (0, 0)
        assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert len({id(session) for session in sessions}) == 5


@sync_backends
def test_teardown_is_idempotent(db: Database[Any]) -> None:
    """Tearing a context down twice (or pushing it twice) removes its unit exactly once."""
    app = make_app(db)
    context = app.app_context()
    context.push()
    context.push()
    db.session.execute(sa.text("SELECT 1"))
    context.pop()
    assert db.live_sessions == 1
    app.do_teardown_appcontext()
    app.do_teardown_appcontext()
    assert (db.live_units, db.live_sessions) == (0, 0)
    with pytest.raises(RuntimeError, match="no session to give"):
        db.session()
    context.pop()


# -- requests --------------------------------------------------------------------------------


@sync_backends
def test_nested_app_context_keeps_the_request_session(db: Database[Any], rows: Rows) -> None:
    """Pushing and popping an app context inside a view leaves the request's session (21a)."""
    app = make_app(db)
    same: list[bool] = []

    @app.post("/nested")
    def nested() -> tuple[str, int]:
        session = db.session()
        session.add(Item(name="outer"))
        with app.app_context():
            same.append(db.session() is session)
            db.session.add(Item(name="inner"))
        same.append(db.session() is session)
        return "ok", 201

    assert app.test_client().post("/nested").status_code == 201
    assert same == [True, True]
    assert sorted(rows()) == ["inner", "outer"]


@sync_backends
def test_app_context_pushed_before_the_first_use_uses_the_request_session(
    db: Database[Any], rows: Rows
) -> None:
    """The first use of the session, inside an app context the view pushed, is the request's."""
    app = make_app(db)
    same: list[bool] = []

    @app.post("/first-inside")
    def first_inside() -> tuple[str, int]:
        assert db.live_sessions == 0  # nothing used yet
        with app.app_context():
            inner = db.session()
            inner.add(Item(name="inner"))
        same.append(db.session() is inner)
        db.session.add(Item(name="outer"))
        return "ok", 201

    assert app.test_client().post("/first-inside").status_code == 201
    assert same == [True]
    assert sorted(rows()) == ["inner", "outer"]
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
def test_a_request_that_never_uses_the_session_opens_no_session(db: Database[Any]) -> None:
    """No session and no connection for a view that never touches the database."""
    app = make_app(db)
    checkouts: list[object] = []
    sa.event.listen(db.sync_engine, "checkout", lambda *args: checkouts.append(args))
    sessions: list[int] = []

    @app.get("/plain")
    def plain() -> str:
        sessions.append(db.live_sessions)
        return "static"

    response = app.test_client().get("/plain")
    assert (response.status_code, response.data) == (200, b"static")
    assert sessions == [0]
    assert checkouts == []
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
def test_preserved_context_never_commits_a_failed_request(db: Database[Any], rows: Rows) -> None:
    """A context the test client keeps after an error is popped later without a commit (21b)."""
    app = make_app(db)

    @app.post("/fails")
    def fails() -> str:
        db.session.add(Item(name="lost"))
        db.session.flush()
        raise Boom("view failed")

    with app.test_client() as client:
        with client.post("/fails") as response:
            assert response.status_code == 500
        assert request.path == "/fails"
        # The preserved context is a bare one now: a fresh session that sees nothing.
        assert db.session.scalars(sa.select(Item)).all() == []
    assert (db.live_units, db.live_sessions) == (0, 0)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    with app.test_client() as client, pytest.raises(Boom):
        client.post("/fails")
    assert rows() == []


@sync_backends
def test_stream_with_context_keeps_the_session_for_the_stream(
    db: Database[Any], rows: Rows
) -> None:
    """The streamed body reads the request and its session; removal waits for it (21c)."""
    app = make_app(db)
    teardowns: list[int] = []
    app.teardown_appcontext(lambda exc: teardowns.append(db.live_sessions))

    @app.get("/stream")
    def stream() -> Response:
        item = Item(name="before")
        db.session.add(item)

        def body() -> Iterator[str]:
            yield f"{request.args['who']}:{item in db.session}:{db.live_sessions},"
            db.session.add(Item(name="during"))
            yield "end"

        return Response(stream_with_context(body()))

    with app.test_client().get("/stream?who=me") as response:
        assert response.get_data() == b"me:True:1,end"
    assert len(teardowns) == 2  # Flask tears the context down once more after the stream
    assert (db.live_units, db.live_sessions) == (0, 0)
    assert rows() == ["before", "during"]


@sync_backends
def test_teardown_request_writes_belong_to_the_request(db: Database[Any], rows: Rows) -> None:
    """Teardown-request functions run before the commit, so their writes follow the status."""
    app = make_app(db)

    @app.teardown_request
    def audit(exc: BaseException | None) -> None:
        db.session.add(Item(name=f"audit-{request.path.strip('/')}"))

    assert app.test_client().post("/ok").status_code == 201
    assert sorted(rows()) == ["audit-ok", "ok"]


@sync_backends
def test_unread_responses_still_end_their_units(db: Database[Any]) -> None:
    """A test that only looks at the status never closes the response; no unit may wait for it."""
    app = make_app(db)

    @app.get("/missing")
    def missing() -> str:
        db.session.execute(sa.text("SELECT 1"))
        abort(404)

    @app.get("/fails")
    def fails() -> str:
        db.session.execute(sa.text("SELECT 1"))
        raise Boom("view failed")

    client = app.test_client()
    assert client.post("/created").status_code == 201
    assert client.get("/missing").status_code == 404
    assert client.get("/fails").status_code == 500
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
def test_async_views_get_distinct_sessions(db: Database[Any], rows: Rows) -> None:
    """Async views run with a sync driver, each concurrent request on its own session (21d)."""
    pytest.importorskip("asgiref")
    app = make_app(db)
    sessions: list[Session] = []
    lock = threading.Lock()

    @app.post("/async")
    async def create_async() -> tuple[str, int]:
        marker = uuid.uuid4().hex
        session = db.session()
        with lock:
            sessions.append(session)
        session.info["marker"] = marker
        session.add(Item(name=marker))
        await asyncio.sleep(0.05)
        return f"{marker}|{db.session().info['marker']}", 201

    with werkzeug_server(app) as port, ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: fetch(port, "POST", "/async"), range(20)))
        wait_until(lambda: db.live_units == 0)
    markers = []
    for status, body in replies:
        assert status == 201
        marker, seen = body.decode().split("|")
        assert marker == seen
        markers.append(marker)
    assert len({id(session) for session in sessions}) == 20
    assert sorted(rows()) == sorted(markers)


# -- the example -------------------------------------------------------------------------------


def _load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "flask_app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: SQLAlchemy resolves the models' annotations through it.
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_example_app_creates_lists_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/flask_app.py works as documented on the embedded SQLite default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    example = _load_example("flask_app_example", monkeypatch)
    db: Database[Any] = example.db
    try:
        client = example.app.test_client()
        assert client.post("/items", data={"name": "apple"}).status_code == 201
        assert client.post("/items", data={"name": "apple"}).status_code == 409
        assert client.post("/fail", data={"name": "pear"}).status_code == 500
        assert client.get("/items").get_json() == ["apple"]
        result = example.app.test_cli_runner().invoke(args=["count"])
        assert result.output.strip() == "1"
        assert (tmp_path / "sessionscope.sqlite3").exists()
        assert (db.live_units, db.live_sessions) == (0, 0)
    finally:
        db.dispose()


@sync_backends
def test_remove_in_teardown_appcontext_keeps_the_requests_writes(
    db: Database[Any], rows: Rows
) -> None:
    """'db.session.remove()' in a 'teardown_appcontext' function (the idiom of SQLAlchemy's
    own Flask docs) runs before the request's unit ends: the writes stay for the unit, the
    201 is stored, and the unit still ends with nothing left behind (rule 20).
    """
    app = make_app(db)
    removed: list[int] = []

    @app.teardown_appcontext
    def shutdown_session(exc: BaseException | None) -> None:
        db.session.remove()
        removed.append(db.live_sessions)

    with werkzeug_server(app) as port:
        assert fetch(port, "POST", "/kept") == (201, b"kept")
        wait_until(lambda: (db.live_units, db.live_sessions) == (0, 0))
    assert removed == [1]
    assert rows() == ["kept"]
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
