"""``SessionMiddleware``: a unit of work per ASGI request, settled when the response starts."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import Token
from typing import TYPE_CHECKING, Any, cast

import anyio
from sqlalchemy.orm import Session

from .._threads import run_blocking
from .._types import ASGIApp, Message, Receive, Scope, Send
from .._unit import Binding, Unit, default_commit_on

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

# Where a response is: nothing sent yet; start held back until the first body message;
# streaming (start forwarded); done (the final body forwarded, or dropped after our 500);
# replaced (our 500 was sent instead of the app's response, whose body is still running).
_BEFORE, _HELD, _STREAMING, _DONE, _REPLACED = range(5)


class SessionMiddleware:
    """Give every HTTP request a unit of work, and settle it before the response starts.

    Inside a request ``db.session`` is the request's session, created on first use (a
    request that never touches it costs no session and no connection). When the app sends
    ``http.response.start``, the middleware holds the message back until the first body
    message; then, if the request used the session, it commits if ``commit_on(status)`` is
    true (default: below 400) and nothing vetoed it, otherwise rolls back; only then does
    the status reach the server. If the commit fails the client gets a 500 (or what
    ``on_commit_error`` returns) instead of the app's response; the app's later messages
    are dropped and what its body writes meanwhile is rolled back.

    Streaming bodies: the session stays usable while the body streams; writes made during
    the stream are committed (or rolled back, by the same status decision) before the final
    chunk is forwarded. If that commit fails the final chunk is withheld and the error is
    raised, so the client sees an incomplete response, never a complete one. A client that
    disconnects mid-stream gets everything after the start rolled back.

    Work after the response (Starlette ``BackgroundTasks``) runs once the request's session
    is removed and its connection returned; ``db.session`` there is a fresh unit, committed
    when the app returns and rolled back if it raises.

    ``websocket`` connections get a unit for their lifetime that is never committed for
    you (commit explicitly); it is rolled back and removed when the socket closes.
    ``lifespan`` passes through; at shutdown the engines the ``Database`` created are
    disposed.

    :param app: the ASGI app to wrap.
    :param db: the ``Database``; default ``sessionscope.db`` (``DATABASE_URL`` or the
        embedded SQLite file).
    :param commit_on: decides from the final status whether to commit.
    :param on_commit_error: called with the commit error; returns an ASGI app (a Starlette
        ``Response`` is one) that sends the replacement response. Default: plain 500.
    :param dispose_on_shutdown: dispose the engines the ``Database`` created at lifespan
        shutdown.
    :param commit_in_thread: for sync sessions, always run the commit, rollback and close
        in a worker thread. By default a session that already holds its connection and has
        nothing left to flush is ended on the event loop (one statement, no pool wait),
        which the benchmarks show is much cheaper than a thread hop; everything else goes
        to a worker thread outside the endpoints' thread limiter.
    """

    # Marks its websocket bindings as handled by a middleware, to catch one installed twice.
    _opens_requests = True

    def __init__(
        self,
        app: ASGIApp,
        db: Database[Any] | None = None,
        *,
        commit_on: Callable[[int], bool] = default_commit_on,
        on_commit_error: Callable[[BaseException], ASGIApp | None] | None = None,
        dispose_on_shutdown: bool = True,
        commit_in_thread: bool = False,
    ) -> None:
        if db is None:
            from .. import db as default_db

            db = default_db
        self.app = app
        self.db = db
        self.commit_on = commit_on
        self.on_commit_error = on_commit_error
        self.dispose_on_shutdown = dispose_on_shutdown
        self.commit_in_thread = commit_in_thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        # The HTTP path is the hot path: a request that never touches the session should
        # pay close to nothing for it. Its binding (db.session finds it in the ContextVar,
        # and opens the request's unit through it on first use) and the exchange that
        # wraps its send are made here; a request that never uses the session opens no
        # unit.
        db = self.db
        binding_var = db._binding
        outer = binding_var.get()
        if outer is not None:
            self._refuse_nesting(outer)
        exchange = _Exchange(self, scope, receive, send)
        binding = exchange.binding
        token = binding_var.set(binding)
        try:
            await self.app(scope, receive, exchange.send)
        except BaseException:
            await self._end_request(exchange, token, failed=True)
            raise
        # From here on no unit opens through this binding. A thread may be opening one
        # right now, under the database's lock: wait for it, so that its unit is seen
        # below. (Checked, not taken, in the common case: taking it cost ~0.3 us.)
        binding.renewable = False
        if db._lock.locked() or binding.unit is not None or exchange.state != _DONE:
            await self._end_request(exchange, token, failed=False)
            return
        # The common end: the response is complete and no unit is left (none was opened,
        # or the final message ended it).
        db._unbind(token)

    async def _end_request(
        self, exchange: _Exchange, token: Token[Binding | None], failed: bool
    ) -> None:
        """End what the request left behind: its unit, a start with no body, its binding."""
        db = self.db
        binding = exchange.binding
        binding.renewable = False
        if db._lock.locked():
            with db._lock:
                pass
        state = exchange.state
        unit = binding.unit
        binding.unit = None
        try:
            # The unit still bound is the request's if its response never completed (an
            # error, a disconnect, a cancellation, a replaced response: nothing of it is
            # committed), else the one work after the response opened (committed unless
            # the app raised).
            if unit is not None and not unit.closed:
                with anyio.CancelScope(shield=True):
                    await self._finish(unit, commit=state == _DONE and not failed)
            held = exchange.held
            if not failed and state == _HELD and held is not None:
                # The app returned after a start with no body: let the server see what it
                # sent, now that nothing of it is committed.
                await exchange._server_send(held)
        finally:
            db._unbind(token)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan" and self.dispose_on_shutdown:
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refuse_nesting(self, outer: Binding) -> None:
        # A request (ASGI or WSGI) or a websocket still being handled through ``outer``;
        # once an ASGI response is complete, work after it may call the app in-process (an
        # internal sub-request) with units of its own.
        if outer.handling_request():
            raise RuntimeError(
                f"A '{type(outer.owner).__name__}' for {self.db!r} is already handling"
                " this request: the middleware is installed twice for one database. Keep"
                " one (for Starlette, 'app.add_middleware(SessionMiddleware, db=db)' once;"
                " a Flask app served inside it needs no 'db.init_app' of its own)."
            )

    async def _send_failure(
        self, error: BaseException, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if self.on_commit_error is not None:
            try:
                replacement = self.on_commit_error(error)
            except Exception:
                logger.exception("The 'on_commit_error' hook raised; sending a plain 500")
                replacement = None
            if replacement is not None:
                await replacement(scope, receive, send)
                return
        await send(_FAILURE_START)
        await send({"type": "http.response.body", "body": _FAILURE_BODY})

    # -- ending units, on the loop or in a thread ---------------------------------------

    async def _settle(self, unit: Unit, commit: bool) -> BaseException | None:
        """Commit or roll back what the unit holds, keeping its session for the stream."""
        db = self.db
        if not db.in_transaction(unit):
            return None
        if db.is_async:
            return await db._settle_async(unit, commit)
        if self._may_run_inline(unit):
            return db._settle_sync(unit, commit)
        return await run_blocking(db._settle_sync, unit, commit)

    async def _finish(self, unit: Unit, commit: bool) -> BaseException | None:
        """Commit or roll back, then remove the unit's session: exactly once."""
        db = self.db
        session = db._session_of(unit)
        if session is None or not session.in_transaction():
            # Nothing to commit and nothing on the wire: closing is pure bookkeeping.
            await self._remove(unit)
            return None
        if db.is_async:
            return await db._finish_async(unit, commit)
        if self._may_run_inline(unit):
            return db._finish_sync(unit, commit)
        return await run_blocking(db._finish_sync, unit, commit)

    async def _remove(self, unit: Unit) -> None:
        db = self.db
        if db.is_async:
            await db._remove_async(unit)
        elif db.in_transaction(unit) and not self._may_run_inline(unit):
            await run_blocking(db._remove_sync, unit)
        else:
            db._remove_sync(unit)

    def _may_run_inline(self, unit: Unit) -> bool:
        """Whether ending a sync session is quick and safe enough for the event loop.

        Measured (benchmarks/): a worker-thread hop costs far more than a COMMIT or ROLLBACK
        on a connection the session already holds. Such a session has nothing to check
        out, so it cannot wait for the pool; with nothing left to flush it sends one
        statement. A session that only add()ed (its connection is checked out inside the
        commit, possibly waiting for the pool) or has changes to flush goes to a thread.
        """
        if self.commit_in_thread:
            return False
        session = self.db._session_of(unit)
        if not isinstance(session, Session):
            return False
        transaction = session.get_transaction()
        if transaction is None or not transaction.connections:
            return False
        return not (session.new or session.deleted or session.dirty)

    # -- other scopes -------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        db = self.db
        outer = db._binding.get()
        if outer is not None:
            self._refuse_nesting(outer)
        unit = db._open_unit()
        binding = Binding(unit, owner=self)
        token = db._bind(binding)
        try:
            await self.app(scope, receive, send)
        finally:
            binding.unit = None
            with anyio.CancelScope(shield=True):
                # Never committed for the app: a socket has no status to decide by.
                await self._finish(unit, commit=False)
            db._unbind(token)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                try:
                    await self.db.dispose_async()
                except Exception:
                    logger.exception("Disposing %r at shutdown failed", self.db)
            await send(message)

        await self.app(scope, receive, send_wrapper)


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


class _Exchange:
    """One HTTP request under the middleware: its binding, and the ``send`` its app gets.

    While the request has no unit (it has not used ``db.session``, or its unit is settled)
    ``send`` is a plain function that hands back the server's own awaitable, so such a
    response costs no coroutine of the middleware's besides the one that releases the
    held start. Otherwise the start is held back until the first body message and the unit
    is settled before it leaves (``_settle_and_send``).
    """

    __slots__ = (
        "_server_send",
        "binding",
        "held",
        "middleware",
        "receive",
        "scope",
        "state",
        "status",
    )

    def __init__(
        self, middleware: SessionMiddleware, scope: Scope, receive: Receive, send: Send
    ) -> None:
        binding = self.binding = _new_binding(_RequestBinding)
        binding.unit = None
        binding.owner = middleware
        binding.renewable = True
        binding.answered = False
        self.middleware = middleware
        self.scope = scope
        self.receive = receive
        self._server_send = send
        self.state = _BEFORE
        self.held: Message | None = None
        self.status = 0

    def _done(self) -> None:
        self.state = _DONE
        self.binding.answered = True

    def send(self, message: Message) -> Awaitable[None]:
        state = self.state
        if state == _BEFORE:
            if message["type"] != "http.response.start":
                return self._server_send(message)
            # Held until the first body message: a unit that the body opens before its
            # first chunk is still settled before the status leaves.
            self.held = message
            self.state = _HELD
            return _ALREADY_DONE
        if state == _DONE:
            return self._server_send(message)
        if self.binding.unit is None:
            if state == _HELD:
                return self._release(message)
            if state == _STREAMING:
                if _is_final(message):
                    self._done()
                return self._server_send(message)
        return self._settle_and_send(message)

    async def _release(self, message: Message) -> None:
        """Nothing to settle: let the held start out, then ``message``."""
        start = self.held
        self.held = None
        assert start is not None
        # The common case first, without a call: a whole body in one message.
        if (message["type"] == "http.response.body" and not message.get("more_body")) or (
            _is_final(message)
        ):
            self.state = _DONE
            self.binding.answered = True
        else:
            # A unit that the stream opens from here on is settled by this status.
            self.status = start["status"]
            self.state = _STREAMING
        await self._server_send(start)
        await self._server_send(message)

    async def _settle_and_send(self, message: Message) -> None:
        state = self.state
        middleware = self.middleware
        final = _is_final(message)
        unit = self.binding.unit
        if state == _REPLACED:
            # Our 500 replaced the app's response: drop the rest of it, and roll back what
            # its body wrote meanwhile. Work after its final message is not part of it.
            if final:
                self._done()
                if unit is not None:
                    self.binding.unit = None
                    await middleware._finish(unit, commit=False)
            return
        send = self._server_send
        if state == _HELD:
            # The unit was open when the start came: settle it, then let the start out.
            start, self.held = self.held, None
            assert start is not None
            assert unit is not None
            commit = middleware.commit_on(start["status"])
            if final:
                error = await middleware._finish(unit, commit)
            else:
                error = await middleware._settle(unit, commit)
            if error is not None:
                if final:
                    self._done()
                else:
                    self.state = _REPLACED
                await middleware._finish(unit, commit=False)
                self.binding.unit = None
                await middleware._send_failure(error, self.scope, self.receive, send)
                return
            await send(start)
            if final:
                self._done()
                self.binding.unit = None
            else:
                self.status = start["status"]
                self.state = _STREAMING
            await send(message)
            return
        # Streaming: commit what the stream wrote before its final chunk leaves.
        if final:
            self._done()
            if unit is not None:
                error = await middleware._finish(unit, middleware.commit_on(self.status))
                self.binding.unit = None
                if error is not None:
                    # Too late for a 500: withhold the last chunk so the response is
                    # visibly incomplete, and let the server abort the connection.
                    raise error
        await send(message)


def _is_final(message: Message) -> bool:
    kind = message["type"]
    if kind == "http.response.body" or kind == "http.response.zerocopysend":
        return not message.get("more_body", False)
    return bool(kind == "http.response.pathsend")


class _AlreadyDone(tuple):  # type: ignore[type-arg]
    """An awaitable that completes at once: what ``send`` returns for a message it holds.

    Awaiting it iterates an empty tuple, all in C: no generator is made per message.
    """

    __slots__ = ()
    __await__ = tuple.__iter__


_ALREADY_DONE = cast("Awaitable[None]", _AlreadyDone())
