"""A Flask-SQLAlchemy app after docs/migrating-from-flask-sqlalchemy.md, with a user's test suite.

The app below is the guide's code: one module-level ``Database()``, an app factory reading
``SQLALCHEMY_DATABASE_URI`` from the test config, no explicit commits in the views, a
``flask init-db`` command. The tests are written as the app's own suite would be: an app
and an SQLite file per test, the test client and the CLI runner.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import click
import pytest
import sqlalchemy as sa
from flask import Flask, Response, abort, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import ForeignKey, Select, String, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.pool import QueuePool

from sessionscope import Database

T = TypeVar("T")
PER_PAGE = 3

db: Database[Session] = Database()  # each app's database comes from its config


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "user"  # the name Flask-SQLAlchemy generated for 'User'

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    posts: Mapped[list[Post]] = relationship(
        back_populates="author", cascade="all, delete-orphan", order_by="Post.id"
    )


class Post(Base):
    __tablename__ = "post"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("user.id"))
    title: Mapped[str] = mapped_column(String(200))
    views: Mapped[int] = mapped_column(default=0)
    author: Mapped[User] = relationship(back_populates="posts")


@dataclass
class Page(Generic[T]):
    items: list[T]
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))


def paginate(stmt: Select[Any], page: int, per_page: int = 20) -> Page[Any]:
    """``db.paginate()``: 404 for a page before the first or after the last."""
    # 'Select[Any]', not the guide's 'Select[T]': SQLAlchemy 2.0 types a select by a tuple
    # of its columns and 2.1 by the columns themselves, and the suite type-checks on both.
    if page < 1:
        abort(404)
    count = select(func.count()).select_from(stmt.order_by(None).subquery())
    total = db.session.scalar(count) or 0
    items = list(db.session.scalars(stmt.limit(per_page).offset((page - 1) * per_page)))
    if not items and page != 1:
        abort(404)
    return Page(items, page, per_page, total)


def commit_error(exc: BaseException) -> Response:
    """What the client gets when the request's commit fails."""
    if isinstance(exc, IntegrityError):
        return Response('{"error": "already exists"}', 409, mimetype="application/json")
    return Response("Internal Server Error", 500)


def init_db() -> None:
    Base.metadata.drop_all(db.sync_engine)  # this app's engine, inside its app context
    Base.metadata.create_all(db.sync_engine)
    with db.begin() as session:
        session.add(User(username="admin"))


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(SQLALCHEMY_DATABASE_URI="sqlite:///blog.sqlite3")
    if test_config is not None:
        app.config.from_mapping(test_config)
    db.init_app(app, on_commit_error=commit_error)

    @app.post("/users")
    def register() -> ResponseReturnValue:
        username = request.json["username"]
        user = User(username=username)
        user.posts.append(Post(title=f"Hello from {username}"))
        db.session.add(user)
        return {"username": username}, 201  # a duplicate fails at commit: 409

    @app.get("/users/<username>")
    def show_user(username: str) -> ResponseReturnValue:
        stmt = select(User).where(User.username == username)
        user = db.session.scalars(stmt).one_or_none() or abort(404)
        return {"username": user.username, "posts": [post.title for post in user.posts]}

    @app.patch("/users/<username>")
    def rename(username: str) -> ResponseReturnValue:
        stmt = select(User).where(User.username == username)
        user = db.session.scalars(stmt).one_or_none() or abort(404)
        user.username = request.json["username"]
        try:
            db.session.flush()  # the error raises here, in the view
        except IntegrityError:
            db.session.rollback()
            return {"error": "username taken"}, 409
        return {"username": user.username}

    @app.post("/posts")
    def create_post() -> ResponseReturnValue:
        data = request.json
        stmt = select(User).where(User.username == data["author"])
        author = db.session.scalars(stmt).first() or abort(404)
        post = Post(title=data["title"], author=author)
        db.session.add(post)
        db.session.flush()  # to know the id; the request's commit stores it
        return {"id": post.id}, 201

    @app.get("/posts")
    def list_posts() -> ResponseReturnValue:
        page = paginate(
            select(Post).order_by(Post.id), request.args.get("page", 1, type=int), PER_PAGE
        )
        items = [post.title for post in page.items]
        return {"items": items, "page": page.page, "pages": page.pages, "total": page.total}

    @app.get("/posts/<int:post_id>")
    def show_post(post_id: int) -> ResponseReturnValue:
        post = db.session.get(Post, post_id) or abort(404)
        response = jsonify(title=post.title, author=post.author.username, views=post.views)
        response.call_on_close(lambda: count_view(app, post_id))
        return response

    @app.delete("/posts/<int:post_id>")
    def delete_post(post_id: int) -> ResponseReturnValue:
        db.session.delete(db.session.get(Post, post_id) or abort(404))
        return "", 204

    @app.cli.command("init-db")
    def init_db_command() -> None:
        """Drop and create the tables, then add the first user."""
        init_db()
        click.echo("Initialized the database.")

    return app


def count_view(app: Flask, post_id: int) -> None:
    """Runs after the response: the request's session is gone, so it opens a unit of its own."""
    with app.app_context(), db.begin() as session:
        session.execute(update(Post).where(Post.id == post_id).values(views=Post.views + 1))


# -- the app's test suite ---------------------------------------------------------------------

MakeApp = Callable[[str], Flask]


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[MakeApp]:
    """Apps on SQLite files of their own, initialised with 'flask init-db'; checked after."""
    apps: list[Flask] = []

    def make(name: str) -> Flask:
        uri = f"sqlite:///{tmp_path / name}.sqlite3"
        app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": uri})
        apps.append(app)
        result = app.test_cli_runner().invoke(args=["init-db"])
        assert result.exit_code == 0, result.output
        return app

    try:
        yield make
        for app in apps:
            with app.app_context():
                pool = db.sync_engine.pool
                assert isinstance(pool, QueuePool)
                assert pool.checkedout() == 0, "a connection was not returned"
        assert (db.live_units, db.live_sessions) == (0, 0)
    finally:
        db.dispose()


@pytest.fixture
def app(make_app: MakeApp) -> Flask:
    return make_app("blog")


def stored(app: Flask, sql: str) -> list[Any]:
    """The rows ``sql`` reads from the app's database, on a connection of its own."""
    engine = sa.create_engine(app.config["SQLALCHEMY_DATABASE_URI"], poolclass=sa.NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql))]
    finally:
        engine.dispose()


def add_posts(app: Flask, count: int) -> None:
    client = app.test_client()
    for n in range(count):
        response = client.post("/posts", json={"author": "admin", "title": f"post {n}"})
        assert response.status_code == 201


def test_register_then_read_back(app: Flask) -> None:
    """A view with no commit of its own stores its rows: the request commits them."""
    client = app.test_client()
    response = client.post("/users", json={"username": "ada"})
    assert (response.status_code, response.json) == (201, {"username": "ada"})
    response = client.get("/users/ada")
    assert response.json == {"username": "ada", "posts": ["Hello from ada"]}
    assert stored(app, "SELECT username FROM user ORDER BY id") == [("admin",), ("ada",)]


def test_duplicate_username_is_409_with_nothing_half_stored(app: Flask) -> None:
    """'on_commit_error' turns the failed commit into a 409, and the whole request is undone."""
    client = app.test_client()
    assert client.post("/users", json={"username": "ada"}).status_code == 201
    before = stored(app, "SELECT * FROM user"), stored(app, "SELECT * FROM post")
    response = client.post("/users", json={"username": "ada"})
    assert (response.status_code, response.json) == (409, {"error": "already exists"})
    assert (stored(app, "SELECT * FROM user"), stored(app, "SELECT * FROM post")) == before
    assert client.post("/users", json={"username": "bob"}).status_code == 201


def test_rename_to_a_taken_name_is_409_from_the_view(app: Flask) -> None:
    """A flush inside the view catches the IntegrityError there; the 409 rolls back."""
    client = app.test_client()
    assert client.post("/users", json={"username": "ada"}).status_code == 201
    response = client.patch("/users/ada", json={"username": "admin"})
    assert (response.status_code, response.json) == (409, {"error": "username taken"})
    response = client.patch("/users/ada", json={"username": "lovelace"})
    assert (response.status_code, response.json) == (200, {"username": "lovelace"})
    assert stored(app, "SELECT username FROM user ORDER BY id") == [("admin",), ("lovelace",)]


def test_posts_are_listed_a_page_at_a_time(app: Flask) -> None:
    """The hand-written paginate gives Flask-SQLAlchemy's pages, and 404 outside them."""
    add_posts(app, 7)
    client = app.test_client()
    first = client.get("/posts").json
    assert first == {"items": ["post 0", "post 1", "post 2"], "page": 1, "pages": 3, "total": 7}
    assert client.get("/posts?page=2").json["items"] == ["post 3", "post 4", "post 5"]  # type: ignore[index]
    assert client.get("/posts?page=3").json["items"] == ["post 6"]  # type: ignore[index]
    assert client.get("/posts?page=4").status_code == 404
    assert client.get("/posts?page=0").status_code == 404


def test_missing_rows_are_404_and_store_nothing(app: Flask) -> None:
    """get_or_404, first_or_404 and one_or_404 rewritten with 'or abort(404)'."""
    client = app.test_client()
    assert client.get("/posts/99").status_code == 404
    assert client.delete("/posts/99").status_code == 404
    assert client.get("/users/nobody").status_code == 404
    response = client.post("/posts", json={"author": "nobody", "title": "lost"})
    assert response.status_code == 404
    assert stored(app, "SELECT * FROM post") == []


def test_delete_post(app: Flask) -> None:
    """A delete in the view is committed by the 204."""
    add_posts(app, 2)
    client = app.test_client()
    assert client.delete("/posts/1").status_code == 204
    assert client.get("/posts/1").status_code == 404
    assert stored(app, "SELECT title FROM post") == [("post 1",)]


def test_work_after_the_response_opens_its_own_unit(app: Flask) -> None:
    """'call_on_close' work stores its update through 'app.app_context()' and 'db.begin()'."""
    add_posts(app, 1)
    client = app.test_client()
    for views in range(3):
        with client.get("/posts/1") as response:
            assert response.json == {"title": "post 0", "author": "admin", "views": views}
    assert stored(app, "SELECT views FROM post") == [(3,)]


def test_init_db_command_resets_the_database(app: Flask) -> None:
    """'flask init-db' drops, creates and seeds in its app context; the seed is committed."""
    add_posts(app, 2)
    assert app.test_client().post("/users", json={"username": "ada"}).status_code == 201
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert (result.exit_code, result.output) == (0, "Initialized the database.\n")
    assert stored(app, "SELECT username FROM user") == [("admin",)]
    assert stored(app, "SELECT * FROM post") == []


def test_app_context_commits_only_what_you_commit(app: Flask) -> None:
    """Outside a request nothing is committed for you: 'db.begin()' or 'commit()' is."""
    with app.app_context():
        db.session.add(User(username="forgotten"))
    with app.app_context(), db.begin() as session:
        session.add(User(username="begun"))
    with app.app_context():
        db.session.add(User(username="committed"))
        db.session.commit()
    users = stored(app, "SELECT username FROM user ORDER BY id")
    assert users == [("admin",), ("begun",), ("committed",)]


def test_two_apps_in_one_session_keep_their_own_rows(make_app: MakeApp) -> None:
    """One module-level 'db' serves an app per test; each sees only its own file."""
    one, two = make_app("one"), make_app("two")
    assert one.test_client().post("/users", json={"username": "ada"}).status_code == 201
    assert two.test_client().post("/users", json={"username": "bob"}).status_code == 201
    assert one.test_client().get("/users/bob").status_code == 404
    assert two.test_client().get("/users/ada").status_code == 404
    with one.app_context():
        assert db.session.scalars(select(User.username)).all() == ["admin", "ada"]
    with two.app_context():
        assert db.session.scalars(select(User.username)).all() == ["admin", "bob"]
    assert stored(one, "SELECT username FROM user") == [("admin",), ("ada",)]


def test_db_begin_outside_an_app_context_leaves_nothing_open(tmp_path: Path) -> None:
    """Work after the response that forgets 'app.app_context()' is told so, and the refused
    block leaves no unit behind to capture the next app context."""
    other: Database[Session] = Database()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    other.init_app(app)

    def forget_the_app_context() -> None:
        with pytest.raises(RuntimeError, match="app_context"), other.begin():
            pass  # pragma: no cover - never entered
        assert other.live_units == 0
        with app.app_context():
            assert other.sync_engine.url.database == str(tmp_path / "other.sqlite3")

    try:
        # A context of its own, so that a unit left bound cannot reach the tests after.
        contextvars.copy_context().run(forget_the_app_context)
    finally:
        other.dispose()
