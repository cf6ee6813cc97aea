"""``sessionscope.testing.isolated(db)`` with WSGI apps, used as a user's test suite would.

Inside ``with isolated(db):`` the requests (plain ``WSGISessionMiddleware`` with Werkzeug's
test client, or ``db.init_app(app)`` with Flask's), ``db.begin()`` blocks and app contexts
of a test share one transaction per engine: what a request committed is seen by the next
one, a connection of its own (``rows()``) sees nothing of it, and after the block nothing
is left.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from wsgiref.types import WSGIApplication

import pytest
import sqlalchemy as sa
from flask import Flask, Response, g, request, stream_with_context
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool
from werkzeug.test import Client
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response as WerkzeugResponse

from sessionscope import Database
from sessionscope.middleware.wsgi import WSGISessionMiddleware
from sessionscope.testing import isolated

from ._models import Base, Item
from ._servers import fetch, wait_until, werkzeug_server
from .conftest import Backend, assert_no_leaks, backend_params, idle_in_transaction

sync_backends = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)

Rows = Callable[[], list[str]]
# A view of the shared scenario: the request's 'name' argument in, (body, status) out.
View = Callable[[str], tuple[str, int]]


class Boom(Exception):
    """An error that a view or a test body raises and nothing handles."""


def names(db: Database[Any]) -> list[str]:
    """The item names the current unit's session sees."""
    return list(db.session.scalars(sa.select(Item.name).order_by(Item.id)))


def call(client: Client, method: str, path: str) -> tuple[int, str]:
    """One request through ``client``, read whole and closed as a server would.

    An error the app lets out counts as the 500 a server sends for it (Flask answers it
    with a 500 itself).
    """
    try:
        with client.open(path, method=method) as response:
            return response.status_code, response.get_data(as_text=True)
    except Boom:
        return 500, ""


# -- one scenario, plain WSGI and Flask ---------------------------------------------------------


def scenario_views(db: Database[Any]) -> dict[str, View]:
    """The views of the shared scenario, by path."""

    def create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))  # no flush: a duplicate fails at the commit
        return name, 201

    def listing(name: str) -> tuple[str, int]:
        return ",".join(names(db)), 200

    def conflict(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        db.session.flush()
        return name, 409

    def caught(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        db.session.flush()
        # Caught, and no rollback: on PostgreSQL the transaction is aborted.
        with contextlib.suppress(IntegrityError):
            db.session.execute(sa.insert(Item).values(name="first"))
        return name, 201

    def caught_then_rolled_back(name: str) -> tuple[str, int]:
        db.session.add(Item(name=f"{name}-lost"))
        db.session.flush()
        try:
            db.session.execute(sa.insert(Item).values(name="first"))
        except IntegrityError:
            db.session.rollback()
        db.session.add(Item(name=name))
        return name, 201

    def guarded(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        db.session.flush()
        # Only the nested savepoint is rolled back.
        with contextlib.suppress(IntegrityError), db.session.begin_nested():
            db.session.execute(sa.insert(Item).values(name="first"))
        return name, 201

    def raises(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        db.session.flush()
        raise Boom("the view failed")

    def commit_then_conflict(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        db.session.commit()
        db.session.add(Item(name=f"{name}-after"))
        db.session.flush()
        return name, 409

    def rollback_then_create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=f"{name}-dropped"))
        db.session.flush()
        db.session.rollback()
        db.session.add(Item(name=name))
        return name, 201

    return {
        "/create": create,
        "/list": listing,
        "/conflict": conflict,
        "/caught": caught,
        "/caught-then-rolled-back": caught_then_rolled_back,
        "/guarded": guarded,
        "/raise": raises,
        "/commit-then-conflict": commit_then_conflict,
        "/rollback-then-create": rollback_then_create,
    }


def build_client(adapter: str, db: Database[Any], views: dict[str, View]) -> Client:
    """A test client of an app serving ``views`` through ``adapter`` (a 'name' query argument)."""
    if adapter == "wsgi":

        @Request.application
        def app(request: Request) -> WerkzeugResponse:
            body, status = views[request.path](request.args.get("name", ""))
            return WerkzeugResponse(body, status=status)

        wrapped: WSGIApplication = WSGISessionMiddleware(app, db)
        return Client(wrapped)
    flask_app = Flask(__name__)
    db.init_app(flask_app)
    for path, view in views.items():
        flask_app.add_url_rule(path, path, _endpoint(view), methods=["GET", "POST"])
    return flask_app.test_client()


def _endpoint(view: View) -> Callable[[], tuple[str, int]]:
    def endpoint() -> tuple[str, int]:
        return view(request.args.get("name", ""))

    return endpoint


@sync_backends
@pytest.mark.parametrize("adapter", ["wsgi", "flask"])
def test_requests_of_a_test_see_each_other_and_leave_nothing(
    adapter: str, db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """201s are kept for the next request, 409s, failed commits and aborted transactions are
    not (and the next request still writes), explicit commits and rollbacks work; a
    connection of its own sees nothing, during the block or after it."""
    client = build_client(adapter, db, scenario_views(db))
    with isolated(db) as isolation:
        assert call(client, "POST", "/create?name=first") == (201, "first")
        assert call(client, "GET", "/list") == (200, "first")
        assert rows() == []
        # A 409 in the middle: its own row is gone, the earlier 201's stays.
        assert call(client, "POST", "/conflict?name=refused") == (409, "refused")
        assert call(client, "GET", "/list") == (200, "first")
        # A failed commit (the duplicate is flushed by the commit) still answers 500.
        status, body = call(client, "POST", "/create?name=first")
        assert (status, body) == (500, "Internal Server Error")
        assert call(client, "GET", "/list") == (200, "first")
        # A failed statement the app caught without a rollback: never committed.
        assert call(client, "POST", "/caught?name=aborted")[0] == 500
        assert call(client, "POST", "/create?name=second") == (201, "second")
        assert call(client, "GET", "/list") == (200, "first,second")
        # Caught, then rolled back: the rest of the request commits.
        assert call(client, "POST", "/caught-then-rolled-back?name=retried")[0] == 201
        # Caught inside 'begin_nested()': only that savepoint is rolled back.
        assert call(client, "POST", "/guarded?name=guarded")[0] == 201
        # An error the view lets out: a 500, its row gone.
        assert call(client, "POST", "/raise?name=raised")[0] == 500
        assert call(client, "GET", "/list") == (200, "first,second,retried,guarded")
        # An explicit commit stays, what follows it is rolled back by the 409.
        assert call(client, "POST", "/commit-then-conflict?name=saved")[0] == 409
        # An explicit rollback, then a write that the 201 commits.
        assert call(client, "POST", "/rollback-then-create?name=redo") == (201, "redo")
        assert call(client, "GET", "/list") == (200, "first,second,retried,guarded,saved,redo")
        assert rows() == []
        assert (db.live_units, db.live_sessions) == (0, 0)
        assert len(isolation.connections) == 1
    assert isolation.connections == {}
    assert rows() == []
    assert_no_leaks(db, backend)
    # Outside the block the same app commits for real again (the connection is clean).
    assert call(client, "POST", "/create?name=real") == (201, "real")
    assert call(client, "POST", "/conflict?name=not-real")[0] == 409
    assert rows() == ["real"]


# -- Flask: app contexts, db.begin(), streams, teardown functions ------------------------------


def items_app(db: Database[Any]) -> Flask:
    """A Flask app: POST /create/<name> (201, or ?status=), GET /list."""
    app = Flask(__name__)
    db.init_app(app)

    @app.post("/create/<name>")
    def create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        return name, int(request.args.get("status", "201"))

    @app.get("/list")
    def listing() -> str:
        return ",".join(names(db))

    return app


@sync_backends
def test_app_contexts_and_begin_blocks_share_the_test_transaction(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """The test's own 'db.begin()' blocks and app contexts see what requests committed and
    are seen by them; an app context is never committed by itself; a 'db.begin()' block in
    a view commits into the request (rolled back with it once the request has written)."""
    app = items_app(db)

    @app.post("/nested/<name>")
    def nested(name: str) -> tuple[str, int]:
        # ?first=block: the block runs before the request's session is used.
        block_first = request.args.get("first") == "block"
        if not block_first:
            db.session.add(Item(name=name))
            db.session.flush()
        with db.begin() as session:
            session.add(Item(name=f"{name}-block"))
        if block_first:
            db.session.add(Item(name=name))
        return name, int(request.args.get("status", "201"))

    def begin_then_raise() -> None:
        with db.begin() as session:
            session.add(Item(name="begun-then-raised"))
            session.flush()
            raise Boom

    client = app.test_client()
    with isolated(db):
        with db.begin() as session:
            session.add(Item(name="seeded"))
        assert call(client, "GET", "/list") == (200, "seeded")
        assert call(client, "POST", "/create/one") == (201, "one")
        with app.app_context():
            assert names(db) == ["seeded", "one"]
            db.session.add(Item(name="uncommitted"))
            db.session.flush()
            assert names(db) == ["seeded", "one", "uncommitted"]
            assert rows() == []
        assert (db.live_units, db.live_sessions) == (0, 0)
        assert call(client, "GET", "/list") == (200, "seeded,one")
        with app.app_context():
            db.session.add(Item(name="committed"))
            db.session.commit()
            db.session.add(Item(name="after-commit"))
        assert call(client, "GET", "/list") == (200, "seeded,one,committed")
        with db.begin() as session:
            assert list(session.scalars(sa.select(Item.name).order_by(Item.id))) == [
                "seeded",
                "one",
                "committed",
            ]
            session.add(Item(name="begun"))
        with pytest.raises(Boom):
            begin_then_raise()
        assert call(client, "GET", "/list") == (200, "seeded,one,committed,begun")
        # db.begin() nested in a view.
        assert call(client, "POST", "/nested/kept") == (201, "kept")
        assert call(client, "POST", "/nested/dropped?status=409")[0] == 409
        assert call(client, "POST", "/nested/early?first=block&status=409")[0] == 409
        expected = "seeded,one,committed,begun,kept,kept-block,early-block"
        assert call(client, "GET", "/list") == (200, expected)
        assert rows() == []
    assert rows() == []
    assert_no_leaks(db, backend)


@sync_backends
def test_streamed_bodies_and_teardown_functions_write_into_the_test_transaction(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """A 'stream_with_context' body's writes and a 'teardown_appcontext' function's (the
    second commit) are seen by the next request, follow the status, and are gone after."""
    app = items_app(db)

    @app.get("/stream/<name>")
    def stream(name: str) -> Response:
        db.session.add(Item(name=name))

        def body() -> Iterator[str]:
            yield f"{request.path},"
            db.session.add(Item(name=f"{name}-streamed"))
            yield ",".join(names(db))

        return Response(stream_with_context(body()))

    @app.post("/audited/<name>")
    def audited(name: str) -> tuple[str, int]:
        g.audit = name
        db.session.add(Item(name=name))
        return name, int(request.args.get("status", "201"))

    @app.teardown_appcontext
    def audit(exc: BaseException | None) -> None:
        name = g.pop("audit", None)
        if name is not None:
            db.session.add(Item(name=f"{name}-audit"))

    client = app.test_client()
    with isolated(db):
        assert call(client, "GET", "/stream/s") == (200, "/stream/s,s,s-streamed")
        assert call(client, "GET", "/list") == (200, "s,s-streamed")
        assert call(client, "POST", "/audited/a") == (201, "a")
        assert call(client, "GET", "/list") == (200, "s,s-streamed,a,a-audit")
        assert call(client, "POST", "/audited/refused?status=409")[0] == 409
        with app.app_context():
            assert names(db) == ["s", "s-streamed", "a", "a-audit"]
        assert rows() == []
        assert (db.live_units, db.live_sessions) == (0, 0)
    assert rows() == []
    assert_no_leaks(db, backend)


@sync_backends
def test_each_block_starts_empty_even_after_a_test_that_raised(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """Two tests in a row on one database: the first records and runs after-commit
    callbacks and raises, yet rolls back and returns its connection; the second (which
    only records callbacks) starts from an empty table; afterwards the app commits again."""
    app = Flask(__name__)
    db.init_app(app)
    ran: list[str] = []
    made: dict[str, Callable[[], object]] = {}

    def note(name: str) -> None:
        def callback() -> None:
            ran.append(name)

        made[name] = callback
        db.after_commit(callback)

    @app.post("/create/<name>")
    def create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        note(name)
        return name, int(request.args.get("status", "201"))

    @app.post("/commit-then-conflict/<name>")
    def commit_then_conflict(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        note(name)
        db.session.commit()  # covers the callback, whatever the status
        db.session.add(Item(name=f"{name}-after"))
        note(f"{name}-after")
        return name, 409

    @app.get("/list")
    def listing() -> str:
        return ",".join(names(db))

    client = app.test_client()

    def first_test() -> None:
        # It fails after its requests.
        with isolated(db) as isolation:
            assert call(client, "POST", "/create/a") == (201, "a")
            assert ran == ["a"]
            assert call(client, "POST", "/create/refused?status=409")[0] == 409
            with db.begin() as session:
                session.add(Item(name="b"))
                note("b")
            assert ran == ["a", "b"]
            assert call(client, "POST", "/commit-then-conflict/k")[0] == 409
            assert ran == ["a", "b", "k"]
            assert isolation.callbacks == [made["a"], made["b"], made["k"]]
            assert call(client, "GET", "/list") == (200, "a,b,k")
            raise Boom("the test failed")

    with pytest.raises(Boom, match="the test failed"):
        first_test()
    assert rows() == []
    assert_no_leaks(db, backend)

    # The second test: it sees nothing of the first, and only records its callbacks.
    with isolated(db, run_callbacks=False) as second:
        assert call(client, "GET", "/list") == (200, "")
        assert call(client, "POST", "/create/c") == (201, "c")
        assert call(client, "POST", "/create/dropped?status=409")[0] == 409
        assert call(client, "GET", "/list") == (200, "c")
        assert second.callbacks == [made["c"]]
        assert ran == ["a", "b", "k"]
    assert rows() == []
    assert_no_leaks(db, backend)

    # Without isolation: commits for real, callbacks run.
    assert call(client, "POST", "/create/real") == (201, "real")
    assert call(client, "POST", "/create/rolled-back?status=409")[0] == 409
    assert rows() == ["real"]
    assert ran == ["a", "b", "k", "real"]


@sync_backends
def test_misuse_and_a_unit_waiting_too_long_are_reported(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """isolated() refuses to nest or to start with a unit open; a request of the thread of
    an app context that holds the connection runs inside it; one of another thread that
    waits longer than 'wait' fails naming that unit."""
    app = items_app(db)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    client = app.test_client()
    with (
        app.app_context(),
        pytest.raises(RuntimeError, match="must start before any unit"),
        isolated(db),
    ):
        pass  # pragma: no cover
    with isolated(db, wait=0.3):
        with pytest.raises(RuntimeError, match="does not nest"), isolated(db):
            pass  # pragma: no cover
        assert call(client, "POST", "/create/first") == (201, "first")
        with app.app_context():
            assert names(db) == ["first"]  # this unit has the connection until it ends
            # A request of the same thread (the usual Flask test) nests in it and runs.
            assert call(client, "GET", "/list") == (200, "first")
            holder = re.escape(repr(db.units.current()))
            errors: list[BaseException] = []
            answers: list[tuple[int, str]] = []

            def other_thread() -> None:
                try:
                    client.get("/list")
                except RuntimeError as error:
                    errors.append(error)
                # A write that waits in vain at its commit: the commit fails, a 500.
                answers.append(call(client, "POST", "/create/second"))

            started = time.monotonic()
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join(10)
            assert time.monotonic() - started >= 0.6
            assert len(errors) == 1
            assert re.search(f"waited 0.3 s for {holder}, which", str(errors[0]))
            assert answers == [(500, "Internal Server Error")]
        assert call(client, "GET", "/list") == (200, "first")
        assert (db.live_units, db.live_sessions) == (0, 0)
    assert rows() == []
    assert_no_leaks(db, backend)


@sync_backends
def test_concurrent_requests_to_a_threaded_server_take_turns(
    db: Database[Any], rows: Rows, backend: Backend
) -> None:
    """Concurrent requests to a real threaded Werkzeug server all succeed, one at a time on
    the shared connection; the app lists them all, and nothing is stored."""
    app = items_app(db)
    lock = threading.Lock()
    active = [0]
    peak = [0]

    @app.post("/slow/<name>")
    def slow(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        db.session.flush()  # from here until its unit ends, the request has the connection
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.03)
        with lock:
            active[0] -= 1
        return name, 201

    expected = [f"n{i}" for i in range(6)]
    with isolated(db), werkzeug_server(app) as port:
        with ThreadPoolExecutor(len(expected)) as pool:
            replies = list(pool.map(lambda name: fetch(port, "POST", f"/slow/{name}"), expected))
        assert replies == [(201, name.encode()) for name in expected]
        wait_until(lambda: db.live_units == 0)
        status, body = fetch(port, "GET", "/list")
        assert status == 200
        assert sorted(body.decode().split(",")) == expected
        assert rows() == []
        if backend.name == "postgresql":
            assert idle_in_transaction(backend) == 1  # the test's own outer transaction
    assert peak[0] == 1
    assert rows() == []
    assert_no_leaks(db, backend)


# -- a Database() without URL serving two apps ---------------------------------------------------


def stored(path: Path) -> list[str]:
    """The item names in the SQLite file at ``path``, read through a connection of its own."""
    engine = sa.create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(sa.text("SELECT name FROM items ORDER BY id")))
    finally:
        engine.dispose()


def test_a_database_without_url_isolates_each_apps_own_engine(tmp_path: Path) -> None:
    """Each app's requests run on its own file's connection, opened when first needed;
    neither file keeps a row, and both engines get their connection back."""
    paths = [tmp_path / "one.sqlite3", tmp_path / "two.sqlite3"]
    for path in paths:
        engine = sa.create_engine(f"sqlite:///{path}", poolclass=NullPool)
        Base.metadata.create_all(engine)
        engine.dispose()
    db: Database[Any] = Database()
    apps: list[Flask] = []
    for path in paths:
        app = Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{path}"
        db.init_app(app)

        @app.post("/create/<name>")
        def create(name: str) -> tuple[str, int]:
            db.session.add(Item(name=name))
            return name, int(request.args.get("status", "201"))

        @app.get("/list")
        def listing() -> str:
            return ",".join(names(db))

        apps.append(app)
    one, two = (app.test_client() for app in apps)
    try:
        with isolated(db) as isolation:
            assert isolation.connections == {}
            assert call(one, "POST", "/create/a1") == (201, "a1")
            assert len(isolation.connections) == 1
            assert call(two, "POST", "/create/b1") == (201, "b1")
            assert len(isolation.connections) == 2
            assert call(one, "POST", "/create/a2?status=409")[0] == 409
            assert call(two, "POST", "/create/b2") == (201, "b2")
            assert call(one, "GET", "/list") == (200, "a1")
            assert call(two, "GET", "/list") == (200, "b1,b2")
            with apps[1].app_context():
                assert names(db) == ["b1", "b2"]
            assert [stored(path) for path in paths] == [[], []]
        assert [stored(path) for path in paths] == [[], []]
        engines: list[sa.Engine] = []
        for app in apps:
            with app.app_context():
                engines.append(db.sync_engine)
        assert engines[0] is not engines[1]
        assert [engine.pool.checkedout() for engine in engines] == [0, 0]  # type: ignore[attr-defined]
        assert (db.live_units, db.live_sessions) == (0, 0)
        # Without isolation each app stores in its own file again.
        assert call(one, "POST", "/create/real-one")[0] == 201
        assert call(two, "POST", "/create/real-two")[0] == 201
        assert [stored(path) for path in paths] == [["real-one"], ["real-two"]]
    finally:
        db.dispose()
