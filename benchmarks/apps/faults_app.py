"""The fault soak's app (``benchmarks.faults``): sessionscope under writes that go wrong.

Every endpoint is ``POST /w/<kind>/<id>``: it writes one row with the client's ``id`` and
``name=<kind>``, then ends the way its kind says. Sync mode uses ``def`` endpoints (and a
sync generator for the streams), async mode ``async def`` endpoints, with the default pool
and ``SessionMiddleware``'s default options:

- ``good``: ``add()`` only (``?flush=1``: and flush), ``201``; must be stored.
- ``conflict``: flushes, answers ``409``; must be rolled back.
- ``raise``: flushes, raises (Starlette answers ``500``); must be rolled back.
- ``drop``: flushes, sleeps ``DROP_SLEEP``, answers ``201``; the client leaves meanwhile.
- ``slow``: flushes, sleeps ``SLOW_SLEEP`` (the burst), answers ``201``.
- ``stream``: a ``StreamingResponse`` whose body writes and flushes before its first chunk
  (``?late=1``: after it), sleeps ``STREAM_SLEEP`` and sends a second chunk; the client reads
  it whole, or (``stream-drop``) leaves after the first chunk. Either way the write is
  stream work: made after the response started.

``Answers``, the outermost middleware, notes in a ``Ledger`` what the server really sent for
each id: the status of the start and whether the final body message left (the contract
commits before the status, and a stream's work before its final message). ``GET /_answers``
hands those notes over and forgets them; ``GET /_holders`` counts the requests in flight by
the last step they reached and whether their session holds a connection; ``GET /_stats`` is
the pool and registry, as in the other apps; ``GET /_info`` says which sessionscope the
server imported.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import sessionscope
from sessionscope import Database, SessionMiddleware

from .common import BenchFailure, Item, stats_route, use_sqlite_pragmas

__all__ = ["DROP_SLEEP", "SLOW_SLEEP", "STREAM_SLEEP", "Answers", "Ledger", "build"]

DROP_SLEEP = 1.0
"""Seconds a ``drop`` endpoint sleeps after writing: the client leaves before the answer."""
SLOW_SLEEP = 2.0
"""Seconds a ``slow`` endpoint holds its connection: the slowest request by design."""
STREAM_SLEEP = 0.5
"""Seconds between a stream's two chunks: a ``stream-drop`` client leaves in this gap."""
CREATED = {"ok": True}
CHUNK = b"x" * 64


class Ledger:
    """What the server did with each ``/w/<kind>/<id>`` request, for the harness.

    ``answers[id] = [status, complete]``: the status of the start that left the app, and
    whether its final body message did too (noted as it is handed to the server). A request
    with no entry sent no start at all (it raised, or was cancelled before answering;
    Starlette's error middleware, outside ``Answers``, may still answer 500).

    ``steps[id] = [kind, step, session]``: the last step the endpoint (or its body) reached,
    while the request is in flight, and its session: during a stall, ``holders()`` says
    which requests hold the pool's connections and where they are.
    """

    def __init__(self) -> None:
        self.answers: dict[int, list[Any]] = {}
        self.steps: dict[int, list[Any]] = {}

    def note(self, item: Item, step: str, session: Any) -> None:
        """The request writing ``item`` reached ``step``."""
        self.steps[item.id] = [item.name, step, session]

    def take(self) -> dict[str, list[Any]]:
        """The answers so far, as JSON keys, and start afresh."""
        taken, self.answers = self.answers, {}
        return {str(item_id): answer for item_id, answer in taken.items()}

    def holders(self) -> dict[str, int]:
        """How many requests in flight are at each ``kind step``, holding a connection or not."""
        found: collections.Counter[str] = collections.Counter()
        for kind, step, session in list(self.steps.values()):
            found[f"{kind} {step}: {'holds' if _holds(session) else 'no'} connection"] += 1
        return dict(found.most_common())


def _holds(session: Any) -> bool:
    sync = session.sync_session if isinstance(session, AsyncSession) else session
    try:
        transaction = sync.get_transaction()
        return transaction is not None and bool(transaction.connections)
    except Exception:  # read from another thread while it changes: a diagnostic only
        return False


class Answers:
    """Outermost middleware: fills the ``Ledger`` for each ``/w/<kind>/<id>`` request."""

    def __init__(self, app: ASGIApp, ledger: Ledger) -> None:
        self.app = app
        self.ledger = ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/w/"):
            await self.app(scope, receive, send)
            return
        item_id = int(path.rsplit("/", 1)[1])
        ledger = self.ledger

        async def noting_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                ledger.answers[item_id] = [message["status"], False]
            elif kind == "http.response.body" and not message.get("more_body", False):
                # Handed over: whatever the unit commits, it committed before this point.
                ledger.answers[item_id][1] = True
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            ledger.steps.pop(item_id, None)


def build(url: str, mode: str, *, pgbouncer: bool = False) -> ASGIApp:
    """The fault app for ``url``; ``mode`` is ``"sync"`` or ``"async"``; ``pgbouncer``: the
    URL is a PgBouncer's in transaction pooling mode (``Database(url, pgbouncer=True)``)."""
    use_sqlite_pragmas(url)
    db: Database[Any] = Database(url, pgbouncer=pgbouncer)
    ledger = Ledger()

    def stats(request: Request) -> dict[str, Any]:
        pool = db.sync_engine.pool
        return {
            "checkedout": pool.checkedout() if isinstance(pool, QueuePool) else 0,
            "live_units": db.live_units,
            "live_sessions": db.live_sessions,
        }

    async def answers(request: Request) -> JSONResponse:
        return JSONResponse(ledger.take())

    async def holders(request: Request) -> JSONResponse:
        return JSONResponse(ledger.holders())

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"sessionscope": sessionscope.__file__, "mode": mode})

    routes = _sync_routes(db, ledger) if mode == "sync" else _async_routes(db, ledger)
    extra = [
        stats_route(stats),
        Route("/_answers", answers),
        Route("/_holders", holders),
        Route("/_info", info),
    ]
    app = Starlette(routes=[*routes, *extra], middleware=[Middleware(SessionMiddleware, db=db)])
    return Answers(app, ledger)


def _item(request: Request) -> Item:
    kind = request.url.path.split("/")[2]
    return Item(id=int(request.path_params["item_id"]), name=kind)


def _sync_routes(db: Database[Any], ledger: Ledger) -> list[Route]:
    def write(item: Item, flush: bool = True) -> None:
        db.session.add(item)
        if flush:
            db.session.flush()
        ledger.note(item, "wrote", db.session())

    def good(request: Request) -> Response:
        write(item := _item(request), flush=bool(request.query_params.get("flush")))
        ledger.note(item, "returned", db.session())
        return JSONResponse(CREATED, status_code=201)

    def conflict(request: Request) -> Response:
        write(item := _item(request))
        ledger.note(item, "returned", db.session())
        return JSONResponse({"detail": "conflict"}, status_code=409)

    def fail(request: Request) -> Response:
        write(_item(request))
        raise BenchFailure("POST /w/raise raises after writing, so its write must roll back.")

    def sleeper(seconds: float) -> Any:
        def endpoint(request: Request) -> Response:
            write(item := _item(request))
            time.sleep(seconds)
            ledger.note(item, "returned", db.session())
            return JSONResponse(CREATED, status_code=201)

        return endpoint

    def stream(request: Request) -> Response:
        item = _item(request)
        late = bool(request.query_params.get("late"))

        def body() -> Iterator[bytes]:
            if not late:
                write(item)
            yield CHUNK
            if late:
                write(item)
            time.sleep(STREAM_SLEEP)
            ledger.note(item, "sent chunk 2", db.session())
            yield CHUNK
            ledger.note(item, "body ended", db.session())

        return StreamingResponse(body(), media_type="application/octet-stream")

    return _routes(good, conflict, fail, sleeper(DROP_SLEEP), sleeper(SLOW_SLEEP), stream)


def _async_routes(db: Database[Any], ledger: Ledger) -> list[Route]:
    async def write(item: Item, flush: bool = True) -> None:
        db.session.add(item)
        if flush:
            await db.session.flush()
        ledger.note(item, "wrote", db.session())

    async def good(request: Request) -> Response:
        await write(item := _item(request), flush=bool(request.query_params.get("flush")))
        ledger.note(item, "returned", db.session())
        return JSONResponse(CREATED, status_code=201)

    async def conflict(request: Request) -> Response:
        await write(item := _item(request))
        ledger.note(item, "returned", db.session())
        return JSONResponse({"detail": "conflict"}, status_code=409)

    async def fail(request: Request) -> Response:
        await write(_item(request))
        raise BenchFailure("POST /w/raise raises after writing, so its write must roll back.")

    def sleeper(seconds: float) -> Any:
        async def endpoint(request: Request) -> Response:
            await write(item := _item(request))
            await asyncio.sleep(seconds)
            ledger.note(item, "returned", db.session())
            return JSONResponse(CREATED, status_code=201)

        return endpoint

    async def stream(request: Request) -> Response:
        item = _item(request)
        late = bool(request.query_params.get("late"))

        async def body() -> AsyncIterator[bytes]:
            if not late:
                await write(item)
            yield CHUNK
            if late:
                await write(item)
            await asyncio.sleep(STREAM_SLEEP)
            ledger.note(item, "sent chunk 2", db.session())
            yield CHUNK
            ledger.note(item, "body ended", db.session())

        return StreamingResponse(body(), media_type="application/octet-stream")

    return _routes(good, conflict, fail, sleeper(DROP_SLEEP), sleeper(SLOW_SLEEP), stream)


def _routes(*endpoints: Any) -> list[Route]:
    kinds = ("good", "conflict", "raise", "drop", "slow", "stream")
    return [
        Route(f"/w/{kind}/{{item_id:int}}", endpoint, methods=["POST"])
        for kind, endpoint in zip(kinds, endpoints, strict=True)
    ]
