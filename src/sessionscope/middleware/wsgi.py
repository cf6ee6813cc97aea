"""``WSGISessionMiddleware``: a unit of work per WSGI request, on PEP 3333 alone."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from .. import _exhaustion, _replicas, _retry
from .._sessions import log_request_failure
from .._unit import SAFE_METHODS, Binding, default_commit_on

if TYPE_CHECKING:
    from _typeshed import OptExcInfo

    from .._core import Database
    from .._source import Source
    from .._unit import Unit

__all__ = ["WSGISessionMiddleware", "internal_server_error", "service_unavailable"]

logger = logging.getLogger("sessionscope")

Write = Callable[[bytes], object]

# Set to True in the environ by an app (the Flask adapter does) whose response body is
# already built, so that the unit ends when the app returns rather than in close().
BODY_BUILT = "sessionscope.body_built"


def internal_server_error(error: BaseException) -> WSGIApplication:
    """The default ``on_commit_error``: a plain-text 500 that tells the client nothing more.

    :param error: the exception the commit raised (already logged with its traceback).
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = b"Internal Server Error"
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "21")]
        start_response("500 Internal Server Error", headers)
        return [body]

    return app


def service_unavailable(retry_after: int) -> WSGIApplication:
    """A plain-text 503 asking the client to come back in ``retry_after`` seconds.

    What a request gets when its unit of work got no connection within the pool's timeout.
    """
    headers = [(name.title(), value) for name, value in _exhaustion.HEADERS]
    headers.append(("Retry-After", str(retry_after)))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("503 Service Unavailable", list(headers))
        return [_exhaustion.BODY]

    return app


class WSGISessionMiddleware:
    """Give each WSGI request a unit of work: committed or rolled back by its status.

    The commit runs when the response is about to leave: after the app has called
    ``start_response`` and before the status reaches the server (before the first body chunk
    or ``write()``, also for generator apps that call ``start_response`` on first
    iteration). The app's status is held back until then, so the server only ever sees the
    final one: if the commit fails, the response is a 500 (or what ``on_commit_error``
    returns) instead, and the app's own status and body never leave the process.

    Writes made while the body streams are committed again once the body is exhausted, still
    before the iterable ends, and rolled back if the server closes it early (client gone). A
    commit that fails at that point cannot change a status already sent: the iteration raises
    so that the server aborts the response rather than let it look complete.

    The session is removed exactly once: after the last chunk, in the response iterable's
    ``close()``, or at once if the app raises before returning an iterable.

    :param app: the WSGI application.
    :param db: the ``Database``; ``None`` uses ``sessionscope.db``.
    :param commit_on: decides from the final status code whether to commit
        (default: below 400).
    :param on_commit_error: maps a failed commit to the WSGI app that produces the
        replacement response (a Werkzeug ``Response`` works), or to None for the plain 500;
        default: a plain-text 500.
    :param source: where the requests' sessions connect, from ``db.add_source()``
        (``db.init_app`` passes each app's own); default: the database's own engine.
    :param retry_after: the seconds a ``503 Service Unavailable`` asks the client to wait
        (its ``Retry-After``). A request whose unit got no connection within the pool's
        ``pool_timeout`` gets that 503 instead of its response, whether the error escaped
        the app, the app turned it into a 5xx, or the commit met it; logged once at WARNING.
    :param retries: how many more times a request that lost a race with a concurrent
        transaction (a serialization failure, a deadlock, a lock wait timeout, a busy
        SQLite file: read from the driver's error code) is run, with a fresh unit, a copy of
        the environ and the same body, when the error escaped the app (or the app reported
        it: ``runs_again``) or failed the commit, while the app is being called and before
        its status left. Default 0: a request may have effects outside the database that
        running it again would repeat. Not for a generator body that calls
        ``start_response`` only once iterated, a body longer than ``retry_body_limit``,
        a request that committed something itself (or in a
        ``db.begin()`` nested in it) or called ``db.no_retry()``.
    :param retry_body_limit: the bytes of a request body read before the first attempt, to
        hand to each one (default 1 MiB); one of unknown length is read up to it.

    ```python
    app = WSGISessionMiddleware(app, db)
    ```
    """

    # Marks a binding as a request opened by an adapter, to catch one installed twice.
    opens_requests = True

    def __init__(
        self,
        app: WSGIApplication,
        db: Database[Any] | None = None,
        *,
        commit_on: Callable[[int], bool] = default_commit_on,
        on_commit_error: Callable[[BaseException], WSGIApplication | None] | None = None,
        source: Source | None = None,
        retry_after: int = 1,
        retries: int = 0,
        retry_body_limit: int = _retry.DEFAULT_BODY_LIMIT,
    ) -> None:
        self.retry_after = _exhaustion.check_retry_after(retry_after)
        self.retries = _retry.check_retries(retries)
        self.retry_body_limit = _retry.check_body_limit(retry_body_limit)
        if db is None:
            # Imported here: the package imports this module while it builds 'db'.
            from .. import db as default_db

            db = default_db
        self.app = app
        self.db = db
        self.commit_on = commit_on
        self.on_commit_error = on_commit_error or internal_server_error
        # The app answers failed commits itself: their log says so, without a traceback.
        self.maps_commit_errors = on_commit_error is not None
        self.source = source
        self.service_unavailable = service_unavailable(retry_after)
        # Read replicas: whether requests with a safe method start on one, and the cookie
        # that sends a client to the primary for a while after its request wrote.
        self.reads_replicas = db.reads_replicas
        self.primary_cookie: str | None = None
        if db.read_your_writes:
            self.primary_cookie = _replicas.cookie_header(db.read_your_writes)

    def settle_here(
        self,
        environ: WSGIEnvironment | None,
        *,
        raised: bool = False,
        error: BaseException | None = None,
    ) -> bool:
        """Settle the request this middleware handles in the running code, now.

        For a framework whose own code runs after its app called ``start_response`` (Flask
        runs its teardown functions then): called once that code is over, still inside the
        framework's contexts, so that the flush, the commit and its listeners see them.

        :param environ: the environ of the request whose own code is over (a request
            context pushed inside it has another, and is ignored). ``None``: only settle
            what was written since the first settle, which is decided by the status.
        :param raised: that code raised; what is not settled yet rolls back.
        :param error: the error the request ended with; it rolls back what a streamed body
            wrote (a client gone), never the status's own decision.
        :returns: whether the request's writes were committed at its first settle, so that
            an error raised after it must not fail the response (rule 19).
        """
        binding = self.db.units.binding.get()
        if isinstance(binding, _RequestBinding) and binding.owner is self:
            response = binding.response
            if response is not None:
                return response.settle_here(environ, raised, error)
        return False

    def runs_again(self, error: BaseException) -> bool:
        """Whether the request this middleware handles in the running code will be run
        again for ``error``, a lost race its app caught and answers with a 5xx.

        For a framework that turns an error into a 500 itself (Flask): ask before logging
        it. True means the 5xx is discarded with the attempt, and the retry is logged.
        """
        binding = self.db.units.binding.get()
        if isinstance(binding, _RequestBinding) and binding.owner is self:
            response = binding.response
            if response is not None:
                return response.runs_again(error)
        return False

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Run the app inside a new unit of work; return an iterable that ends the unit."""
        self._refuse_nesting()
        if self.retries:
            return self._retrying(environ, start_response)
        response = _Response(self, environ, start_response)
        binding = self.db.units.binding
        # Set and reset in one call, so in one context: the reset cannot fail.
        token = binding.set(response._binding)
        try:
            response._start(self.app)
        except BaseException as error:
            if not self._failed(response, error):
                raise
            return self.service_unavailable(environ, start_response)
        finally:
            binding.reset(token)
        return response

    def _retrying(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """``__call__``, running the app again while the request loses races."""
        body, complete = _read_body(environ, self.retry_body_limit)
        binding = self.db.units.binding
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            attempt_environ = dict(environ)
            if body is not None:
                attempt_environ["wsgi.input"] = io.BytesIO(body)
            response = _Response(self, attempt_environ, start_response)
            response._binding.attempt = attempt
            response._binding.retries_left = attempt < attempts and complete
            token = binding.set(response._binding)
            try:
                response._start(self.app)
            except BaseException as error:
                # A cancellation or an exit ends the request, whatever the attempt met.
                code = response._rerun if isinstance(error, Exception) else ""
                if code and response.stored_since():
                    code = ""  # its code stored something since: see _stored_since
                if not code:
                    if not self._failed(response, error):
                        raise
                    return self.service_unavailable(environ, start_response)
                logger.debug("The attempt's error, discarded with it", exc_info=error)
                response._close()
            else:
                code = response._rerun
                if code and response.stored_since():
                    return self._stored_since(response, environ, start_response)
                if not code:
                    return response
                response._close()
            finally:
                binding.reset(token)
            method, path = _request_line(environ)
            _retry.log_retry(f"The request '{method} {path}'", code, attempt, attempts)
            time.sleep(_retry.backoff(attempt))
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt returns

    def _stored_since(
        self, response: _Response, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        """The attempt lost a race, then code of the app's stored something in a unit of its
        own (a teardown's 'db.begin()'): it is not run again, and answers as its failure."""
        error = response._rerun_error
        logger.error(
            "The request lost a race, and is not run again: its code stored something"
            " since, in a unit of its own.",
            exc_info=error,
        )
        response._close()
        try:
            replacement = self.on_commit_error(error) if error is not None else None
        except Exception:
            logger.error("The 'on_commit_error' hook raised; sending a plain 500.", exc_info=True)
            replacement = None
        if replacement is None:
            replacement = internal_server_error(RuntimeError("lost race"))
        return replacement(environ, start_response)

    def _failed(self, response: _Response, error: BaseException) -> bool:
        """End the request whose app raised ``error``; whether a 503 answers it (the pool
        had no connection for it), else the error propagates."""
        busy = response._busy(error)
        try:
            response._close()
        except Exception:
            logger.warning("Closing the response of an app that raised failed", exc_info=True)
        if busy:
            response._report_busy()
        return busy

    def _refuse_nesting(self) -> None:
        outer = self.db.units.binding.get()
        if outer is not None and outer.handling_request():
            raise RuntimeError(
                f"'WSGISessionMiddleware' is installed twice for {self.db!r}: an outer"
                f" '{type(outer.owner).__name__}' already opened this request's unit of"
                " work. Install one per database; 'db.init_app(app)' already installs it"
                " for a Flask app, and a Flask app served inside 'SessionMiddleware' needs"
                " no 'db.init_app' of its own."
            )


class _RequestBinding(Binding):
    """A WSGI request's binding: its unit, and the response that settles it."""

    __slots__ = ("response",)
    response: _Response | None


class _Response:
    """The iterable the server gets: commits before the first chunk, removes in close()."""

    __slots__ = (
        "_binding",
        "_calling",
        "_closed",
        "_code",
        "_commit_on",
        "_committed",
        "_ended",
        "_environ",
        "_failed",
        "_headers",
        "_held",
        "_iterable",
        "_iterator",
        "_late_error",
        "_lost",
        "_middleware",
        "_on_commit_error",
        "_pending",
        "_replaced",
        "_replacement",
        "_rerun",
        "_rerun_error",
        "_server_start",
        "_settled",
        "_status",
        "_through",
        "_units",
        "_write",
        "_wrote",
    )

    def __init__(
        self, middleware: WSGISessionMiddleware, environ: WSGIEnvironment, start: StartResponse
    ) -> None:
        self._middleware = middleware
        self._units = middleware.db.units
        self._commit_on = middleware.commit_on
        self._on_commit_error = middleware.on_commit_error
        self._environ = environ
        self._server_start = start
        self._status: str | None = None
        self._headers: list[tuple[str, str]] = []
        self._code: int | None = None
        self._write: Write | None = None
        self._settled = False
        self._replaced = False
        self._closed = False
        # The unit has ended: the rest of the body passes through untouched (_through).
        self._ended = False
        self._through = False
        # Set by 'settle_here': the app's own code failed (its teardown raised, say).
        self._failed = False
        # The first settle committed: what the request wrote before it is stored.
        self._committed = False
        self._calling = False  # the app is being called (not its body iterated)
        # What a commit made by 'settle_here' after the status left raised, for the end.
        self._late_error: BaseException | None = None
        self._wrote = False  # whether the app called the write() callable
        # A lost race the app answered with a 5xx (see runs_again), and the driver's code
        # once this attempt is discarded for the request to run again.
        self._lost: BaseException | None = None
        self._rerun = ""
        self._rerun_error: BaseException | None = None
        self._iterable: Iterable[bytes] = ()
        self._replacement: Iterable[bytes] = ()
        self._iterator: Iterator[bytes] = iter(())
        # The bytes of the declared Content-Length not yet passed on (None: not looked up).
        self._pending: int | None = None
        # What 'write()' was given that completes that length: sent once the body is over.
        self._held: bytes | None = None
        # The unit opens on first use of 'db.session', as under ASGI: a request that never
        # needs one costs no unit. The binding is set for the call, every chunk and close(),
        # each time in the caller's own context and reset before returning: the app's code
        # (Flask's contexts kept for a test, a 'stream_with_context' body) runs where it
        # would run without us, and the server's thread keeps nothing of the request.
        self._binding = _RequestBinding(
            None,
            middleware,
            renewable=True,
            source=middleware.source,
            writes=environ.get("REQUEST_METHOD", "GET") not in SAFE_METHODS,
        )
        self._binding.response = self
        self._binding.reads_replica = (
            middleware.reads_replicas
            and not self._binding.writes
            and not _replicas.wrote_recently(environ.get("HTTP_COOKIE"))
        )

    def _start(self, app: WSGIApplication) -> None:
        try:
            self._call(app)
        except BaseException as error:
            if not self._rerun:
                # Read before the retries stop: a lost race that escaped the app.
                self._rerun = self.lost_race(error)
                self._rerun_error = error
            raise
        finally:
            # Settled or not, the request cannot run again once the server has its response.
            if self._binding.retries_left:
                self._binding.stop_retries()

    def _call(self, app: WSGIApplication) -> None:
        self._calling = True
        try:
            self._iterable = iterable = app(self._environ, self._start_response)
        finally:
            self._calling = False
        if self._replaced:
            # A 'write()' already met a failed commit: the replacement is what gets sent.
            return
        self._iterator = iter(iterable)
        if self._status is None:
            return
        if isinstance(iterable, list | tuple) or self._environ.get(BODY_BUILT):
            # No app code runs while a built body is sent, so nothing needs the session
            # any more; ending the unit now also spares it from a test client that never
            # calls close(). (After a 'write()' this commits what the app wrote since.)
            self._end(aborts=self._wrote)
        elif not self._settled:
            self._settle()

    # -- what the app calls --------------------------------------------------------------

    def _start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None, /
    ) -> Write:
        if self._replaced:
            return _discard
        self._code = _status_code(status)
        if self._settled:
            # The decision is made, so this goes straight on; after the status was sent only
            # an error call with 'exc_info' is allowed, and the server enforces that.
            self._write = self._server_start(status, headers, exc_info)
            return self._write_body
        if self._status is not None and exc_info is None:
            raise RuntimeError(
                "The app called 'start_response' a second time without 'exc_info'."
                " PEP 3333 allows a second call only from an error handler, with 'exc_info'."
            )
        self._status, self._headers = status, headers
        return self._write_body

    def _write_body(self, data: bytes) -> None:
        self._wrote = True
        if not self._settled:
            self._settle()
        if self._replaced:
            return
        if self._write is None:
            raise RuntimeError("The app called 'write()' before 'start_response'.")
        if self._completes(data):
            # Sent as the iterable's last chunk, once what the body wrote is committed.
            self._held = data
            return
        self._write(data)

    # -- the commit point ----------------------------------------------------------------

    def _settle(self) -> None:
        """Commit or roll back, then pass the final status on (the 500 if the commit failed)."""
        self._settled = True
        unit = self._binding.unit
        error = None
        busy = False
        if unit is not None:
            commit = self._commits()
            # A failed commit is logged naming the request; one the app's 'on_commit_error'
            # answers, with how it answered (see _replace).
            unit.request = (*_request_line(self._environ), self._middleware.db)
            unit.logged_by_adapter = self._middleware.maps_commit_errors
            try:
                error = self._units.end(unit, commit, keep=True)
            finally:
                unit.logged_by_adapter = False
            self._committed = commit and error is None
            if unit.commits:
                self._environ[_retry.STORED] = True  # for a middleware of another database
            if error is not None:
                busy = _exhaustion.is_pool_timeout(error)
            else:
                busy = unit.exhausted and not commit and (self._code or 500) >= 500
            if error is not None or self._lost is not None:
                self._rerun_error = error or self._lost
                self._rerun = self._lost_race(unit, error, commit)
                if self._rerun:
                    self._replace_with(_discarded)
                    return
            cookie = self._middleware.primary_cookie
            if cookie is not None and unit.stored:
                # The client's next requests read from the primary for a while.
                self._headers = [*self._headers, ("Set-Cookie", cookie)]
        if busy:
            self._report_busy()
            if error is not None or self._code != 503:
                self._replace_with(self._middleware.service_unavailable)
                return
        if error is not None:
            self._replace(error)
        elif self._status is not None:
            self._write = self._server_start(self._status, self._headers)

    def _commits(self) -> bool:
        return not self._failed and self._code is not None and self._commit_on(self._code)

    def settle_here(
        self, environ: WSGIEnvironment | None, raised: bool, error: BaseException | None
    ) -> bool:
        """Settle now: the app's own code is over (see ``WSGISessionMiddleware.settle_here``).

        Before the status left, this is the commit point. After it (a stream whose end the
        app reports, a teardown after the commit), what was written since is committed
        here; a failure aborts a body at its end.
        """
        if self._ended or self._replaced or self._status is None:
            return self._committed
        if environ is not None and environ is not self._environ:
            return False  # a request context pushed inside this request, not its own
        if environ is None and not self._calling:
            # Only while the app runs: once it returned, a context being torn down is one
            # that its body pushed, not the request's own.
            return self._committed
        if not self._settled:
            if environ is None:
                return False  # only the request's own context decides by the status
            self._failed = raised
            self._settle()
            return self._committed
        self._failed = self._failed or raised or error is not None
        unit = self._binding.unit
        if unit is not None and not unit.closed:
            self._late_error = self._units.end(unit, self._commits(), keep=True)
        return self._committed

    def _lost_race(self, unit: Unit, error: BaseException | None, commit: bool) -> str:
        """The driver's code if this attempt is discarded for the request to run again: its
        commit lost a race, or the app answered a lost race with a 5xx (``runs_again``)."""
        lost, self._lost = self._lost, None
        code = ""
        if error is not None:
            code = _retry.rerun_code(unit, error) or ""
        elif lost is not None and not commit and (self._code or 500) >= 500:
            code = _retry.rerun_code(unit, lost, self._middleware.db.uses_engine) or ""
        if self.stored_since():
            code = ""
        if not code and lost is not None:
            # Not run again after all (the status committed it, or the app's code stored
            # something): the error the app's log was spared is logged here.
            logger.error("The request lost a race; it is not run again.", exc_info=lost)
        return code

    def stored_since(self) -> bool:
        """Whether the request's code stored something in a unit of its own ('db.begin()'),
        or a middleware of another database inside this one committed the request's."""
        return self._binding.stored_inside or bool(self._environ.get(_retry.STORED))

    def runs_again(self, error: BaseException) -> bool:
        """See ``WSGISessionMiddleware.runs_again``."""
        if self._settled or not isinstance(error, Exception) or self.stored_since():
            return False
        if _retry.rerun_code(self._binding.unit, error, self._middleware.db.uses_engine) is None:
            return False
        self._lost = error
        return True

    def lost_race(self, error: BaseException) -> str:
        """The driver's code if ``error`` escaped the app, before its status left, for losing
        a race that running the request again may win; else an empty string."""
        if self._settled or not isinstance(error, Exception) or self.stored_since():
            return ""
        return _retry.rerun_code(self._binding.unit, error, self._middleware.db.uses_engine) or ""

    def _busy(self, error: BaseException) -> bool:
        """Whether the app raised ``error``, before its status left, for want of a connection."""
        # Only the timeout itself (or an error raised from it): a bug met after the app
        # recovered from one keeps its traceback.
        return (
            not self._settled
            and isinstance(error, Exception)
            and _exhaustion.is_pool_timeout(error)
        )

    def _report_busy(self) -> None:
        middleware = self._middleware
        method, path = _request_line(self._environ)
        _exhaustion.report(method, path, middleware.db.url, middleware.retry_after)

    def _replace_with(self, app: WSGIApplication) -> None:
        """Send ``app``'s response instead of the app's: the server has seen no status yet."""
        # So the replacement is the first and only status it gets: no 'exc_info'
        # replacement, which servers honour unevenly (Werkzeug's test client raises it,
        # gunicorn keeps the first call's headers).
        self._remove()
        self._replaced = self._through = True
        self._replacement = app(self._environ, self._server_start)
        self._iterator = iter(self._replacement)

    def _replace(self, error: BaseException) -> None:
        middleware = self._middleware
        where = _request_line(self._environ)
        replaced = False
        try:
            replacement = self._on_commit_error(error)
            if replacement is not None:
                self._replace_with(replacement)
                replaced = True
        except Exception:
            logger.error("The 'on_commit_error' hook raised; sending a plain 500.", exc_info=True)
        if middleware.maps_commit_errors:
            # Without a hook of the app's, the commit's own line told the failure.
            log_request_failure(*where, middleware.db.url, error, answered=replaced)
        if not replaced:
            self._replace_with(internal_server_error(error))

    # -- what the server calls -----------------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        binding = self._units.binding
        token = binding.set(self._binding)
        try:
            return self._next()
        finally:
            binding.reset(token)

    def _next(self) -> bytes:
        if self._through:
            return next(self._iterator)
        try:
            chunk = next(self._iterator)
        except StopIteration:
            self._end()
            if self._replaced:
                return next(self._iterator)
            held, self._held = self._held, None
            if held is not None:
                return held
            raise
        except BaseException as error:
            busy = self._busy(error)
            self._remove()
            if not busy:
                raise
            # A generator body that needed a connection before its status left.
            self._report_busy()
            self._replace_with(self._middleware.service_unavailable)
            return next(self._iterator)
        if not self._settled:
            if self._status is None:
                # A chunk before 'start_response' (PEP 3333 allows empty ones) decides nothing.
                return chunk
            self._settle()
            if self._replaced:
                return next(self._iterator)
        if self._completes(chunk):
            return self._last(chunk)
        return chunk

    def _completes(self, data: bytes) -> bool:
        """Whether ``data`` brings the body to exactly its declared Content-Length."""
        pending = self._pending
        if pending is None:
            pending = _declared_length(self._headers)
        if pending < 0 or len(data) != pending:
            # Short of the declared length (or past it: the server refuses that one).
            self._pending = pending - len(data) if len(data) < pending else -1
            return False
        self._pending = -1
        return True

    def _last(self, chunk: bytes) -> bytes:
        """``chunk`` completes the declared Content-Length: once the server sends it, the
        client takes the response as complete. So the body runs to its end first and what
        it wrote is settled; a failed commit raises, and the chunk never leaves.
        """
        try:
            for more in self._iterator:
                if more:
                    # Past the declared length: the server refuses it. Let it, now, before
                    # the stream's work could be committed behind a broken response.
                    return chunk + more
        except BaseException:
            self._remove()
            raise
        self._end()
        return chunk

    def _end(self, aborts: bool = True) -> None:
        """The body is complete (built, or exhausted): settle what it wrote, then remove.

        A failure to commit what was written after the status left aborts the response,
        unless ``aborts`` is false: a built body none of which has left, whose own commit
        is stored. Then the response stands (rule 19) and the failure is logged.
        """
        if self._ended:
            # A built body ended the unit when the app returned: this is its exhaustion.
            return
        try:
            if not self._settled:
                self._settle()
                return
            unit = self._units.close_binding(self._binding)
            error, self._late_error = self._late_error, None
            if unit is not None:
                error = self._units.end(unit, self._commits()) or error
            if error is not None and not aborts:
                # The commit's failure is logged with its traceback where it happened.
                logger.warning(
                    "What the app wrote after its response was decided (in a teardown"
                    " function) was rolled back. The response stands: what the request"
                    " wrote before is stored."
                )
            elif error is not None:
                raise RuntimeError(
                    "Committing what the app wrote after its status was decided (while the"
                    " body streamed, or in a teardown function) failed after the status was"
                    " passed to the server; the response is aborted so that the client"
                    " cannot take it as complete."
                ) from error
        finally:
            self._remove()
            # Nothing is left to settle: the chunks still to come pass straight through.
            self._through = self._held is None

    def close(self) -> None:
        """Remove the unit (rolled back if it is still open), then close the app's iterable."""
        binding = self._units.binding
        token = binding.set(self._binding)
        try:
            self._close()
        finally:
            binding.reset(token)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The unit ends first: code the app runs as its body closes (a 'call_on_close'
        # callback, a generator's 'finally') finds no session to write to, and says so,
        # rather than write into a unit that is rolled back right after without a word.
        try:
            self._remove()
        finally:
            try:
                _close(self._iterable)
            finally:
                _close(self._replacement)

    def _remove(self) -> None:
        self._ended = True
        # The binding holds this response, which holds the binding: break the cycle, or
        # every request leaves one to the garbage collector.
        self._binding.response = None
        unit = self._units.close_binding(self._binding)
        if unit is not None:  # ends once; a built body ends it before close() is called
            # Rolled back if still open; callbacks of a commit the app made itself still run.
            self._units.end(unit, commit=False)


def _request_line(environ: WSGIEnvironment) -> tuple[str, str]:
    """The request's method and path, as the log lines name it."""
    return environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")


def _close(iterable: Iterable[bytes]) -> None:
    close = getattr(iterable, "close", None)
    if close is not None:
        close()


def _declared_length(headers: list[tuple[str, str]]) -> int:
    """The Content-Length of ``headers``, or -1."""
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return -1


def _discard(data: bytes) -> None:
    return None


def _discarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The response of an attempt discarded for the request to run again: none."""
    return ()


class _Joined(io.RawIOBase):
    """A request body of which ``head`` was read already: it, then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: Any) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            size = min(len(buffer), len(self._head))
            buffer[:size] = self._head[:size]
            self._head = self._head[size:]
            return size
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_body(environ: WSGIEnvironment, limit: int) -> tuple[bytes | None, bool]:
    """The request body, read before the first attempt so that each attempt reads it again,
    and whether it is whole. None: it is not kept (its length is unknown, or longer than
    ``limit``): the app reads the server's stream, once."""
    declared = str(environ.get("CONTENT_LENGTH") or "").strip()
    if not declared:
        # No length: no body (PEP 3333), unless the server says the stream ends by itself
        # (a chunked body; gunicorn says so of every request).
        if not environ.get("wsgi.input_terminated"):
            return b"", True
        head = environ["wsgi.input"].read(limit + 1)
        if len(head) <= limit:
            return head, True
        environ["wsgi.input"] = io.BufferedReader(_Joined(head, environ["wsgi.input"]))
        return None, False
    try:
        length = int(declared)
    except ValueError:
        return None, False
    if length < 0 or length > limit:
        return None, False
    body = environ["wsgi.input"].read(length) if length else b""
    # Short: the client left while sending it. The app gets what came, once.
    return body, len(body) == length


def _status_code(status: str) -> int | None:
    try:
        return int(status.split(None, 1)[0])
    except (ValueError, IndexError):
        return None
