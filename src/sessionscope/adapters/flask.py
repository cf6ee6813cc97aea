"""Flask integration: ``db.init_app(app)``, in the usual application-factory pattern.

Requests go through ``WSGISessionMiddleware`` around ``app.wsgi_app``, so a Flask request and
a plain WSGI request share one lifecycle: commit or rollback by the final status before the
status reaches the server, removal when the server closes the response (after a streamed
body, ``stream_with_context`` or not). An app context pushed outside a request (CLI commands,
``flask shell``, tests, scripts) gets a unit of its own, never committed and removed when that
context is torn down. An app context pushed inside a unit (a request, an outer app context,
``db.begin()``) uses that unit's session and leaves it alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, has_app_context, request
from flask.signals import appcontext_pushed
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from werkzeug.wsgi import ClosingIterator

from .._unit import Binding, Unit, default_commit_on
from ..middleware.wsgi import BODY_BUILT, WSGISessionMiddleware

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from .._core import Database

__all__ = ["init_app"]

EXTENSION = "sessionscope"
_G_KEY = "_sessionscope_units"

Settings = tuple[str | None, dict[str, Any], dict[str, Any]]

# The app settings a Database was configured from, so that a second app (the factory
# pattern in tests) with the same settings may share it and one with others is refused.
_configured_from: weakref.WeakKeyDictionary[Database[Any], Settings] = weakref.WeakKeyDictionary()


def init_app(
    db: Database[Any],
    app: Flask,
    *,
    commit_on: Callable[[int], bool] = default_commit_on,
    on_commit_error: Callable[[BaseException], WSGIApplication] | None = None,
) -> None:
    """Give ``app`` a unit of work per request and per app context; see ``Database.init_app``.

    :param db: the ``Database``.
    :param app: the Flask application.
    :param commit_on: decides from the final status code whether a request commits
        (default: below 400).
    :param on_commit_error: maps a failed commit to the WSGI app producing the replacement
        response, for example a ``flask.Response``; default: a plain-text 500.
    """
    registered: dict[Database[Any], _AppContextUnits] = app.extensions.get(EXTENSION, {})
    if db in registered:
        raise RuntimeError(
            f"{db!r} is already registered on the Flask app {app.name!r}. Call"
            " 'db.init_app(app)' once per app, for example in the app factory."
        )
    _configure(db, app)
    if db.is_async:
        raise RuntimeError(
            f"{db!r} uses an async driver, but Flask runs each request in sync code"
            " (async views too, each on an event loop of its own). Give Flask a sync"
            " driver: 'postgresql+psycopg' instead of 'postgresql+asyncpg', 'sqlite' instead"
            " of 'sqlite+aiosqlite', 'mysql+pymysql' instead of 'mysql+aiomysql'."
        )
    units = _AppContextUnits(db)
    app.wsgi_app = WSGISessionMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, db, commit_on=commit_on, on_commit_error=on_commit_error
    )
    appcontext_pushed.connect(units.pushed, sender=app, weak=False)
    # Wrapped rather than connected to 'request_finished', which Flask sends at the same
    # point: the signal's dispatch cost about 140 bytecodes per request (bare Flask /noop
    # runs about 3,500).
    process_response = app.process_response

    def process_and_mark(response: Response) -> Response:
        response = process_response(response)
        _mark_body_built(response)
        return response

    app.process_response = process_and_mark  # type: ignore[method-assign]
    # Wrapped rather than registered with 'teardown_appcontext': Flask runs those functions
    # in a plain loop, so one that raises would skip ours and leak the unit.
    teardown = app.do_teardown_appcontext

    def do_teardown_appcontext(*args: Any, **kwargs: Any) -> None:
        try:
            teardown(*args, **kwargs)
        finally:
            units.torn_down()

    app.do_teardown_appcontext = do_teardown_appcontext  # type: ignore[method-assign]
    registered[db] = units
    app.extensions[EXTENSION] = registered


def _mark_body_built(response: Response) -> None:
    # The final response: after every 'after_request' function and the session cookie.
    if (
        response.is_streamed
        and response.status_code >= 300
        and isinstance(response.response, ClosingIterator)
    ):
        # An HTTPException ('abort()', the 500 of an unhandled error, a redirect) is rendered
        # by running it as a WSGI app, which leaves an iterator over its small, finished
        # page: buffered, it no longer passes for a stream that needs the session.
        response.make_sequence()
    if not response.is_streamed:
        request.environ[BODY_BUILT] = True


def _configure(db: Database[Any], app: Flask) -> None:
    config = app.config
    url: str | None = config.get("SQLALCHEMY_DATABASE_URI") or config.get("DATABASE_URL")
    settings: Settings = (
        url,
        dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {}),
        dict(config.get("SQLALCHEMY_SESSION_OPTIONS") or {}),
    )
    if not db.is_configured:
        db.configure(*settings)
        _configured_from[db] = settings
        return
    if _configured_from.get(db) == settings:
        return
    if settings[1] or settings[2]:
        raise RuntimeError(
            f"{db!r} already has its engine, so the app {app.name!r} cannot change it with"
            " 'SQLALCHEMY_ENGINE_OPTIONS' or 'SQLALCHEMY_SESSION_OPTIONS'. Pass the options"
            " to 'Database(...)', or create the Database without a URL and let the first"
            " 'init_app' configure it."
        )
    if url is not None and not _same_url(url, db):
        raise RuntimeError(
            f"{db!r} already has its engine, but the app {app.name!r} names another"
            f" database in its config. One Database has one engine: create a Database"
            " per database, or give every app the same URL."
        )


def _same_url(url: str, db: Database[Any]) -> bool:
    try:
        given = make_url(url)
    except ArgumentError:
        return False
    return given.render_as_string(hide_password=False) == db.sync_engine.url.render_as_string(
        hide_password=False
    )


class _AppContextUnits:
    """Opens a unit for an app context pushed outside any unit; removes it at its teardown."""

    def __init__(self, db: Database[Any]) -> None:
        self.db = db

    def pushed(self, app: Flask, **extra: Any) -> None:
        db = self.db
        units = db.units
        outer = units.binding.get()
        if outer is not None and (
            (outer.unit is not None and not outer.unit.closed) or outer.renewable
        ):
            # Inside a unit, or inside an ASGI request whose unit opens on first use (or
            # after its response, where 'db.session' opens the unit of the work after it).
            return
        unit = units.open()
        binding = Binding(unit, owner=self)
        token = units.bind(binding)
        entries: dict[_AppContextUnits, _Entry] = g.setdefault(_G_KEY, {})
        entries[self] = _Entry(unit, binding, token)

    def torn_down(self) -> None:
        if not has_app_context():
            return
        entries: Mapping[_AppContextUnits, _Entry] | None = g.get(_G_KEY)
        entry = entries.pop(self, None) if isinstance(entries, dict) else None
        if entry is None:
            # A request's app context, or one inside another unit: nothing of ours; this
            # also makes a second teardown of one context a no-op.
            return
        try:
            # Never committed: work outside a request commits itself ('db.session.commit()'
            # or 'with db.begin():').
            self.db.units.end(entry.unit, commit=False)
        finally:
            entry.binding.unit = None
            self.db.units.unbind(entry.token)


class _Entry:
    __slots__ = ("binding", "token", "unit")

    def __init__(self, unit: Unit, binding: Binding, token: Token[Binding | None]) -> None:
        self.unit = unit
        self.binding = binding
        self.token = token
