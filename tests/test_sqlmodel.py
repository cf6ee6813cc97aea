"""SQLModel: ``session_options={"class_": ...}`` makes ``db.session`` a SQLModel session,
with its ``exec``, under the same lifecycle (committed before the response, rolled back on
an error, nothing left behind)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlmodel
from fastapi import Depends, FastAPI, HTTPException
from sqlmodel import Field, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

from sessionscope import Database, SessionMiddleware
from sessionscope.adapters.starlette import session_dependency

from .conftest import Backend, DatabaseFactory

pytestmark = pytest.mark.anyio


class Hero(SQLModel, table=True):
    __tablename__ = "sqlmodel_heroes"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=50, unique=True)


HEROES = SQLModel.metadata.tables["sqlmodel_heroes"]


async def create_tables(db: Database[Any], backend: Backend) -> None:
    if backend.is_async:
        async with db.engine.begin() as connection:
            await connection.run_sync(SQLModel.metadata.drop_all, tables=[HEROES])
            await connection.run_sync(SQLModel.metadata.create_all, tables=[HEROES])
    else:
        SQLModel.metadata.drop_all(db.engine, tables=[HEROES])
        SQLModel.metadata.create_all(db.engine, tables=[HEROES])


async def test_db_session_is_a_sqlmodel_session_with_exec(
    make_db: DatabaseFactory, backend: Backend
) -> None:
    """The FastAPI full-stack template's code (``session.exec(select(...))``) runs on the
    request's session once the database is given SQLModel's session class; without it,
    ``exec`` does not exist."""
    session_class = SQLModelAsyncSession if backend.is_async else sqlmodel.Session
    db = make_db(session_options={"class_": session_class})
    await create_tables(db, backend)
    app = FastAPI()
    app.add_middleware(SessionMiddleware, db=db)
    current = Depends(session_dependency(db))

    async def run(result: Any) -> Any:
        return await result if backend.is_async else result

    @app.post("/heroes", status_code=201)
    async def create(name: str, session: Any = current) -> dict[str, str]:
        assert isinstance(session, session_class)
        session.add(Hero(name=name))
        return {"name": name}

    @app.post("/heroes/failing")
    async def create_then_fail(name: str, session: Any = current) -> None:
        session.add(Hero(name=name))
        await run(session.flush())
        raise HTTPException(status_code=400, detail="refused")

    @app.get("/heroes")
    async def names(session: Any = current) -> list[str]:
        heroes = await run(session.exec(select(Hero).order_by(Hero.name)))
        return [hero.name for hero in heroes]

    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.post("/heroes", params={"name": "ada"})).status_code == 201
        failed = await http.post("/heroes/failing", params={"name": "bob"})
        assert failed.status_code == 400
        assert (await http.get("/heroes")).json() == ["ada"]


def test_without_the_session_class_exec_is_missing() -> None:
    """The failure the option fixes: a plain SQLAlchemy session has no ``exec``."""
    db = Database("sqlite://")
    assert not hasattr(db.session.session_factory.class_, "exec")
    typed = Database("sqlite://", session_options={"class_": sqlmodel.Session})
    assert issubclass(typed.session.session_factory.class_, sqlmodel.Session)
    db.dispose()
    typed.dispose()
