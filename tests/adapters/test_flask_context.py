"""``db.init_app(app)``: Flask's contexts around the flush, the commit and after the response."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from flask import Flask, Response, current_app, g, request, stream_with_context
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from werkzeug.local import LocalProxy

from sessionscope import Database

from .._models import Item
from .._servers import fetch, wait_until, werkzeug_server
from ..conftest import backend_params

sync_backends = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
via_both = pytest.mark.parametrize("via", ["test_client", "werkzeug"])

Rows = Callable[[], list[str]]
SendAll = Callable[[list[str]], list[tuple[int, bytes]]]
ROOT = Path(__file__).resolve().parent.parent.parent
USERS = ["ada", "bob", "cy", "dee"]


class User:
    """What a login extension keeps in ``g``."""

    def __init__(self, name: str) -> None:
        self.name = name


# Flask-Login's 'current_user' in miniature: resolved on each use, from the current 'g'.
current_user: Any = LocalProxy(lambda: g.user)


class PostBase(DeclarativeBase):
    pass


class Post(PostBase):
    """A post whose author is known only when the INSERT runs, from 'current_user'."""

    __tablename__ = "flask_context_posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100), unique=True)
    author: Mapped[str] = mapped_column(String(100), default=lambda: current_user.name)
    editor: Mapped[str | None] = mapped_column(String(100))


@pytest.fixture
def posts(checker: Engine) -> Iterator[Callable[[], dict[str, tuple[str, str | None]]]]:
    """The ``flask_context_posts`` table for one test: title -> (author, editor)."""
    PostBase.metadata.drop_all(checker)
    PostBase.metadata.create_all(checker)

    def read() -> dict[str, tuple[str, str | None]]:
        with checker.connect() as connection:
            stored = connection.execute(sa.select(Post.title, Post.author, Post.editor))
            return {title: (author, editor) for title, author, editor in stored}

    yield read
    PostBase.metadata.drop_all(checker)


def seen() -> str:
    """What a listener or callback sees of Flask's contexts, or why it saw nothing."""
    try:
        return f"{current_app.config['MARKER']}:{g.user.name}"
    except RuntimeError as exc:
        return f"no context: {str(exc).splitlines()[0]}"


def make_app(db: Database[Any]) -> Flask:
    """An app whose 'before_request' logs in '?user=NAME'; POST /posts/<t> and /items/<n>
    only add a row and answer 201 (no explicit commit anywhere)."""
    app = Flask(__name__)
    app.config["MARKER"] = "from-config"
    db.init_app(app)

    @app.before_request
    def log_in() -> None:
        g.user = User(request.args.get("user", "anonymous"))

    @app.post("/posts/<title>")
    def create_post(title: str) -> tuple[str, int]:
        db.session.add(Post(title=title))
        return title, 201

    @app.post("/items/<name>")
    def create_item(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        return name, 201

    return app


def settle(condition: Callable[[], bool]) -> None:
    """Give work that follows the response time to finish; the asserts after say what ran."""
    with suppress(AssertionError):
        wait_until(condition)


@contextmanager
def serve(app: Flask, db: Database[Any], via: str) -> Iterator[SendAll]:
    """Yield a function that POSTs each path (concurrently on the real server)."""
    if via == "test_client":
        client = app.test_client()

        def send_one(path: str) -> tuple[int, bytes]:
            with client.post(path) as response:
                return response.status_code, response.get_data()

        yield lambda paths: [send_one(path) for path in paths]
        return
    with werkzeug_server(app) as port, ThreadPoolExecutor(len(USERS)) as pool:
        yield lambda paths: list(pool.map(lambda path: fetch(port, "POST", path), paths))
        # Server threads finish their units after the client has read the response.
        wait_until(lambda: db.live_units == 0)


# -- 1. the flush and the commit run inside the request's contexts ---------------------------


@sync_backends
@via_both
def test_current_user_proxy_resolves_at_flush_time(
    db: Database[Any], posts: Callable[[], dict[str, tuple[str, str | None]]], via: str
) -> None:
    """A column default and a 'before_flush' listener read 'current_user' while the unit's
    own flush runs: each row gets its request's user, and the request its 201 (rule 14)."""
    app = make_app(db)

    def stamp_editor(session: Session, context: object, instances: object) -> None:
        for obj in session.new:
            if isinstance(obj, Post):
                obj.editor = current_user.name

    sa.event.listen(db.session, "before_flush", stamp_editor)
    try:
        with serve(app, db, via) as send_all:
            replies = send_all([f"/posts/post-{user}?user={user}" for user in USERS])
    finally:
        sa.event.remove(db.session, "before_flush", stamp_editor)
    assert replies == [(201, f"post-{user}".encode()) for user in USERS]
    assert posts() == {f"post-{user}": (user, user) for user in USERS}
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
@via_both
def test_after_commit_listener_sees_current_app_and_g(
    db: Database[Any], rows: Rows, via: str
) -> None:
    """An SQLAlchemy 'after_commit' listener of the unit's commit runs inside the request's
    app context: 'current_app' and 'g' are the request's (rule 14)."""
    app = make_app(db)
    records: list[str] = []

    def on_commit(session: Session) -> None:
        records.append(seen())

    sa.event.listen(db.session, "after_commit", on_commit)
    try:
        with serve(app, db, via) as send_all:
            replies = send_all([f"/items/item-{user}?user={user}" for user in USERS])
    finally:
        sa.event.remove(db.session, "after_commit", on_commit)
    assert [status for status, _ in replies] == [201] * len(USERS)
    assert sorted(records) == [f"from-config:{user}" for user in USERS]
    assert sorted(rows()) == [f"item-{user}" for user in USERS]
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
@via_both
def test_after_commit_callback_sees_current_app_and_g(
    db: Database[Any], rows: Rows, via: str
) -> None:
    """A 'db.after_commit' callback registered in a view runs inside the request's app
    context, like the commit it follows (rule 14)."""
    app = make_app(db)
    records: list[str] = []

    @app.post("/notify/<name>")
    def notify(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        db.after_commit(lambda: records.append(seen()))
        return name, 201

    with serve(app, db, via) as send_all:
        replies = send_all([f"/notify/note-{user}?user={user}" for user in USERS])
        settle(lambda: len(records) >= len(USERS))
    assert [status for status, _ in replies] == [201] * len(USERS)
    assert sorted(records) == [f"from-config:{user}" for user in USERS]
    assert sorted(rows()) == [f"note-{user}" for user in USERS]
    assert (db.live_units, db.live_sessions) == (0, 0)


# -- 2. the test client's preserved context ----------------------------------------------------


@sync_backends
def test_stream_with_context_in_a_preserving_test_client(db: Database[Any], rows: Rows) -> None:
    """'with app.test_client()' keeps the context of a streamed response; reading the
    stream there and leaving the block stores its rows and raises nothing."""
    app = make_app(db)

    @app.get("/stream")
    def stream() -> Response:
        db.session.add(Item(name="before"))

        def body() -> Iterator[str]:
            yield f"{g.user.name},"
            db.session.add(Item(name="during"))
            yield "end"

        return Response(stream_with_context(body()))

    with app.test_client() as client:
        response = client.get("/stream?user=ada")
        assert response.get_data() == b"ada,end"
    assert sorted(rows()) == ["before", "during"]
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
def test_preserved_context_after_a_plain_request_works_as_in_flask(
    db: Database[Any], rows: Rows
) -> None:
    """After a request in 'with app.test_client()', a test reads 'g', 'request' and
    'current_app' as with bare Flask, and the request's write is stored."""
    app = make_app(db)

    with app.test_client() as client:
        assert client.post("/items/kept?user=bob").status_code == 201
        assert g.user.name == "bob"
        assert request.path == "/items/kept"
        assert current_app.config["MARKER"] == "from-config"
    assert rows() == ["kept"]
    assert (db.live_units, db.live_sessions) == (0, 0)


# -- 3. work after the response ----------------------------------------------------------------


@sync_backends
@via_both
def test_call_on_close_gets_a_clear_error_and_db_begin_works(
    db: Database[Any], rows: Rows, via: str
) -> None:
    """Work in 'call_on_close' runs after the request's unit ended: 'db.session' there
    fails naming 'db.begin()', and a 'db.begin()' block there stores its row (rule 8, 11)."""
    app = make_app(db)
    errors: list[str] = []
    done: list[bool] = []

    def after_response() -> None:
        try:
            try:
                db.session.add(Item(name="orphan"))
                db.session.flush()
            except RuntimeError as exc:
                errors.append(str(exc))
            with db.begin() as session:
                session.add(Item(name="after"))
        finally:
            done.append(True)

    @app.post("/later")
    def later() -> Response:
        db.session.add(Item(name="request"))
        response = Response("ok", status=201)
        response.call_on_close(after_response)
        return response

    with serve(app, db, via) as send_all:
        assert send_all(["/later"]) == [(201, b"ok")]
        settle(lambda: bool(done))
    assert len(errors) == 1, errors
    assert "db.begin()" in errors[0]
    assert rows() == ["request", "after"]
    assert (db.live_units, db.live_sessions) == (0, 0)


# -- 4. misuse outside Flask -------------------------------------------------------------------


@pytest.mark.parametrize("make", [FastAPI, Starlette], ids=["fastapi", "starlette"])
def test_init_app_on_an_asgi_app_names_session_middleware(
    tmp_path: Path, make: Callable[[], Any]
) -> None:
    """'init_app' is Flask's; an ASGI app gets told to use 'SessionMiddleware' instead."""
    db: Database[Any] = Database(f"sqlite:///{tmp_path / 'asgi.sqlite3'}")
    try:
        with pytest.raises((TypeError, RuntimeError), match="SessionMiddleware"):
            db.init_app(make())
    finally:
        db.dispose()


def test_init_app_without_flask_names_the_extra() -> None:
    """Without Flask installed, 'init_app' says which extra to install, not a bare import
    error from deep inside the package."""
    code = (
        "import sys\n"
        "sys.modules['flask'] = None\n"
        "import sessionscope\n"
        "sessionscope.Database('sqlite://').init_app(object())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "pip install 'sessionscope[flask]'" in last_line, result.stderr
