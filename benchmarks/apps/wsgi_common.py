"""What every WSGI benchmark app shares: Flask endpoints that answer like the ASGI apps.

The same four endpoints and ``GET /_stats`` as ``common`` describes, with the same bytes:
``json_response`` renders JSON exactly as Starlette's ``JSONResponse`` does (compact, UTF-8,
keys in the order given, no trailing newline), where Flask's ``jsonify`` would sort the keys
and append a newline. ``GET /fail`` raises after its flush; Flask turns the error into a
``500 Internal Server Error`` and the write must be rolled back.

This module imports only Flask and SQLAlchemy (and ``shared``), so that it loads in the
peers' own virtual environment as well as in the project's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from sqlalchemy.orm import Session, scoped_session

from .shared import (
    FAIL_NAME,
    NOOP_BODY,
    NOT_FOUND_BODY,
    BenchFailure,
    Item,
    item_json,
)

__all__ = [
    "SessionGetter",
    "StatsFn",
    "add_noop_and_stats",
    "json_response",
    "managed_routes",
    "new_app",
    "not_found",
]

StatsFn = Callable[[], dict[str, Any]]
"""Reads the variant's pool (and registry) for ``GET /_stats``, inside the request."""
SessionGetter = Callable[[], Session | scoped_session[Any]]
"""Returns the request's session, or the proxy to it that the library documents."""


def json_response(body: Any, status: int = 200) -> Response:
    """``body`` as JSON, byte for byte what Starlette's ``JSONResponse`` sends."""
    content = json.dumps(
        body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
    return Response(content, status=status, mimetype="application/json")


def not_found() -> Response:
    """The answer for an id that does not exist."""
    return json_response(NOT_FOUND_BODY, status=404)


def new_app() -> Flask:
    """A bare Flask app in its production defaults (no debug, no testing)."""
    return Flask(__name__)


def add_noop_and_stats(app: Flask, stats: StatsFn) -> None:
    """Add ``GET /noop`` (no database at all) and ``GET /_stats`` (the leak checks)."""

    def noop() -> Response:
        return json_response(NOOP_BODY)

    def stats_endpoint() -> Response:
        return json_response(stats())

    app.add_url_rule("/noop", "noop", noop)
    app.add_url_rule("/_stats", "stats", stats_endpoint)


def managed_routes(app: Flask, get_session: SessionGetter, stats: StatsFn, *, commit: bool) -> None:
    """Add the four endpoints and ``/_stats``, written against a session a library manages.

    ``get_session()`` returns the request's session (or its proxy): whatever the library
    under test documents. With ``commit=True`` ``POST /items`` calls ``session.commit()``
    itself, as the users of a library that only closes the session at teardown write it;
    the JSON body is built before that commit, as in the baseline, so that expiring the
    object on commit costs no extra SELECT. Reads and ``/fail`` never commit.
    """

    def read(item_id: int) -> Response:
        item = get_session().get(Item, item_id)
        return not_found() if item is None else json_response(item_json(item))

    def create() -> Response:
        name = request.get_json()["name"]
        session = get_session()
        item = Item(name=name)
        session.add(item)
        session.flush()
        body = item_json(item)
        if commit:
            session.commit()
        return json_response(body, status=201)

    def fail() -> Response:
        session = get_session()
        session.add(Item(name=FAIL_NAME))
        session.flush()
        raise BenchFailure("GET /fail raises after writing, so its write must roll back.")

    app.add_url_rule("/items/<int:item_id>", "read", read)
    app.add_url_rule("/items", "create", create, methods=["POST"])
    app.add_url_rule("/fail", "fail", fail)
    add_noop_and_stats(app, stats)
