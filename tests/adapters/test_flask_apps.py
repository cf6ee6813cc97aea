"""``db.init_app(app)`` with several apps and their configs: the factory pattern of test suites.

A ``Database()`` made without a URL takes each app's settings from its ``app.config`` and
gives each app an engine of its own, built on first use; one made with a URL is shared by
every app and refuses an app that names another database.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import httpx
import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sessionscope import Database, SessionMiddleware
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from .._models import Base, Item
from .._servers import fetch, wait_until, werkzeug_server
from .._uvicorn import serve
from .._uvicorn import wait_until as wait_until_async

MEMORY_URLS = ["sqlite://", "sqlite:///:memory:"]

Registered = list[tuple[Database[Any], Flask]]


@pytest.fixture
def registered() -> Iterator[Registered]:
    """The (db, app) pairs a test registered; each app's engine is disposed at the end."""
    pairs: Registered = []
    yield pairs
    for db, app in pairs:
        with app.app_context():
            db.dispose()


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def item_names(session: Session) -> list[str]:
    return list(session.scalars(sa.select(Item.name).order_by(Item.id)))


def stored(path: Path) -> list[str]:
    """The names in the ``items`` table of the SQLite file at ``path``, read from outside."""
    engine = sa.create_engine(sqlite_uri(path), poolclass=sa.NullPool)
    try:
        with Session(engine) as session:
            return item_names(session)
    finally:
        engine.dispose()


def create_app(db: Database[Any], uri: str | None, registered: Registered, **config: Any) -> Flask:
    """The app factory of a user's test suite: POST /items/<name> stores, GET /items lists."""
    app = Flask(__name__, instance_path=config.pop("instance_path", None))
    key = config.pop("key", "SQLALCHEMY_DATABASE_URI")
    if uri is not None:
        app.config[key] = uri
    app.config.update(config)
    db.init_app(app)
    registered.append((db, app))

    @app.post("/items/<name>")
    def create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        return name, 201

    @app.get("/items")
    def listing() -> str:
        return ",".join(item_names(db.session()))

    @app.get("/info")
    def info() -> str:
        return str(db.session().info.get("app"))

    return app


def create_tables(db: Database[Any], app: Flask) -> None:
    """Create the tables in the database of ``app``, as a user's test fixture does."""
    with app.app_context():
        engine = db.engine
        assert isinstance(engine, sa.Engine)
        Base.metadata.create_all(engine)


def assert_no_leaks(db: Database[Any], *apps: Flask) -> None:
    """Every app's pool has its connections back; no unit and no session is left."""
    for app in apps:
        with app.app_context():
            assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert (db.live_units, db.live_sessions) == (0, 0)


# -- A. one Database() without a URL, several apps --------------------------------------------


@pytest.mark.parametrize("first", [0, 1], ids=["one-first", "two-first"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["register-all", "register-use-each"])
def test_each_app_writes_to_its_own_database(
    tmp_path: Path, registered: Registered, first: int, interleaved: bool
) -> None:
    """A test suite's app factory makes apps on other files; each request uses its app's file."""
    db: Database[Any] = Database()
    names = ["one", "two"]
    paths = [tmp_path / f"{name}.sqlite3" for name in names]
    order = [first, 1 - first]
    apps: dict[int, Flask] = {}

    def register(i: int) -> None:
        apps[i] = create_app(db, sqlite_uri(paths[i]), registered)
        assert not paths[i].exists(), "init_app built the engine or opened the file"

    def use(i: int) -> None:
        app = apps[i]
        with app.app_context():
            assert Path(str(db.engine.url.database)) == paths[i]
        create_tables(db, app)
        assert app.test_client().post(f"/items/{names[i]}").status_code == 201

    if interleaved:
        for i in order:
            register(i)
            use(i)
    else:
        for i in order:
            register(i)
        for i in order:
            use(i)
    for i in order:
        assert apps[i].test_client().get("/items").text == names[i]
        with apps[i].app_context():
            assert item_names(db.session()) == [names[i]]
    assert stored(paths[0]) == ["one"]
    assert stored(paths[1]) == ["two"]
    assert_no_leaks(db, apps[0], apps[1])


def test_each_app_gets_its_own_engine_and_session_options(
    tmp_path: Path, registered: Registered
) -> None:
    """'SQLALCHEMY_ENGINE_OPTIONS' and 'SQLALCHEMY_SESSION_OPTIONS' apply to their app only."""
    db: Database[Any] = Database()
    apps = []
    for name, key, size in [("one", "SQLALCHEMY_DATABASE_URI", 3), ("two", "DATABASE_URL", 4)]:
        options = {
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": size},
            "SQLALCHEMY_SESSION_OPTIONS": {"info": {"app": name}},
        }
        uri = sqlite_uri(tmp_path / f"{name}.sqlite3")
        apps.append(create_app(db, uri, registered, key=key, **options))
    one, two = apps
    for app, name, size in [(one, "one", 3), (two, "two", 4)]:
        with app.app_context():
            assert db.sync_engine.pool.size() == size  # type: ignore[attr-defined]
            assert Path(str(db.engine.url.database)) == tmp_path / f"{name}.sqlite3"
            assert db.session().info == {"app": name}
        assert app.test_client().get("/info").text == name
    assert_no_leaks(db, one, two)


# -- B. one Database with a URL is shared --------------------------------------------------


@pytest.mark.parametrize("made_with", ["url", "engine"])
def test_app_naming_another_url_is_refused_by_a_database_with_one(
    tmp_path: Path, registered: Registered, made_with: str
) -> None:
    """A Database made with a URL or engine has one: the error names it and the way out."""
    engine = sa.create_engine(sqlite_uri(tmp_path / "db.sqlite3"))
    db: Database[Any] = Database(engine=engine) if made_with == "engine" else Database(engine.url)
    try:
        with pytest.raises(RuntimeError) as refused:
            create_app(db, sqlite_uri(tmp_path / "app.sqlite3"), registered)
        message = str(refused.value)
        assert db.url in message
        assert "Database()" in message
        assert "without a URL" in message
        assert registered == []
    finally:
        db.dispose()
        engine.dispose()


def test_apps_naming_the_same_url_or_none_share_the_database(
    tmp_path: Path, registered: Registered
) -> None:
    """Apps that agree with the Database's URL, or name none, use its one engine."""
    path = tmp_path / "db.sqlite3"
    db: Database[Any] = Database(sqlite_uri(path))
    same = create_app(db, sqlite_uri(path), registered)
    unnamed = create_app(db, None, registered)
    create_tables(db, same)
    assert same.test_client().post("/items/same").status_code == 201
    assert unnamed.test_client().post("/items/unnamed").status_code == 201
    assert unnamed.test_client().get("/items").text == "same,unnamed"
    assert stored(path) == ["same", "unnamed"]
    assert_no_leaks(db, same, unnamed)


# -- C. listeners registered before any init_app ----------------------------------------------


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, with no 'DATABASE_URL' to fall back on."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return cwd


def listen_before_flush(db: Database[Any]) -> list[str]:
    """Listen on 'db.session' as a module does at import time; the names each flush adds."""
    flushed: list[str] = []

    def before_flush(session: Session, context: Any, instances: Any) -> None:
        flushed.extend(item.name for item in session.new if isinstance(item, Item))

    sa.event.listen(db.session, "before_flush", before_flush)
    return flushed


@pytest.mark.parametrize("count", [1, 2], ids=["one-app", "two-apps"])
def test_listener_registered_before_init_app_fires_for_every_app(
    tmp_path: Path, empty_cwd: Path, registered: Registered, count: int
) -> None:
    """'sa.event.listen(db.session, ...)' at import time builds nothing and still applies."""
    db: Database[Any] = Database()
    flushed = listen_before_flush(db)
    assert list(empty_cwd.iterdir()) == [], "the listener built the embedded default"
    names = ["one", "two"][:count]
    apps = [create_app(db, sqlite_uri(tmp_path / f"{name}.sqlite3"), registered) for name in names]
    for app, name in zip(apps, names, strict=True):
        create_tables(db, app)
        with app.app_context():
            assert Path(str(db.engine.url.database)) == tmp_path / f"{name}.sqlite3"
        assert app.test_client().post(f"/items/{name}").status_code == 201
        assert stored(tmp_path / f"{name}.sqlite3") == [name]
    assert flushed == names
    assert list(empty_cwd.iterdir()) == []
    assert_no_leaks(db, *apps)


# -- D. in-memory SQLite behind real threaded servers -----------------------------------------


def serve_and_check(port: int, db: Database[Any]) -> None:
    """Two POSTs and a GET, each on a connection (and server thread) of its own."""
    assert fetch(port, "POST", "/items/a") == (201, b"a")
    assert fetch(port, "POST", "/items/b") == (201, b"b")
    assert fetch(port, "GET", "/items") == (200, b"a,b")
    wait_until(lambda: (db.live_units, db.live_sessions) == (0, 0))


@pytest.mark.parametrize("uri", MEMORY_URLS)
def test_flask_in_memory_database_is_shared_by_server_threads(
    registered: Registered, uri: str
) -> None:
    """A table created in an app context is the one every request of the server sees."""
    db: Database[Any] = Database()
    app = create_app(db, uri, registered)
    create_tables(db, app)
    with werkzeug_server(app) as port:
        serve_and_check(port, db)
    with app.app_context():
        assert item_names(db.session()) == ["a", "b"]
    assert (db.live_units, db.live_sessions) == (0, 0)


def items_wsgi(db: Database[Any]) -> WSGIApplication:
    """A plain WSGI app: POST /items/<name> stores (201), GET /items lists."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            name = environ["PATH_INFO"].rpartition("/")[2]
            db.session.add(Item(name=name))
            start_response("201 Created", [("Content-Type", "text/plain")])
            return [name.encode()]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [",".join(item_names(db.session())).encode()]

    return WSGISessionMiddleware(app, db)


@pytest.mark.parametrize("uri", MEMORY_URLS)
def test_wsgi_in_memory_database_is_shared_by_server_threads(uri: str) -> None:
    """'Database("sqlite://")' behind WSGISessionMiddleware: one database for every thread."""
    db: Database[Any] = Database(uri)
    try:
        Base.metadata.create_all(db.sync_engine)
        with werkzeug_server(items_wsgi(db)) as port:
            serve_and_check(port, db)
        assert (db.live_units, db.live_sessions) == (0, 0)
    finally:
        db.dispose()


def items_starlette(db: Database[Any]) -> SessionMiddleware:
    """Sync endpoints, so that each request's session is used in a worker thread."""

    def create(request: Request) -> PlainTextResponse:
        name = request.path_params["name"]
        db.session.add(Item(name=name))
        return PlainTextResponse(name, status_code=201)

    def listing(request: Request) -> PlainTextResponse:
        return PlainTextResponse(",".join(item_names(db.session())))

    routes = [Route("/items/{name}", create, methods=["POST"]), Route("/items", listing)]
    return SessionMiddleware(Starlette(routes=routes), db)


@pytest.mark.anyio
@pytest.mark.parametrize("uri", MEMORY_URLS)
async def test_asgi_in_memory_database_is_shared_by_worker_threads(uri: str) -> None:
    """'Database("sqlite://")' behind SessionMiddleware on uvicorn, with sync endpoints."""
    db: Database[Any] = Database(uri)
    try:
        with db.begin() as session:
            Base.metadata.create_all(session.connection())
        async with (
            serve(items_starlette(db)) as served,
            httpx.AsyncClient(base_url=served.url, timeout=30) as http,
        ):
            for name in ["a", "b"]:
                response = await http.post(f"/items/{name}")
                assert (response.status_code, response.text) == (201, name)
            response = await http.get("/items")
            assert (response.status_code, response.text) == (200, "a,b")
            await wait_until_async(lambda: (db.live_units, db.live_sessions) == (0, 0))
        assert served.errors() == [], served.log()
    finally:
        db.dispose()


# -- E. relative SQLite paths -----------------------------------------------------------------


def test_relative_sqlite_path_is_in_the_instance_folder(
    tmp_path: Path, empty_cwd: Path, registered: Registered
) -> None:
    """As in Flask-SQLAlchemy: 'sqlite:///rel.sqlite3' lives in 'app.instance_path'."""
    instance = tmp_path / "instance"
    db: Database[Any] = Database()
    app = create_app(db, "sqlite:///rel.sqlite3", registered, instance_path=str(instance))
    assert not (instance / "rel.sqlite3").exists()
    create_tables(db, app)
    assert app.test_client().post("/items/rel").status_code == 201
    with app.app_context():
        assert Path(str(db.engine.url.database)) == instance / "rel.sqlite3"
    assert stored(instance / "rel.sqlite3") == ["rel"]
    assert list(empty_cwd.iterdir()) == []
    assert_no_leaks(db, app)


def test_absolute_sqlite_path_stays_where_it_is(
    tmp_path: Path, empty_cwd: Path, registered: Registered
) -> None:
    """An absolute path is not moved into the instance folder."""
    path = tmp_path / "abs.sqlite3"
    instance = tmp_path / "instance"
    db: Database[Any] = Database()
    app = create_app(db, sqlite_uri(path), registered, instance_path=str(instance))
    create_tables(db, app)
    assert app.test_client().post("/items/abs").status_code == 201
    assert stored(path) == ["abs"]
    assert not (instance / "abs.sqlite3").exists()
    assert list(empty_cwd.iterdir()) == []
    assert_no_leaks(db, app)


# -- F. other Flask-SQLAlchemy config keys ----------------------------------------------------


@pytest.mark.parametrize("echo", [True, False])
def test_sqlalchemy_echo_sets_the_engines_echo(
    tmp_path: Path, registered: Registered, monkeypatch: pytest.MonkeyPatch, echo: bool
) -> None:
    """'SQLALCHEMY_ECHO = True' logs the app's SQL, as in Flask-SQLAlchemy."""
    # An echoing engine adds a handler to SQLAlchemy's logger: restore its handlers after.
    engine_logger = logging.getLogger("sqlalchemy.engine.Engine")
    monkeypatch.setattr(engine_logger, "handlers", list(engine_logger.handlers))
    db: Database[Any] = Database()
    app = create_app(db, sqlite_uri(tmp_path / "echo.sqlite3"), registered, SQLALCHEMY_ECHO=echo)
    with app.app_context():
        if echo:
            assert db.engine.echo is True
        else:
            assert not db.engine.echo


def test_sqlalchemy_binds_is_not_silently_ignored(tmp_path: Path, registered: Registered) -> None:
    """Binds are not supported: an app that sets them is warned rather than misled."""
    db: Database[Any] = Database()
    with pytest.warns(UserWarning, match="SQLALCHEMY_BINDS"):
        create_app(
            db,
            sqlite_uri(tmp_path / "main.sqlite3"),
            registered,
            SQLALCHEMY_BINDS={"other": sqlite_uri(tmp_path / "other.sqlite3")},
        )


def test_sqlalchemy_track_modifications_false_is_accepted_silently(
    tmp_path: Path, registered: Registered
) -> None:
    """Configs written for Flask-SQLAlchemy 2 set it; it means nothing here and warns nothing."""
    db: Database[Any] = Database()
    path = tmp_path / "track.sqlite3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        app = create_app(db, sqlite_uri(path), registered, SQLALCHEMY_TRACK_MODIFICATIONS=False)
    create_tables(db, app)
    assert app.test_client().post("/items/tracked").status_code == 201
    assert stored(path) == ["tracked"]
    assert_no_leaks(db, app)
