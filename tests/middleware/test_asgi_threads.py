"""SessionMiddleware with threads the request starts and that outlive it.

Each case ends with the ``make_db`` fixture's check: pool back to 0 checked out, no live
unit, an empty registry.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from sessionscope import Database

from ..conftest import DatabaseFactory, backend_params
from ._asgi_apps import nothing_left, with_route
from ._driver import call

pytestmark = pytest.mark.anyio

SQLITE_SYNC = backend_params(backends=["sqlite"], modes=["sync"])


def _outliving_thread(
    use: Callable[[], object], started: threading.Event | None = None
) -> tuple[Callable[[Request], Awaitable[Response]], list[object], list[asyncio.Future[None]]]:
    """An endpoint that runs ``use()`` in a thread it does not wait for (once ``started``
    is set, if given, it returns); what ``use()`` returned or the RuntimeError it raised
    goes to the outcome list, the thread's future to the workers list.
    """
    outcome: list[object] = []
    workers: list[asyncio.Future[None]] = []

    def work() -> None:
        try:
            outcome.append(use())
        except RuntimeError as error:
            outcome.append(error)

    async def endpoint(request: Request) -> Response:
        workers.append(asyncio.ensure_future(asyncio.to_thread(work)))
        if started is not None:
            await anyio.to_thread.run_sync(started.wait)
        return PlainTextResponse("ok")

    return endpoint, outcome, workers


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
async def test_thread_whose_first_use_straddles_the_end_of_the_request(
    make_db: DatabaseFactory,
) -> None:
    """A thread the request started makes the request's first 'db.session' call, and the
    request ends while its session is being built: the thread gets the clear "already
    finished" error, and no session or connection is left behind.
    """
    in_thread = threading.local()
    building = threading.Event()
    proceed = threading.Event()

    class SlowToBuild(Session):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if getattr(in_thread, "slow", False):
                building.set()
                proceed.wait(5)
            super().__init__(*args, **kwargs)

    db: Database[Session] = make_db(session_options={"class_": SlowToBuild})

    def use() -> object:
        in_thread.slow = True
        return db.session.execute(sa.text("SELECT 1")).scalar()

    endpoint, outcome, workers = _outliving_thread(use, started=building)
    app = with_route(db, "/straddle", endpoint)
    assert (await call(app, "GET", "/straddle")).status == 200
    proceed.set()
    await workers[0]
    assert len(outcome) == 1
    assert isinstance(outcome[0], RuntimeError)
    assert "already finished" in str(outcome[0])
    assert nothing_left(db) == (0, 0, 0)


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
async def test_thread_opening_the_unit_as_the_request_ends_leaves_no_unit(
    make_db: DatabaseFactory,
) -> None:
    """Many requests whose thread makes the first 'db.session' call just as the request
    returns: whichever comes first, the unit is removed, never left open.
    """
    db: Database[Session] = make_db()
    failures: list[BaseException] = []
    workers: list[asyncio.Future[None]] = []

    def work() -> None:
        try:
            db.session.execute(sa.text("SELECT 1"))
        except RuntimeError as error:
            assert "already finished" in str(error)  # noqa: PT017 - re-raised below
        except BaseException as error:  # pragma: no cover - reported by the assert below
            failures.append(error)

    async def endpoint(request: Request) -> Response:
        workers.append(asyncio.ensure_future(asyncio.to_thread(work)))
        return PlainTextResponse("ok")

    app = with_route(db, "/race", endpoint)
    for _ in range(200):
        assert (await call(app, "GET", "/race")).status == 200
    await asyncio.gather(*workers)
    assert failures == []
    assert nothing_left(db) == (0, 0, 0)


@pytest.mark.parametrize("backend", SQLITE_SYNC, indirect=True)
async def test_thread_opening_the_unit_while_the_request_ends_is_waited_for(
    make_db: DatabaseFactory,
) -> None:
    """A thread is inside the opening of the request's unit when the app returns: the
    middleware waits for it and removes the unit it opened, instead of missing it. (The
    thread only asks for the session: using it while the request ends is a race of the
    app's own.)
    """
    db: Database[Session] = make_db()
    opening = threading.Event()
    open_unit = db.units.open
    in_thread = threading.local()

    def slow_open_unit(
        streaming: bool = False, source: Any = None, parent: Any = None, writes: bool = False
    ) -> Any:
        if getattr(in_thread, "slow", False):
            opening.set()
            threading.Event().wait(0.2)  # the loop reaches the end of the request meanwhile
        return open_unit(streaming, source, parent, writes)

    db.units.open = slow_open_unit  # type: ignore[method-assign]

    def use() -> object:
        in_thread.slow = True
        return db.session()

    endpoint, outcome, workers = _outliving_thread(use, started=opening)
    app = with_route(db, "/opening", endpoint)
    assert (await call(app, "GET", "/opening")).status == 200
    await workers[0]
    assert len(outcome) == 1
    assert nothing_left(db) == (0, 0, 0)
