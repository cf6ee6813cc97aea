"""What a unit did, as the tracking sees it: corners where the SQL sent is judged by its text.

A write the tracking does not see lets its COMMIT run on the event loop (rule 16); a
savepoint it does not see lets a later ROLLBACK TO forgive a failure that happened outside
it, and the aborted unit answers success (rule 18).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from sessionscope import Database

from ._models import Item
from .conftest import Backend, DatabaseFactory, assert_no_leaks, backend_params
from .middleware._asgi_apps import with_route
from .middleware._driver import call

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("backend", backend_params(["sqlite"], ["sync"]), indirect=True)
async def test_a_write_run_by_the_apps_own_do_execute_listener_commits_off_the_loop(
    backend: Backend,
) -> None:
    """An engine of the app's may run statements in its own 'do_execute' listener (a retry
    on a busy SQLite file, say): its writes still make the COMMIT wait, so it must leave the
    loop."""
    engine = sa.create_engine(backend.url, connect_args={"timeout": 15})

    @event.listens_for(engine.dialect, "do_execute")
    def run_it_here(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        cursor.execute(statement, parameters)
        return True

    committed_on: list[int] = []
    event.listen(engine, "commit", lambda connection: committed_on.append(threading.get_ident()))
    db: Database[Session] = Database(engine=engine)
    loop_thread = threading.get_ident()

    def endpoint(request: Request) -> Response:
        db.session.add(Item(name="written"))
        db.session.flush()
        return PlainTextResponse("created", status_code=201)

    try:
        assert (await call(with_route(db, "/write", endpoint), "POST", "/write")).status == 201
        assert committed_on, "the unit committed"
        assert loop_thread not in committed_on, "a write unit's COMMIT ran on the event loop"
        assert_no_leaks(db, backend)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "savepoint",
    [
        "SAVEPOINT\n    checkpoint",
        "SAVEPOINT\tcheckpoint",
        "/* retry point */ SAVEPOINT checkpoint",
    ],
    ids=["newline", "tab", "comment"],
)
@pytest.mark.parametrize("backend", backend_params(["sqlite", "mariadb"], ["sync"]), indirect=True)
async def test_a_rollback_to_a_later_savepoint_does_not_forgive_an_earlier_failure(
    make_db: DatabaseFactory, savepoint: str
) -> None:
    """A statement failed before the savepoint was set: rolling back to that savepoint does
    not undo the failure (after a MariaDB deadlock it undid nothing), so the unit cannot
    answer success."""
    db: Database[Session] = make_db()

    def endpoint(request: Request) -> Response:
        db.session.execute(sa.text("INSERT INTO items (name) VALUES ('first')"))
        with contextlib.suppress(sa.exc.DBAPIError):
            db.session.execute(sa.text("INSERT INTO no_such_table (name) VALUES ('lost')"))
        db.session.execute(sa.text(savepoint))
        db.session.execute(sa.text("ROLLBACK TO SAVEPOINT checkpoint"))
        return PlainTextResponse("created", status_code=201)

    exchange = await call(with_route(db, "/failed", endpoint), "POST", "/failed")
    assert exchange.status == 500, "a unit with a failure outside any savepoint answered success"


# Spelled as an app might write them; some are one server's own syntax.
LOCKING_OR_WRITING = {
    "postgresql": [
        "SELECT id FROM items FOR\n    UPDATE",
        "select id from items for share",
        "SELECT id FROM items FOR NO  KEY UPDATE",
        "SELECT name INTO TEMPORARY copied FROM items",
    ],
    "mariadb": [
        "SELECT id FROM items FOR\n    UPDATE",
        "SELECT id FROM items LOCK  IN\nSHARE MODE",
        "SELECT name INTO @copied FROM items LIMIT 1",
    ],
}


@pytest.mark.parametrize(
    "backend", backend_params(["postgresql", "mariadb"], ["sync"]), indirect=True
)
async def test_a_select_that_locks_or_writes_ends_off_the_loop(
    backend: Backend, make_db: DatabaseFactory
) -> None:
    """A row lock (its COMMIT waits like a write's) or a SELECT ... INTO (a write), however
    it is spelled: the unit's end must leave the event loop (rule 16)."""
    db: Database[Session] = make_db()
    ended_on: list[int] = []

    def ended(connection: Any) -> None:
        ended_on.append(threading.get_ident())

    event.listen(db.sync_engine, "commit", ended)
    event.listen(db.sync_engine, "rollback", ended)
    loop_thread = threading.get_ident()
    for statement in LOCKING_OR_WRITING[backend.name]:
        ended_on.clear()

        def endpoint(request: Request, statement: str = statement) -> Response:
            db.session.execute(sa.text(statement))
            return PlainTextResponse("read", status_code=200)

        assert (await call(with_route(db, "/lock", endpoint), "GET", "/lock")).status == 200
        assert ended_on, f"the unit ended its transaction: {statement!r}"
        assert loop_thread not in ended_on, f"ended on the event loop: {statement!r}"
    assert_no_leaks(db, backend)
