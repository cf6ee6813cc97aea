"""A small Starlette app on sessionscope: a session per request, committed by the response.

Run it with ``scripts/run`` (or ``uvicorn examples.starlette_app:app``). Without
``DATABASE_URL`` it stores items in ``sessionscope.sqlite3`` in the working directory::

    curl -X POST 'http://127.0.0.1:8000/items?name=apple'   # 201, stored before the 201 leaves
    curl http://127.0.0.1:8000/items                        # ["apple"]
    curl -X POST 'http://127.0.0.1:8000/items?name=apple'   # 409, duplicate: rolled back
    curl -X POST 'http://127.0.0.1:8000/fail?name=pear'     # 500, nothing stored
    curl http://127.0.0.1:8000/stream                       # the list, streamed row by row
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sessionscope import SessionMiddleware, db


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "example_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


def create_item(request: Request) -> Response:
    """A sync endpoint: Starlette runs it in a worker thread, on the request's session."""
    name = request.query_params.get("name", "item")
    db.session.add(Item(name=name))
    try:
        db.session.flush()
    except IntegrityError:
        # The status decides: a 409 rolls the request back.
        return JSONResponse({"error": f"{name!r} exists"}, status_code=409)
    return JSONResponse({"created": name}, status_code=201)


def list_items(request: Request) -> Response:
    names = db.session.scalars(select(Item.name).order_by(Item.id)).all()
    return JSONResponse(list(names))


def fail(request: Request) -> Response:
    db.session.add(Item(name=request.query_params.get("name", "lost")))
    db.session.flush()
    raise RuntimeError("this write is rolled back, and the client gets a 500")


def stream_items(request: Request) -> Response:
    """The session stays usable while the body streams."""

    async def rows() -> AsyncIterator[bytes]:
        for name in db.session.scalars(select(Item.name).order_by(Item.id)):
            yield f"{name}\n".encode()

    return StreamingResponse(rows(), media_type="text/plain")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    with db.begin() as session:
        Base.metadata.create_all(session.connection())
    yield


app = Starlette(
    routes=[
        Route("/items", create_item, methods=["POST"]),
        Route("/items", list_items, methods=["GET"]),
        Route("/fail", fail, methods=["POST"]),
        Route("/stream", stream_items),
    ],
    lifespan=lifespan,
)
app.add_middleware(SessionMiddleware)  # the default database: sessionscope.db
