"""The fault soak's app for Flask under gunicorn ``gthread``: ``faults_flask:create()``.

``benchmarks.multiworker --app flask`` runs it with ``-k gthread -w N``, set up by the same
environment as ``faults_multi`` (``FAULTS_URL``, ``FAULTS_PGBOUNCER``, ``FAULTS_CONTROL``).
``db.init_app(app)``, the extension's default options, the default pool of 15 connections
per worker. ``POST /w/<kind>/<id>`` writes one row like ``faults_app``'s endpoints:

- ``good``: ``add()`` only (``?flush=1``: and flush), ``201``; must be stored.
- ``conflict``: flushes, answers ``409``; must be rolled back.
- ``raise``: flushes, raises (Flask answers ``500``); must be rolled back.
- ``drop``: flushes, sleeps ``DROP_SLEEP``, answers ``201``; the client leaves meanwhile.
- ``slow``: flushes, sleeps ``SLOW_SLEEP`` (the burst), answers ``201``.

No streams: the harness sends this app the mix without them. ``Answers``, a WSGI middleware
around the whole app, fills a ``faults_app.Ledger`` the same way: the status handed to the
server's ``start_response`` and whether the last body chunk was handed over (the extension
commits before the status reaches the server). Each worker also serves ``GET /_stats`` and
``GET /_answers`` on a private port of its own (``<FAULTS_CONTROL>/<pid>.json``), from a
thread, as ``faults_multi`` does for the ASGI app.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from flask import Flask, Response
from sqlalchemy.orm import Session

from sessionscope import Database

from .faults_app import DROP_SLEEP, SLOW_SLEEP, Ledger
from .shared import BenchFailure, Item
from .wsgi_common import json_response

__all__ = ["Answers", "create"]


class Answers:
    """Outermost WSGI middleware: fills the ``Ledger`` and counts requests in flight."""

    def __init__(self, app: WSGIApplication, ledger: Ledger) -> None:
        self.app = app
        self.ledger = ledger
        self.lock = threading.Lock()
        self.in_flight = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/w/"):
            return self.app(environ, start_response)
        item_id = int(path.rsplit("/", 1)[1])
        answers = self.ledger.answers

        def noting_start(status: str, headers: Any, exc_info: Any = None) -> Any:
            with self.lock:
                answers[item_id] = [int(status[:3]), False]
            return start_response(status, headers, exc_info)

        with self.lock:
            self.in_flight += 1
        try:
            body = self.app(environ, noting_start)
        except BaseException:
            self._done()
            raise
        return self._noting_body(body, item_id)

    def _noting_body(self, body: Iterable[bytes], item_id: int) -> Iterator[bytes]:
        answers = self.ledger.answers
        try:
            chunks = iter(body)
            chunk = next(chunks, None)
            while chunk is not None:
                following = next(chunks, None)
                if following is None:
                    # Handed over: whatever the unit commits, it committed before this point.
                    with self.lock:
                        if item_id in answers:
                            answers[item_id][1] = True
                yield chunk
                chunk = following
        finally:
            close = getattr(body, "close", None)
            try:
                if close is not None:
                    close()
            finally:
                self._done()

    def _done(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def take(self) -> dict[str, list[Any]]:
        """The answers so far (see ``Ledger.take``), under the lock."""
        with self.lock:
            return self.ledger.take()


def create() -> WSGIApplication:
    """The app named by the environment (see the module's docstring)."""
    db: Database[Session] = Database(
        os.environ["FAULTS_URL"], pgbouncer=os.environ.get("FAULTS_PGBOUNCER", "1") == "1"
    )
    app = Flask(__name__)
    db.init_app(app)

    def write(kind: str, item_id: int, flush: bool = True) -> None:
        db.session.add(Item(id=item_id, name=kind))
        if flush:
            db.session.flush()

    def endpoint(kind: str, item_id: int) -> Response:
        from flask import request

        if kind == "good":
            write(kind, item_id, flush=bool(request.args.get("flush")))
            return json_response({"ok": True}, 201)
        write(kind, item_id)
        if kind == "conflict":
            return json_response({"detail": "conflict"}, 409)
        if kind == "raise":
            raise BenchFailure("POST /w/raise raises after writing, so its write must roll back.")
        time.sleep(SLOW_SLEEP if kind == "slow" else DROP_SLEEP)
        return json_response({"ok": True}, 201)

    app.add_url_rule("/w/<kind>/<int:item_id>", "write", endpoint, methods=["POST"])
    answers = Answers(app.wsgi_app, Ledger())

    def stats() -> dict[str, Any]:
        pool: Any = db.sync_engine.pool
        return {
            "checkedout": pool.checkedout(),
            "live_units": db.live_units,
            "live_sessions": db.live_sessions,
            "requests_in_flight": answers.in_flight,
        }

    app.add_url_rule("/_stats", "stats", lambda: json_response(stats()))
    app.wsgi_app = answers  # type: ignore[method-assign]
    _control(Path(os.environ["FAULTS_CONTROL"]), {"/_stats": stats, "/_answers": answers.take})
    return app


def _control(directory: Path, routes: dict[str, Callable[[], Any]]) -> None:
    """This worker's private port: ``GET`` of ``routes`` as JSON, from a daemon thread.

    gunicorn imports the app in each worker (no ``--preload``), so this runs in the worker.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path)
            body = json.dumps(route() if route else {"error": "no such path"}).encode()
            self.send_response(200 if route else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pid = os.getpid()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{pid}.tmp"
    partial.write_text(json.dumps({"pid": pid, "port": server.server_address[1]}))
    partial.rename(directory / f"{pid}.json")
