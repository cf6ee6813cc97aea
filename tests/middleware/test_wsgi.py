"""``WSGISessionMiddleware`` driven by a minimal PEP 3333 server loop that records everything."""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import pytest
from sqlalchemy import event
from werkzeug.test import EnvironBuilder
from werkzeug.wsgi import ClosingIterator

import sessionscope
from sessionscope import Database
from sessionscope.middleware.wsgi import WSGISessionMiddleware

from .._models import Child, Item
from ..conftest import backend_params
from ._asgi_apps import nothing_left

sync_backends = pytest.mark.parametrize("backend", backend_params(modes=["sync"]), indirect=True)
sqlite_sync = pytest.mark.parametrize(
    "backend", backend_params(backends=["sqlite"], modes=["sync"]), indirect=True
)

Rows = Callable[[], list[str]]


class Boom(Exception):
    """An error the app raises and nothing handles."""


class Server:
    """A PEP 3333 server loop: what reaches it is recorded in ``events``."""

    def __init__(self, db: Database[Any] | None = None) -> None:
        self.events: list[str] = []
        if db is not None:
            event.listen(db.sync_engine, "commit", lambda connection: self.events.append("COMMIT"))
            event.listen(db.sync_engine, "rollback", self._rollback)

    def _rollback(self, connection: object) -> None:
        self.events.append("ROLLBACK")

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        self.events.append(f"start_response {status}")
        return self.write

    def write(self, data: bytes) -> None:
        self.events.append(f"write {data.decode()}")

    def run(self, app: WSGIApplication, *, stop_after: int | None = None) -> bytes:
        """Call ``app``, send its chunks (at most ``stop_after``), and always close it."""
        environ = EnvironBuilder(method="POST", path="/").get_environ()
        iterable = app(environ, self.start_response)
        self.events.append("returned")
        body: list[bytes] = []
        try:
            for chunk in iterable:
                self.events.append(f"chunk {chunk.decode()}")
                body.append(chunk)
                if stop_after is not None and len(body) >= stop_after:
                    break
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
            self.events.append("closed")
        return b"".join(body)


def plain_app(
    db: Database[Any], status: str = "201 Created", *, orphan: bool = False
) -> WSGIApplication:
    """An app that writes, calls ``start_response`` and returns its body at once."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        db.session.add(Item(name="plain"))
        if orphan:
            db.session.add(Child(parent_id=999_999))
        start_response(status, [("Content-Type", "text/plain")])
        return [b"body"]

    return app


# -- when the commit happens ------------------------------------------------------------------


@sync_backends
def test_commit_finishes_before_the_status_reaches_the_server(
    db: Database[Any], rows: Rows
) -> None:
    """The status line can only follow a commit that succeeded (rule 3, 15)."""
    server = Server(db)
    assert server.run(WSGISessionMiddleware(plain_app(db), db)) == b"body"
    assert server.events == [
        "COMMIT",
        "start_response 201 Created",
        "returned",
        "chunk body",
        "closed",
    ]
    assert rows() == ["plain"]


@sync_backends
def test_generator_app_commits_before_its_first_chunk(db: Database[Any], rows: Rows) -> None:
    """An app that calls 'start_response' on first iteration still commits before the status."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        db.session.add(Item(name="lazy"))
        start_response("200 OK", [])
        yield b"first"
        yield b"second"

    server = Server(db)
    server.run(WSGISessionMiddleware(app, db))
    assert server.events == [
        "returned",
        "COMMIT",
        "start_response 200 OK",
        "chunk first",
        "chunk second",
        "closed",
    ]
    assert rows() == ["lazy"]


@sync_backends
def test_write_callable_commits_before_the_first_write(db: Database[Any], rows: Rows) -> None:
    """A legacy app using 'write()' gets its commit before its first bytes go out."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        db.session.add(Item(name="written"))
        write = start_response("200 OK", [])
        write(b"hello")
        return []

    server = Server(db)
    server.run(WSGISessionMiddleware(app, db))
    assert server.events[:3] == ["COMMIT", "start_response 200 OK", "write hello"]
    assert rows() == ["written"]


@sync_backends
def test_writes_after_the_first_write_are_committed_with_a_list_body(
    db: Database[Any], rows: Rows
) -> None:
    """An app that write()s, writes to the database again, then returns a built body: the
    later write is committed before the body is handed over, not rolled back behind a 200.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [])
        db.session.add(Item(name="before-write"))
        write(b"head ")
        db.session.add(Item(name="after-write"))
        return [b"tail"]

    server = Server(db)
    assert server.run(WSGISessionMiddleware(app, db)) == b"tail"
    assert server.events == [
        "COMMIT",
        "start_response 200 OK",
        "write head ",
        "COMMIT",
        "returned",
        "chunk tail",
        "closed",
    ]
    assert rows() == ["before-write", "after-write"]
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
def test_error_handler_status_decides(db: Database[Any], rows: Rows) -> None:
    """An app replacing its own 200 by a 500 ('exc_info') rolls back; the server sees the 500."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        db.session.add(Item(name="dropped"))
        start_response("200 OK", [])
        try:
            raise Boom("late failure")
        except Boom:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"failed"]

    server = Server(db)
    server.run(WSGISessionMiddleware(app, db))
    assert [e for e in server.events if e.startswith("start_response")] == [
        "start_response 500 Internal Server Error"
    ]
    assert rows() == []


@sync_backends
def test_list_body_ends_the_unit_when_the_app_returns(db: Database[Any]) -> None:
    """A body built in full needs no session: the unit ends before the server iterates it."""
    middleware = WSGISessionMiddleware(plain_app(db), db)
    environ = EnvironBuilder().get_environ()
    iterable = middleware(environ, Server().start_response)
    try:
        assert db.live_units == 0
    finally:
        getattr(iterable, "close", lambda: None)()


# -- failed commits ---------------------------------------------------------------------------


@sync_backends
def test_failed_commit_sends_only_the_500(db: Database[Any], rows: Rows) -> None:
    """The app's 201 and body never reach the server when the commit fails (rule 4)."""
    server = Server()
    body = server.run(WSGISessionMiddleware(plain_app(db, orphan=True), db))
    assert body == b"Internal Server Error"
    assert [e for e in server.events if e.startswith("start_response")] == [
        "start_response 500 Internal Server Error"
    ]
    assert rows() == []


@sync_backends
def test_failed_commit_drops_the_apps_writes(db: Database[Any], rows: Rows) -> None:
    """A 'write()' app whose commit fails sends nothing of its own, only the 500."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        db.session.add(Child(parent_id=999_999))
        write = start_response("200 OK", [])
        write(b"app bytes")
        write(b"more app bytes")
        return []

    server = Server()
    body = server.run(WSGISessionMiddleware(app, db))
    assert body == b"Internal Server Error"
    assert not [e for e in server.events if e.startswith("write")]


@sync_backends
def test_commit_error_hook_that_raises_falls_back_to_a_plain_500(db: Database[Any]) -> None:
    """A broken 'on_commit_error' still leaves the client a 500, never the app's 2xx."""

    def hook(error: BaseException) -> WSGIApplication:
        raise Boom("hook failed")

    middleware = WSGISessionMiddleware(plain_app(db, orphan=True), db, on_commit_error=hook)
    assert Server().run(middleware) == b"Internal Server Error"


@sync_backends
def test_failed_commit_of_stream_writes_aborts_the_response(db: Database[Any], rows: Rows) -> None:
    """Writes that fail to commit after the status went out abort the body, never end it cleanly."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        db.session.add(Item(name="before"))
        start_response("200 OK", [])
        yield b"first"
        db.session.add(Child(parent_id=999_999))
        yield b"second"

    server = Server()
    with pytest.raises(RuntimeError, match="aborted") as raised:
        server.run(WSGISessionMiddleware(app, db))
    assert raised.value.__cause__ is not None
    assert server.events[-2:] == ["chunk second", "closed"]
    assert rows() == ["before"]


# -- removal on every path ------------------------------------------------------------------


@sync_backends
def test_app_raising_before_returning_is_cleaned_at_once(db: Database[Any], rows: Rows) -> None:
    """No iterable means no close(): the unit must end before the error leaves (20d)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        db.session.add(Item(name="lost"))
        db.session.flush()
        raise Boom("before start_response")

    server = Server()
    with pytest.raises(Boom):
        server.run(WSGISessionMiddleware(app, db))
    assert (db.live_units, db.live_sessions) == (0, 0)
    assert db.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert server.events == []
    assert rows() == []


@sync_backends
def test_app_raising_while_iterating_rolls_back(db: Database[Any], rows: Rows) -> None:
    """A body that fails mid-stream rolls back what it wrote since the commit."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        db.session.add(Item(name="committed"))
        start_response("200 OK", [])
        yield b"first"
        db.session.add(Item(name="lost"))
        db.session.flush()
        raise Boom("mid-stream")

    with pytest.raises(Boom):
        Server().run(WSGISessionMiddleware(app, db))
    assert rows() == ["committed"]


@sync_backends
def test_unit_ends_after_the_last_chunk(db: Database[Any], rows: Rows) -> None:
    """The session lives while the body streams and is removed once, after the last chunk (20a)."""
    seen: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        for name in ("one", "two"):
            db.session.add(Item(name=name))
            seen.append(db.live_sessions)
            yield name.encode()

    middleware = WSGISessionMiddleware(app, db)
    iterable = middleware(EnvironBuilder().get_environ(), Server().start_response)
    assert db.live_units == 0  # the unit opens on first use, in the body
    assert list(iterable) == [b"one", b"two"]
    assert (db.live_units, db.live_sessions) == (0, 0)
    close = getattr(iterable, "close")  # noqa: B009 - our iterable always has one
    close()
    close()
    assert seen == [1, 1]
    assert rows() == ["one", "two"]


@sync_backends
def test_closing_early_rolls_back_and_closes_the_apps_body(db: Database[Any], rows: Rows) -> None:
    """A server that stops after one chunk (client gone) rolls back and closes the app (20b)."""
    closed: list[bool] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        db.session.add(Item(name="committed"))
        start_response("200 OK", [])
        try:
            yield b"first"
            db.session.add(Item(name="during"))
            db.session.flush()
            yield b"second"
            yield b"never sent"
        finally:
            closed.append(True)

    Server().run(WSGISessionMiddleware(app, db), stop_after=2)
    assert closed == [True]
    assert (db.live_units, db.live_sessions) == (0, 0)
    assert rows() == ["committed"]


@sync_backends
def test_forwarding_middleware_on_either_side_still_cleans(db: Database[Any], rows: Rows) -> None:
    """Iterable proxies that forward close() around or inside ours keep the cleanup (20c)."""
    closed: list[str] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        try:
            db.session.add(Item(name="inner"))
            start_response("200 OK", [])
            yield b"first"
            db.session.add(Item(name="dropped"))
            yield b"second"
        finally:
            closed.append("app")

    def proxy(inner: WSGIApplication, name: str) -> WSGIApplication:
        def wrapped(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            return ClosingIterator(inner(environ, start_response), lambda: closed.append(name))

        return wrapped

    stack = proxy(WSGISessionMiddleware(proxy(app, "inside"), db), "outside")
    Server().run(stack, stop_after=1)
    assert closed == ["app", "inside", "outside"]
    assert (db.live_units, db.live_sessions) == (0, 0)
    assert rows() == ["inner"]


@sync_backends
def test_cleanup_survives_an_app_close_that_raises(db: Database[Any], rows: Rows) -> None:
    """An app whose close() raises still gets its unit rolled back and removed; the error rises."""

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            db.session.add(Item(name="during"))
            db.session.flush()
            yield b"chunk"

        def close(self) -> None:
            raise Boom("close failed")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    with pytest.raises(Boom, match="close failed"):
        Server().run(WSGISessionMiddleware(app, db), stop_after=1)
    assert (db.live_units, db.live_sessions) == (0, 0)
    assert rows() == []


# -- setup and misuse -----------------------------------------------------------------------


@sync_backends
def test_a_request_that_never_uses_the_session_opens_no_session(db: Database[Any]) -> None:
    """No unit opens (as under ASGI): no session, no connection and no SQL come of it."""
    server = Server(db)
    seen: list[tuple[int, int]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.append((db.live_units, db.live_sessions))
        start_response("200 OK", [])
        return [b"static"]

    assert server.run(WSGISessionMiddleware(app, db)) == b"static"
    assert seen == [(0, 0)]
    assert server.events == ["start_response 200 OK", "returned", "chunk static", "closed"]
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
def test_a_session_first_used_by_the_stream_is_committed_by_the_status(
    db: Database[Any], rows: Rows
) -> None:
    """A body that first uses the session after the status left still gets its commit."""
    server = Server(db)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        db.session.add(Item(name="late"))
        yield b"second"

    assert server.run(WSGISessionMiddleware(app, db)) == b"firstsecond"
    assert server.events == [
        "returned",
        "start_response 200 OK",
        "chunk first",
        "chunk second",
        "COMMIT",
        "closed",
    ]
    assert rows() == ["late"]
    assert (db.live_units, db.live_sessions) == (0, 0)


@sync_backends
def test_after_the_request_the_session_is_refused_in_its_context(db: Database[Any]) -> None:
    """Code the body's context runs after close() gets the error, never a fresh unit."""
    contexts: list[Any] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        contexts.append(contextvars.copy_context())
        start_response("200 OK", [])
        return [b"ok"]

    Server().run(WSGISessionMiddleware(app, db))
    with pytest.raises(RuntimeError, match="already finished"):
        contexts[0].run(lambda: db.session.add(Item(name="after")))
    assert (db.live_units, db.live_sessions) == (0, 0)


def _outliving_thread_app(
    use: Callable[[], object], started: threading.Event
) -> tuple[WSGIApplication, list[object], list[threading.Thread]]:
    """An app that runs ``use()`` in a thread of the request's context, returns once
    ``started`` is set and never waits for the thread; what ``use()`` returned or the
    RuntimeError it raised goes to the outcome list.
    """
    outcome: list[object] = []
    threads: list[threading.Thread] = []

    def work() -> None:
        try:
            outcome.append(use())
        except RuntimeError as error:
            outcome.append(error)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(work,))
        threads.append(thread)
        thread.start()
        assert started.wait(5)
        start_response("200 OK", [])
        return [b"ok"]

    return app, outcome, threads


@sqlite_sync
def test_thread_asking_for_the_session_as_the_request_ends_leaves_nothing(
    db: Database[Any],
) -> None:
    """Many requests whose thread makes the first 'db.session' call just as the request
    ends: whichever comes first, the session is removed or refused, never left open.
    """
    failures: list[BaseException] = []
    started = threading.Event()
    started.set()

    def use() -> object:
        # Only asks for the session: running SQL on it while the request commits would be
        # two threads in one session at once, a race of the app's own.
        try:
            return db.session()
        except RuntimeError as error:
            assert "already finished" in str(error)  # noqa: PT017 - re-raised below
            return error
        except BaseException as error:  # pragma: no cover - reported by the assert below
            failures.append(error)
            return error

    app, outcome, threads = _outliving_thread_app(use, started)
    middleware = WSGISessionMiddleware(app, db)
    for _ in range(200):
        assert Server().run(middleware) == b"ok"
    for thread in threads:
        thread.join(5)
    assert failures == []
    assert len(outcome) == 200
    assert nothing_left(db) == (0, 0, 0)


@sync_backends
def test_installed_twice_for_one_database_is_refused(db: Database[Any], rows: Rows) -> None:
    """Two middlewares for one database would nest units silently; the second one refuses."""
    app = WSGISessionMiddleware(WSGISessionMiddleware(plain_app(db), db), db)
    with pytest.raises(RuntimeError, match="installed twice"):
        Server().run(app)
    assert rows() == []


@sync_backends
def test_two_databases_stack(make_db: Callable[..., Database[Any]], rows: Rows) -> None:
    """One middleware per database: each commits its own session in the same request."""
    first, second = make_db(), make_db()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        first.session.add(Item(name="first"))
        second.session.add(Item(name="second"))
        start_response("200 OK", [])
        return [b"ok"]

    Server().run(WSGISessionMiddleware(WSGISessionMiddleware(app, first), second))
    assert sorted(rows()) == ["first", "second"]


@sync_backends
def test_second_start_response_without_exc_info_is_refused(db: Database[Any], rows: Rows) -> None:
    """PEP 3333 allows a second 'start_response' only with 'exc_info': say so, store nothing."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        db.session.add(Item(name="twice"))
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b"never"]  # pragma: no cover - the second call raises

    with pytest.raises(RuntimeError, match="a second time without 'exc_info'"):
        Server(db).run(WSGISessionMiddleware(app, db))
    assert rows() == []
    assert db.live_units == 0


@sync_backends
def test_session_outside_a_request_names_the_fix(db: Database[Any]) -> None:
    """Outside any unit, 'db.session' says what to install instead of making an orphan."""
    with pytest.raises(RuntimeError, match="WSGISessionMiddleware"):
        db.session()


def test_default_database_is_sessionscope_db() -> None:
    """With no 'db', the middleware uses the default 'sessionscope.db'."""
    assert WSGISessionMiddleware(plain_app(sessionscope.db)).db is sessionscope.db
