"""``SessionMiddleware``: a unit of work per ASGI request, settled when the response starts."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

import anyio

from .. import _exhaustion, _replicas, _retry
from .._sessions import log_request_failure
from .._types import ASGIApp, Message, Receive, Scope, Send
from .._unit import SAFE_METHODS, Binding, Unit, default_commit_on

if TYPE_CHECKING:
    from .._core import Database

__all__ = ["SessionMiddleware"]

logger = logging.getLogger("sessionscope")

_FAILURE_BODY = b"Internal Server Error"
_FAILURE_START: Message = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_FAILURE_BODY)).encode()),
    ],
}

# Where a response is: nothing sent yet; started (the start forwarded, the body streaming);
# done (the final message forwarded, or dropped after our 500); replaced (our 500 was sent
# instead of the app's response, whose body is still running).
_BEFORE, _STREAMING, _DONE, _REPLACED = range(4)

# The databases whose SessionMiddleware is passing the lifespan on, to catch one installed
# twice before the first request.
_lifespans: ContextVar[tuple[Database[Any], ...]] = ContextVar("sessionscope_lifespans", default=())


class SessionMiddleware:
    """Give every HTTP request a unit of work, and settle it before the response starts.

    Inside a request ``db.session`` is the request's session, created on first use (a
    request that never touches it costs no session and no connection). When the app sends
    ``http.response.start`` and the request used the session, the middleware commits what
    was written so far if ``commit_on(status)`` is true (default: below 400) and nothing
    vetoed it, otherwise rolls it back; only then does the status reach the server. If the
    commit fails the client gets a 500 (or what ``on_commit_error`` returns) instead of the
    app's response; the app's later messages are dropped and what its body writes
    meanwhile is rolled back.

    Streaming bodies: the session stays usable while the body streams. What the body
    writes (before or after its first chunk) is committed, by the same status decision,
    before the final body message (or the final trailers message, when the start announced
    trailers) is forwarded; if that commit fails the final message is withheld and the
    error is raised, so the client sees an incomplete response, never a complete one. A
    body that raises, or a client that disconnects mid-stream, gets it rolled back.

    The event loop never waits on the database: a sync session's commit, rollback and
    close run on the loop only when they cannot wait (a transaction that only ran
    SELECTs, on a connection it already holds, with no after-commit callbacks); everything
    else runs in a worker thread outside the endpoints' thread limiter. A request cancelled
    before its COMMIT is sent is rolled back; one cancelled after it waits for the outcome.

    Work after the response (Starlette ``BackgroundTasks``) runs once the request's session
    is removed and its connection returned; ``db.session`` there is a fresh unit, committed
    when the app returns and rolled back if it raises.

    ``websocket`` connections get a unit for their lifetime that is never committed for
    you (commit explicitly); it is rolled back and removed when the socket closes.
    ``lifespan`` passes through; the startup fails if the middleware is installed twice for
    one database; at shutdown the engines the ``Database`` created are disposed.

    :param app: the ASGI app to wrap.
    :param db: the ``Database``; default ``sessionscope.db`` (``DATABASE_URL`` or the
        embedded SQLite file).
    :param commit_on: decides from the final status whether to commit.
    :param on_commit_error: called with the commit error; returns an ASGI app (a Starlette
        ``Response`` is one) that sends the replacement response. Default: plain 500.
    :param dispose_on_shutdown: dispose the engines the ``Database`` created at lifespan
        shutdown.
    :param commit_in_thread: for sync sessions, end every unit in a worker thread, even one
        that could end on the event loop (one that only read).
    :param retry_after: the seconds a ``503 Service Unavailable`` asks the client to wait
        (its ``Retry-After``). A request whose unit got no connection within the pool's
        ``pool_timeout`` gets that 503 instead of its response, whether the error escaped
        the app, the app turned it into a 5xx, or the commit met it (see "Pool
        exhaustion" in the docs); logged once at WARNING.
    :param retries: how many more times a request that lost a race with a concurrent
        transaction (a serialization failure, a deadlock, a lock wait timeout, a busy
        SQLite file: read from the driver's error code) is run, with a fresh unit and the
        same scope and body, when the error escaped the app or failed the commit before
        the start left. Default 0: a request may have effects outside the database that
        running it again would repeat. Never for a websocket, a response that started, a
        client that left, a request that committed something itself (or in a
        ``db.begin()`` nested in it) or called ``db.no_retry()``.
    :param retry_body_limit: the bytes of a request body kept to hand to another attempt
        (default 1 MiB); a longer body makes the request one that is not run again.
    """

    # Marks its bindings as handled by a middleware, to catch one installed twice.
    opens_requests = True

    def __init__(
        self,
        app: ASGIApp,
        db: Database[Any] | None = None,
        *,
        commit_on: Callable[[int], bool] = default_commit_on,
        on_commit_error: Callable[[BaseException], ASGIApp | None] | None = None,
        dispose_on_shutdown: bool = True,
        commit_in_thread: bool = False,
        retry_after: int = 1,
        retries: int = 0,
        retry_body_limit: int = _retry.DEFAULT_BODY_LIMIT,
    ) -> None:
        _exhaustion.check_retry_after(retry_after)
        self.retries = _retry.check_retries(retries)
        self.retry_body_limit = _retry.check_body_limit(retry_body_limit)
        if db is None:
            from .. import db as default_db

            db = default_db
        self.app = app
        self.db = db
        self.units = db.units
        self.commit_on = commit_on
        self.on_commit_error = on_commit_error
        self.dispose_on_shutdown = dispose_on_shutdown
        self.commit_in_thread = commit_in_thread
        self.inline = not commit_in_thread
        self.retry_after = retry_after
        # Read replicas: whether requests with a safe method start on one, and the cookie
        # that sends a client to the primary for a while after its request wrote.
        self.reads_replicas = db.reads_replicas
        self.primary_cookie: tuple[bytes, bytes] | None = None
        if db.read_your_writes:
            value = _replicas.cookie_header(db.read_your_writes)
            self.primary_cookie = (b"set-cookie", value.encode())
        self._busy_headers = [
            *((name.encode(), value.encode()) for name, value in _exhaustion.HEADERS),
            (b"retry-after", str(retry_after).encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        if self.retries:
            await self._retrying(scope, receive, send)
            return
        # The HTTP path is the hot path: a request that never touches the session should
        # pay close to nothing for it. Its binding (db.session finds it in the ContextVar,
        # and opens the request's unit through it on first use) and the exchange that
        # wraps its send are made here; a request that never uses the session opens no
        # unit.
        units = self.units
        binding_var = units.binding
        outer = binding_var.get()
        if outer is not None:
            self._refuse_nesting(outer)
        exchange = _Exchange(self, scope, receive, send)
        binding = exchange.binding
        token = binding_var.set(binding)
        try:
            await self.app(scope, receive, exchange.send)
        except BaseException as error:
            busy = exchange.state == _BEFORE and self._busy(error)
            await self._end_request(exchange, token, failed=True)
            if not busy:
                raise
            exchange.state = _DONE
            await self._send_busy(scope, send)
            return
        # From here on no unit opens through this binding. A thread may be opening one
        # right now, under the lock: then the slow end waits for it. (Checked, not taken,
        # in the common case: taking it cost ~0.3 us.)
        binding.renewable = False
        if units.lock.locked() or binding.unit is not None or exchange.state != _DONE:
            await self._end_request(exchange, token, failed=False)
            return
        # The common end: the response is complete and no unit is left (none was opened,
        # or the final message ended it).
        binding_var.reset(token)

    async def _retrying(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle the request as ``__call__`` does, running it again while it loses races.

        Each attempt gets a copy of the scope as the server gave it, and a ``receive`` that
        replays the body messages received so far before it asks the server for more.
        """
        binding_var = self.units.binding
        outer = binding_var.get()
        if outer is not None:
            self._refuse_nesting(outer)
        replay = _Replay(receive, self.retry_body_limit)
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            exchange = _Exchange(self, _fresh(scope), replay.receiver(), send)
            binding = exchange.binding
            binding.attempt = attempt
            binding.retries_left = attempt < attempts and replay.kept
            replay.binding = binding
            token = binding_var.set(binding)
            try:
                await self.app(exchange.scope, exchange.receive, exchange.send)
            except BaseException as error:
                code = ""
                if isinstance(error, Exception):  # a cancellation or an exit ends it all
                    code = exchange.rerun or exchange.lost_race(error)
                busy = not code and exchange.state == _BEFORE and self._busy(error)
                stored = exchange.stored_since()
                await self._end_request(exchange, token, failed=True)
                if code and (stored or await replay.client_left()):
                    if exchange.rerun:
                        await self._not_run_again(exchange, receive, send)
                        return
                    raise  # the lost race escaped the app: as without retries
                if code:
                    logger.debug("The attempt's error, discarded with it", exc_info=error)
                elif not busy:
                    raise
                else:
                    exchange.state = _DONE
                    await self._send_busy(scope, send)
                    return
            else:
                binding.renewable = False
                code = exchange.rerun
                stored = exchange.stored_since()
                await self._end_request(exchange, token, failed=bool(code))
                if code and (stored or await replay.client_left()):
                    await self._not_run_again(exchange, receive, send)
                    return
            if not code:
                return
            _retry.log_retry(
                f"The request '{scope['method']} {scope['path']}'", code, attempt, attempts
            )
            await anyio.sleep(_retry.backoff(attempt))

    async def _not_run_again(self, exchange: _Exchange, receive: Receive, send: Send) -> None:
        """The attempt's commit lost a race, but the request is not run again after all: its
        code stored something since (a cleanup's 'db.begin()'), or its client left. Nothing
        was sent: the client gets the usual answer to a failed commit."""
        error = exchange.rerun_error
        assert error is not None
        logger.error(
            "Commit failed; the unit of work was rolled back. The request is not run again:"
            " its code stored something since, or its client left.",
            exc_info=error,
        )
        await self._send_failure(error, exchange.scope, receive, send, logged=True)

    async def _end_request(
        self, exchange: _Exchange, token: Token[Binding | None], failed: bool
    ) -> None:
        """End the unit the request left behind, and its binding."""
        units = self.units
        try:
            unit = units.close_binding(exchange.binding)
            if unit is not None:
                # The request's unit if its response never completed (an error, a
                # disconnect, a cancellation, a replaced response, a start with no body:
                # nothing more of it is committed), else the unit that work after the
                # response opened (committed unless the app raised).
                with anyio.CancelScope(shield=True):
                    await units.end_async(
                        unit, commit=exchange.state == _DONE and not failed, inline=self.inline
                    )
        finally:
            units.unbind(token)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refuse_nesting(self, outer: Binding) -> None:
        # A request (ASGI or WSGI) or a websocket still being handled through ``outer``;
        # once an ASGI response is complete, work after it may call the app in-process (an
        # internal sub-request) with units of its own.
        if outer.handling_request():
            raise RuntimeError(self._twice(type(outer.owner).__name__))

    def _twice(self, outer: str) -> str:
        return (
            f"A '{outer}' for {self.db!r} is already handling this request: the"
            " middleware is installed twice for one database. Keep one (for Starlette,"
            " 'app.add_middleware(SessionMiddleware, db=db)' once; a Flask app served"
            " inside it needs no 'db.init_app' of its own)."
        )

    @staticmethod
    def _busy(error: BaseException) -> bool:
        """Whether the app raised ``error`` because the pool had no connection for it."""
        # Not a cancellation or an exit; and only the timeout itself (or an error raised
        # from it): a bug met after the app recovered from one keeps its traceback.
        return isinstance(error, Exception) and _exhaustion.is_pool_timeout(error)

    def report_busy(self, scope: Scope) -> None:
        _exhaustion.report(scope["method"], scope["path"], self.db.url, self.retry_after)

    async def _send_busy(self, scope: Scope, send: Send) -> None:
        """Answer 503 with Retry-After: the pool had no connection for this request."""
        self.report_busy(scope)
        await send({"type": "http.response.start", "status": 503, "headers": self._busy_headers})
        await send({"type": "http.response.body", "body": _exhaustion.BODY})

    async def _send_failure(
        self,
        error: BaseException,
        scope: Scope,
        receive: Receive,
        send: Send,
        logged: bool = False,
    ) -> None:
        """Answer a failed commit: ``on_commit_error``'s response, or a plain 500.

        :param logged: the failure is logged already. Otherwise, with ``on_commit_error`` (the
            commit's own log left the failure to it), one WARNING line without traceback
            says how the app answered it, or an ERROR with the traceback if it did not.
        """
        if self.on_commit_error is not None:
            try:
                replacement = self.on_commit_error(error)
            except Exception:
                logger.exception("The 'on_commit_error' hook raised; sending a plain 500.")
                replacement = None
            if not logged:
                answered = replacement is not None
                log_request_failure(scope["method"], scope["path"], self.db.url, error, answered)
            if replacement is not None:
                await replacement(scope, receive, send)
                return
        await send(_FAILURE_START)
        await send({"type": "http.response.body", "body": _FAILURE_BODY})

    # -- other scopes -------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        units = self.units
        outer = units.binding.get()
        if outer is not None:
            self._refuse_nesting(outer)
        binding = Binding(units.open(), owner=self)
        token = units.bind(binding)
        try:
            await self.app(scope, receive, send)
        finally:
            try:
                unit = units.close_binding(binding)
                if unit is not None:
                    with anyio.CancelScope(shield=True):
                        # Never committed for the app: a socket has no status to decide by.
                        await units.end_async(unit, commit=False, inline=self.inline)
            finally:
                units.unbind(token)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        outer = _lifespans.get()
        if self.db in outer:
            await self._refuse_startup(receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete" and self.dispose_on_shutdown:
                try:
                    await self.db.dispose_async()
                except Exception:
                    logger.exception("Disposing %r at shutdown failed", self.db)
            await send(message)

        token = _lifespans.set((*outer, self.db))
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _lifespans.reset(token)

    async def _refuse_startup(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] == "lifespan.startup":
            error = self._twice("SessionMiddleware")
            logger.error("%s", error)
            await send({"type": "lifespan.startup.failed", "message": error})


class _Rerun(Exception):
    """Raised into the app's ``send``: its commit lost a race and the request runs again."""

    def __init__(self, code: str) -> None:
        super().__init__(
            f"The request's commit lost a race with a concurrent transaction ({code});"
            " sessionscope runs the request again. Let this error propagate."
        )


def _fresh(scope: Scope) -> Scope:
    """A copy of ``scope`` for one attempt: what an attempt's app adds to it (Starlette's
    request state, say) is not seen by the next."""
    copy = dict(scope)
    state = scope.get("state")
    if isinstance(state, dict):
        copy["state"] = dict(state)
    return copy


# Messages a server may have waiting when asked whether the client left: body chunks not
# read yet, then the disconnect (bounded: a receive that never waits cannot spin).
_POLLS = 64


class _Replay:
    """The request's body messages, kept (up to a limit) for another attempt to read.

    Each attempt's ``receive`` hands out the kept messages first, then asks the server.
    Once the body is longer than the limit, or the client is gone (``http.disconnect``),
    nothing more is kept and the running attempt is the last.
    """

    __slots__ = ("_receive", "binding", "kept", "limit", "messages", "size")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self.messages: list[Message] = []
        self.size = 0
        self.limit = limit
        self.kept = True
        self.binding: Binding | None = None

    def receiver(self) -> Receive:
        position = 0

        async def receive() -> Message:
            nonlocal position
            if position < len(self.messages):
                position += 1
                return self.messages[position - 1]
            message = await self._receive()
            if self.kept:
                self._keep(message)
                position = len(self.messages)
            return message

        return receive

    async def client_left(self) -> bool:
        """Whether the client left, or the request cannot be run again for its body: asked
        of the server without waiting, as Starlette's ``is_disconnected`` does. A body
        message the server had waiting is kept, for the next attempt to read."""
        for _ in range(_POLLS):
            if not self.kept:
                break
            with anyio.CancelScope() as scope:
                scope.cancel()
                self._keep(await self._receive())
            if scope.cancelled_caught:
                break  # nothing was waiting: the client is still there
        return not self.kept

    def _keep(self, message: Message) -> None:
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size <= self.limit:
                self.messages.append(message)
                return
        # Too long to keep, or the client left: this attempt is the last.
        self.kept = False
        self.messages = []
        if self.binding is not None:
            self.binding.stop_retries()


class _RequestBinding(Binding):
    """An HTTP request's binding: what ``db.session`` finds in the ``ContextVar``.

    It holds nothing of the request but its unit. Every callback scheduled while the
    request runs keeps a copy of the context, and so this object, alive until it runs: a
    binding that held the scope and the server's ``send`` kept them alive as long, and the
    garbage collector, which then found them in its young generations, ran about three
    times as often under 256 connections (measured under uvicorn).
    """

    # Made by _Exchange, which sets every slot itself: no __init__ call per request.
    # ``answered``: the final response message has been forwarded (or ours sent).
    __slots__ = ("answered",)
    answered: bool

    def handling_request(self) -> bool:
        return not self.answered


_new_binding = object.__new__


async def _nothing() -> None:
    return None


def _wrote_recently(scope: Scope) -> bool:
    """Whether the request carries the cookie set after its client's last write."""
    for name, value in scope.get("headers", ()):
        if name == b"cookie" and _replicas.wrote_recently(value):
            return True
    return False


def _declared_length(start: Message) -> int:
    """The ``content-length`` a response start declared, or -1."""
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return -1


class _Exchange:
    """One HTTP request under the middleware: its binding, and the ``send`` its app gets.

    While the request has no unit (it has not used ``db.session``, or its unit has ended)
    ``send`` is a plain function that hands back the server's own awaitable, so such a
    response costs no coroutine of the middleware's. Otherwise the unit settles before the
    start leaves (``_start``) and ends before the final message leaves (``_final``).
    """

    __slots__ = (
        "_server_send",
        "binding",
        "held",
        "middleware",
        "receive",
        "rerun",
        "rerun_error",
        "scope",
        "start",
        "state",
        "status",
        "trailers",
        "unsent",
    )
    # Set when the start passes: the start itself, the bytes of its content-length not
    # yet forwarded (None: not looked up yet, -1: none declared), the messages held back.
    start: Message
    unsent: int | None
    held: list[Message] | None

    def __init__(
        self, middleware: SessionMiddleware, scope: Scope, receive: Receive, send: Send
    ) -> None:
        binding = self.binding = _new_binding(_RequestBinding)
        binding.unit = None
        binding.owner = middleware
        binding.renewable = True
        binding.streaming = False
        binding.source = None
        binding.writes = scope["method"] not in SAFE_METHODS
        binding.answered = False
        binding.attempt = 1
        binding.retries_left = False
        binding.stored_inside = False
        binding.reads_replica = (
            middleware.reads_replicas and not binding.writes and not _wrote_recently(scope)
        )
        self.middleware = middleware
        self.scope = scope
        self.receive = receive
        self._server_send = send
        self.state = _BEFORE
        self.status = 0
        self.trailers = False
        # Set when this attempt's commit lost a race and the request runs again: the
        # driver's code, for the log.
        self.rerun = ""
        self.rerun_error: BaseException | None = None

    def send(self, message: Message) -> Awaitable[None]:
        state = self.state
        if state == _STREAMING:
            if not self._is_final(message):
                if self.held is not None or message["type"] == "http.response.body":
                    return self._body(message)
                return self._server_send(message)
            if self.binding.unit is None:
                self.state = _DONE
                self._answered()
                if self.held is not None:
                    return self._release(message)
                return self._server_send(message)
            return self._final(message)
        if state == _BEFORE:
            if message["type"] != "http.response.start":
                return self._server_send(message)
            self.status = message["status"]
            self.trailers = bool(message.get("trailers", False))
            self.start = message
            self.unsent = None
            self.held = None
            self.state = _STREAMING
            self.binding.streaming = True
            if self.binding.unit is None:
                return self._server_send(message)
            return self._start(message)
        if state == _DONE:
            return self._server_send(message)
        return self._drop(message)

    def _answered(self) -> None:
        # The final message leaves: work from now on is work after the response.
        binding = self.binding
        binding.answered = True
        binding.streaming = False
        binding.writes = False  # work after the response is not the request's write
        binding.retries_left = False
        binding.reads_replica = False  # nor a request's read: it runs on the primary

    def _body(self, message: Message) -> Awaitable[None]:
        """A body message that is not the final one.

        Once the body reaches the ``content-length`` its start declared, a client takes the
        response as complete: the message that reaches it is held back with what follows,
        until the stream's work is settled at the final message (``_final``), so that a
        failed commit there still leaves the response visibly short.
        """
        held = self.held
        if held is not None:
            if message.get("body"):
                # More than the declared length: the server refuses it. Let it, now,
                # before the stream's work could be committed behind a broken response.
                self.held = None
                self.unsent = -1
                return self._flush([*held, message])
            held.append(message)  # an empty chunk, or trailers: they keep their order
            return _nothing()
        unsent = self.unsent
        if unsent is None:
            unsent = self.unsent = _declared_length(self.start)
        if unsent < 0:
            return self._server_send(message)
        size = len(message.get("body", b""))
        if size != unsent:
            # Short of the length (or past it: the server refuses that one at once).
            self.unsent = unsent - size if size < unsent else -1
            return self._server_send(message)
        self.unsent = 0
        self.held = [message]
        return _nothing()

    async def _flush(self, messages: list[Message]) -> None:
        for message in messages:
            await self._server_send(message)

    async def _release(self, final: Message) -> None:
        """Forward the held messages, then the final one."""
        held, self.held = self.held or [], None
        await self._flush([*held, final])

    def _is_final(self, message: Message) -> bool:
        kind = message["type"]
        if self.trailers:
            return kind == "http.response.trailers" and not message.get("more_trailers", False)
        if kind == "http.response.body" or kind == "http.response.zerocopysend":
            return not message.get("more_body", False)
        return bool(kind == "http.response.pathsend")

    async def _start(self, start: Message) -> None:
        """Settle what was written before the start, then let the start out."""
        middleware = self.middleware
        units = middleware.units
        unit = self.binding.unit
        assert unit is not None
        commit = middleware.commit_on(self.status)
        # A failed commit is logged naming the request; one the app's 'on_commit_error'
        # answers, with how it answered (see _send_failure).
        unit.request = (self.scope["method"], self.scope["path"], middleware.db)
        unit.logged_by_adapter = middleware.on_commit_error is not None
        try:
            error = await units.end_async(unit, commit, keep=True, inline=middleware.inline)
        except BaseException:
            # Cancelled (the app may catch it and send another start): this one never left.
            self.state = _BEFORE
            raise
        finally:
            unit.logged_by_adapter = False
        if error is None:
            # What the stream writes from now on cannot be run again (see _retrying).
            unit.retries_left = self.binding.retries_left = False
            if unit.commits:
                self.scope[_retry.STORED] = True  # for a middleware of another database
            cookie = middleware.primary_cookie
            if cookie is not None and unit.stored:
                # The client's next requests read from the primary for a while: it sees
                # what it just saved, whatever the replicas' lag.
                start = {**start, "headers": [*start.get("headers", ()), cookie]}
            if unit.exhausted and self.status >= 500 and not commit:
                # The pool had no connection for it: a 503 of the app's own stands.
                if self.status != 503:
                    await self._replace_busy(unit)
                    return
                middleware.report_busy(self.scope)
            await self._server_send(start)
            return
        if _exhaustion.is_pool_timeout(error):
            await self._replace_busy(unit)
            return
        code = _retry.rerun_code(unit, error)
        await self._abandon(unit)
        if code is not None:
            # Lost a race: nothing of the response leaves, nor does the app's work after it
            # (Starlette's background tasks run after this send returns); the request runs
            # again (see _retrying).
            self.rerun = code
            self.rerun_error = error
            raise _Rerun(code)
        await middleware._send_failure(error, self.scope, self.receive, self._server_send)

    def lost_race(self, error: BaseException) -> str:
        """The driver's code if ``error`` escaped the app before its start, for losing a race
        that running the request again may win; else an empty string."""
        if self.state != _BEFORE or self.stored_since():
            return ""
        ours = self.middleware.db.uses_engine
        return _retry.rerun_code(self.binding.unit, error, ours) or ""

    def stored_since(self) -> bool:
        """Whether the attempt's code stored something after its unit's race was lost: in a
        unit of its own ('db.begin()' in a cleanup), or in a unit the binding opened anew."""
        unit = self.binding.unit
        late = unit is not None and bool(unit.commits or unit.no_retry)
        # Or a middleware of another database, inside this one, committed the request's.
        return self.binding.stored_inside or late or bool(self.scope.get(_retry.STORED))

    async def _replace_busy(self, unit: Unit) -> None:
        """Our 503 replaces the app's response, as our 500 does in ``_start``."""
        await self._abandon(unit)
        await self.middleware._send_busy(self.scope, self._server_send)

    async def _abandon(self, unit: Unit) -> None:
        # A response of ours replaces the app's: the rest of it is dropped (_drop), and what
        # its body writes from here on, in a unit of its own, is rolled back.
        middleware = self.middleware
        self.state = _REPLACED
        self.binding.unit = None
        await middleware.units.end_async(unit, commit=False, inline=middleware.inline)

    async def _final(self, message: Message) -> None:
        """Commit what the stream wrote before its final message leaves."""
        middleware = self.middleware
        unit = self.binding.unit
        assert unit is not None
        self.state = _DONE
        self._answered()
        commit = middleware.commit_on(self.status)
        error = await middleware.units.end_async(unit, commit, inline=middleware.inline)
        self.binding.unit = None
        if error is not None:
            # Too late for a 500: withhold the final message (and the body messages held
            # back, see _body) so the response is visibly incomplete, and let the server
            # abort the connection.
            raise error
        if self.held is not None:
            await self._release(message)
            return
        await self._server_send(message)

    async def _drop(self, message: Message) -> None:
        """Our 500 replaced the app's response: drop the rest of it."""
        if not self._is_final(message):
            return
        self.state = _DONE
        self._answered()
        unit = self.binding.unit
        if unit is not None:
            self.binding.unit = None
            await self.middleware.units.end_async(unit, commit=False)
