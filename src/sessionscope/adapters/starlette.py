"""Starlette and FastAPI helpers: a session dependency and a lifespan that disposes engines.

```python
from typing import Annotated

from fastapi import Depends, FastAPI
from sqlalchemy.orm import Session

from sessionscope import Database, SessionMiddleware
from sessionscope.adapters.starlette import session_dependency

db = Database("postgresql+psycopg://app@localhost/app")
app = FastAPI()
app.add_middleware(SessionMiddleware, db=db)
SessionDep = Annotated[Session, Depends(session_dependency(db))]


@app.post("/items")
def create_item(session: SessionDep) -> dict[str, str]:
    session.add(Item(name="new"))
    return {"status": "created"}
```
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, overload

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .._core import Database

__all__ = ["dispose_on_shutdown", "session_dependency"]


@overload
def session_dependency() -> Session: ...
@overload
def session_dependency(
    db: Database[AsyncSession],
) -> Callable[[], Coroutine[Any, Any, AsyncSession]]: ...
@overload
def session_dependency(db: Database[Session]) -> Callable[[], Coroutine[Any, Any, Session]]: ...
@overload
def session_dependency(db: Database[Any]) -> Callable[[], Coroutine[Any, Any, Any]]: ...
def session_dependency(db: Database[Any] | None = None) -> Any:
    """Make a dependency (``Depends(session_dependency(db))``) giving the request's session.

    It hands out the session that ``SessionMiddleware`` opened for the request, the same
    object ``db.session`` proxies to, in async and sync endpoints alike. It never commits:
    the middleware commits before the response starts, which a dependency with ``yield``
    cannot do (since FastAPI 0.118 its exit code runs after the response is sent).

    The dependency it makes is a coroutine function, so that FastAPI calls it on the event
    loop, with no thread hop; building the session opens no connection.

    ``Depends(session_dependency)``, the function itself, is the dependency for the default
    database ``sessionscope.db``: FastAPI calls it with no argument, and it returns the
    default database's session for the request (from a worker thread, as FastAPI runs a
    plain function).
    """
    if db is None:
        from .. import db as default_db

        return default_db.session()
    database = db

    async def current_session() -> Any:
        return database.session()

    return current_session


# FastAPI reads a dependency's parameters from its signature and would take 'db' for a query
# parameter it cannot validate (an error at start-up that names neither this function nor
# the fix). Shown without parameters, 'Depends(session_dependency)' is called with none.
session_dependency.__signature__ = inspect.Signature()  # type: ignore[attr-defined]


def dispose_on_shutdown(
    db: Database[Any],
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A Starlette/FastAPI ``lifespan`` that disposes ``db``'s own engines at shutdown.

    ``SessionMiddleware`` already does this when lifespan messages pass through it; use this
    when the database is used without the middleware (only ``db.begin()`` in the app).
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await db.dispose_async()

    return lifespan
