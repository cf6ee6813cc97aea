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

import inspect
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, has_app_context, has_request_context, request
from flask.signals import appcontext_pushed
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from werkzeug.wsgi import ClosingIterator

from .._config import default_url, is_async_url, is_sqlite_memory, safe_url
from .._exhaustion import is_pool_timeout
from .._retry import DEFAULT_BODY_LIMIT
from .._unit import Binding, Unit, default_commit_on
from ..middleware.wsgi import BODY_BUILT, WSGISessionMiddleware

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from .._core import Database
    from .._source import Source

__all__ = ["init_app"]

logger = logging.getLogger("sessionscope")

EXTENSION = "sessionscope"
_G_KEY = "_sessionscope_units"

# Flask-SQLAlchemy's config keys that sessionscope reads; the others are not silently
# ignored ('_warn_unsupported').
_READ_KEYS = frozenset(
    {
        "SQLALCHEMY_DATABASE_URI",
        "SQLALCHEMY_ENGINE_OPTIONS",
        "SQLALCHEMY_SESSION_OPTIONS",
        "SQLALCHEMY_ECHO",
    }
)


def init_app(
    db: Database[Any],
    app: Flask,
    *,
    commit_on: Callable[[int], bool] = default_commit_on,
    on_commit_error: Callable[[BaseException], WSGIApplication | None] | None = None,
    retry_after: int = 1,
    retries: int = 0,
    retry_body_limit: int = DEFAULT_BODY_LIMIT,
) -> None:
    """Give ``app`` a unit of work per request and per app context; see ``Database.init_app``.

    :param db: the ``Database``.
    :param app: the Flask application.
    :param commit_on: decides from the final status code whether a request commits
        (default: below 400).
    :param on_commit_error: maps a failed commit to the WSGI app producing the replacement
        response, for example a ``flask.Response``, or to None for the plain 500; default: a
        plain-text 500.
    :param retry_after: the ``Retry-After`` seconds of the 503 a request gets when its unit
        got no connection within the pool's timeout.
    :param retries: how many more times a request that lost a race with a concurrent
        transaction is run, with a fresh unit and the same body, when the error escaped the
        view or failed the commit (default 0: see ``WSGISessionMiddleware``).
    :param retry_body_limit: the bytes of a request body kept to hand to another attempt.
    """
    if not isinstance(app, Flask):
        raise TypeError(_not_flask(app))
    registered: dict[Database[Any], _AppContextUnits] = app.extensions.get(EXTENSION, {})
    if db in registered:
        raise RuntimeError(
            f"{db!r} is already registered on the Flask app {app.name!r}. Call"
            " 'db.init_app(app)' once per app, for example in the app factory."
        )
    source = _source(db, app)
    units = _AppContextUnits(db, source)
    middleware = WSGISessionMiddleware(
        app.wsgi_app,
        db,
        commit_on=commit_on,
        on_commit_error=on_commit_error,
        source=source,
        retry_after=retry_after,
        retries=retries,
        retry_body_limit=retry_body_limit,
    )
    app.wsgi_app = middleware  # type: ignore[method-assign]
    # An error the app did not handle is logged by Flask with its traceback at ERROR, and
    # answered 500; for a pool timeout in a unit the middleware answers 503 instead and
    # logs one line, and a lost race it runs again (logging that once), so Flask's log is
    # left out. (An error handler for them would outrank the app's own handlers for
    # 'SQLAlchemyError' or 'Exception'.)
    log_exception = app.log_exception
    binding = db.units.binding

    def log_unless_busy(exc_info: Any) -> None:
        error = exc_info[1]
        current = binding.get()
        unit = current.unit if current is not None else None
        if error is not None and unit is not None and unit.exhausted and is_pool_timeout(error):
            return
        if error is not None and middleware.runs_again(error):
            return
        log_exception(exc_info)

    app.log_exception = log_unless_busy  # type: ignore[method-assign]
    # Weak: 'app.extensions' keeps 'units' as long as the app lives, and no longer (a
    # strong receiver kept every app of a test suite, and its engine, alive).
    appcontext_pushed.connect(units.pushed, sender=app, weak=True)
    if source is not None:
        weakref.finalize(app, source.dispose)
    # The unit settles once the request's teardown functions have run, while its request
    # and app contexts are still pushed: the flush, the commit, its listeners and callbacks
    # see 'current_app', 'g' and proxies such as 'current_user', and a teardown function
    # that raises rolls back. A 'stream_with_context' body keeps the contexts until it
    # ends: then the unit settles at its first chunk, and what it wrote at this teardown.
    teardown_request = app.do_teardown_request

    def in_a_unit() -> bool:
        # A request that never used the session has nothing to settle inside the contexts:
        # its status passes when the app returns, at no cost here.
        current = binding.get()
        return current is not None and current.unit is not None

    def do_teardown_request(*args: Any, **kwargs: Any) -> None:
        error = args[0] if args else kwargs.get("exc")
        try:
            teardown_request(*args, **kwargs)
        except BaseException:
            if in_a_unit():
                # The environ tells the request's own context from one pushed inside it.
                middleware.settle_here(request.environ, raised=True, error=error)
            raise
        if in_a_unit():
            middleware.settle_here(request.environ, error=error)

    app.do_teardown_request = do_teardown_request  # type: ignore[method-assign]
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
        except Exception:
            # Raised after the request committed: the data is stored, so the response
            # stands (rule 19); Flask would turn the error into a 500.
            if not (_own() and in_a_unit() and middleware.settle_here(None, raised=True)):
                raise
            logger.error(
                "A 'teardown_appcontext' function raised after the request was committed;"
                " the response stands, since what the request wrote is stored.",
                exc_info=True,
            )
        else:
            # The request's own app context is torn down after its request context: what
            # its teardown functions wrote is settled here, while 'current_app' and 'g'
            # still work.
            if in_a_unit() and _own():
                middleware.settle_here(None)
        finally:
            units.torn_down()

    app.do_teardown_appcontext = do_teardown_appcontext  # type: ignore[method-assign]
    registered[db] = units
    app.extensions[EXTENSION] = registered


def _own() -> bool:
    # An app context torn down with no request context left is a request's own (its
    # request context goes first), or one outside any request.
    return not has_request_context()


def _mark_body_built(response: Response) -> None:
    # The final response: after every 'after_request' function and the session cookie.
    environ = request.environ
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
        environ[BODY_BUILT] = True


def _not_flask(app: object) -> str:
    kind = type(app).__name__
    if hasattr(app, "add_middleware") or inspect.iscoroutinefunction(
        getattr(app, "__call__", None)  # noqa: B004 - an ASGI app is an async callable
    ):
        return (
            f"'db.init_app' is for Flask apps, and {kind!r} is an ASGI app. Add the"
            " middleware instead: 'app.add_middleware(SessionMiddleware, db=db)'"
            " (from sessionscope import SessionMiddleware)."
        )
    return (
        f"'db.init_app' is for Flask apps, not {kind!r}. Wrap another WSGI app as"
        " 'WSGISessionMiddleware(app, db)', and an ASGI app as 'SessionMiddleware(app, db=db)'."
    )


def _source(db: Database[Any], app: Flask) -> Source | None:
    """The app's own database, from its config; None when it uses the Database's."""
    config = app.config
    _warn_unsupported(config)
    url: str | URL | None = config.get("SQLALCHEMY_DATABASE_URI") or config.get("DATABASE_URL")
    engine_options = dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    session_options = dict(config.get("SQLALCHEMY_SESSION_OPTIONS") or {})
    if config.get("SQLALCHEMY_ECHO"):
        engine_options.setdefault("echo", config["SQLALCHEMY_ECHO"])
    if db.names_database:
        _check_shared(db, app, url, bool(engine_options or session_options))
        return None
    # An app that names no database gets the default ('DATABASE_URL', else the embedded
    # file), on an engine of its own like every app of a Database made without a URL.
    url = default_url() if url is None else _instance_relative(url, app)
    _refuse_async(db, url)
    return db.add_source(url, engine_options, session_options)


def _refuse_async(db: Database[Any], url: str | URL | None = None) -> None:
    if url is None:
        if not db.is_async:
            return
        named = db.url
    elif is_async_url(url):
        named = safe_url(url)
    else:
        return
    raise RuntimeError(
        f"{named!r} names an async driver, but Flask runs each request in sync code"
        " (async views too, each on an event loop of its own). Give Flask a sync"
        " driver: 'postgresql+psycopg' instead of 'postgresql+asyncpg', 'sqlite' instead"
        " of 'sqlite+aiosqlite', 'mysql+pymysql' instead of 'mysql+aiomysql'."
    )


def _check_shared(db: Database[Any], app: Flask, url: str | URL | None, options: bool) -> None:
    """A Database created with its URL serves every app with it: refuse other settings."""
    if options:
        raise RuntimeError(
            f"{db!r} was created with its engine, so the app {app.name!r} cannot change it"
            " with 'SQLALCHEMY_ENGINE_OPTIONS', 'SQLALCHEMY_SESSION_OPTIONS' or"
            " 'SQLALCHEMY_ECHO'. Pass the options to 'Database(...)', or create it as"
            " 'Database()', without a URL, to take each app's settings from its config."
        )
    if url is not None and not _same_url(url, db):
        raise RuntimeError(
            f"{db!r} was created with its URL, but the app {app.name!r} names another"
            f" database in its config ({safe_url(url)!r}). Create it as 'Database()',"
            " without a URL, to take each app's database from its config, or give the"
            " app no URL (or the same one)."
        )
    _refuse_async(db)


def _same_url(url: str | URL, db: Database[Any]) -> bool:
    try:
        given = make_url(url)
    except ArgumentError:
        return False
    return given.render_as_string(hide_password=False) == db.sync_engine.url.render_as_string(
        hide_password=False
    )


def _instance_relative(url: str | URL, app: Flask) -> str | URL:
    """Flask's convention: a relative SQLite path names a file in the app's instance folder."""
    parsed = make_url(url)
    database = parsed.database
    if (
        parsed.get_backend_name() != "sqlite"
        or is_sqlite_memory(parsed)
        or database is None
        or database.startswith("file:")
        or os.path.isabs(database)
    ):
        return url
    os.makedirs(app.instance_path, exist_ok=True)
    return parsed.set(database=os.path.join(app.instance_path, database))


def _warn_unsupported(config: Mapping[str, Any]) -> None:
    for key, value in config.items():
        if not key.startswith("SQLALCHEMY_") or key in _READ_KEYS:
            continue
        if not value and key in ("SQLALCHEMY_TRACK_MODIFICATIONS", "SQLALCHEMY_BINDS"):
            continue  # off or empty: asks for nothing that sessionscope would not do
        warnings.warn(
            f"The app config sets {key!r}, which sessionscope does not read. Remove it;"
            " docs/migrating-from-flask-sqlalchemy.md says what replaces it (for"
            " 'SQLALCHEMY_BINDS': a Database per database).",
            UserWarning,
            stacklevel=5,
        )


class _AppContextUnits:
    """Opens a unit for an app context pushed outside any unit; removes it at its teardown."""

    def __init__(self, db: Database[Any], source: Source | None) -> None:
        self.db = db
        self.source = source

    def pushed(self, app: Flask, **extra: Any) -> None:
        db = self.db
        units = db.units
        outer = units.binding.get()
        unit = outer.unit if outer is not None else None
        live = unit is not None and not unit.closed
        if outer is not None and (live or outer.renewable):
            source = unit.source if unit is not None and live else outer.source
            if source is None or source is self.source:
                # Inside a unit of this app (or of an ASGI request, whose unit opens on first
                # use, or after its response, where 'db.session' opens the unit of the work
                # after it): this context shares it.
                return
            # Inside a unit of another app with its own database: this app's context gets a
            # unit of its own, on this app's database.
        unit = units.open(source=self.source)
        binding = Binding(unit, owner=self, source=self.source)
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
