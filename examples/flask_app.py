"""A small Flask app on sessionscope: a session per request, committed by the response.

Run it with ``flask --app examples/flask_app.py run`` or ``python examples/flask_app.py``.
Without ``DATABASE_URL`` it stores items in ``sessionscope.sqlite3`` in the working
directory. Try it::

    curl -X POST -d name=apple http://127.0.0.1:5000/items     # 201, stored
    curl http://127.0.0.1:5000/items                           # ["apple"]
    curl -X POST -d name=pear http://127.0.0.1:5000/fail       # 500, nothing stored
    curl -X POST -d name=apple http://127.0.0.1:5000/items     # 409, duplicate: rolled back
    flask --app examples/flask_app.py count                    # a CLI command with a session
"""

from __future__ import annotations

import click
from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionscope import Database

db = Database()  # DATABASE_URL, else the embedded SQLite file


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "flask_example_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


def create_app() -> Flask:
    """The application factory."""
    app = Flask(__name__)
    db.init_app(app)
    with app.app_context():  # 'db.sync_engine' is the app's: its config may name its own
        Base.metadata.create_all(db.sync_engine)

    @app.get("/items")
    def list_items() -> ResponseReturnValue:
        return jsonify(list(db.session.scalars(select(Item.name).order_by(Item.id))))

    @app.post("/items")
    def create_item() -> ResponseReturnValue:
        name = request.form.get("name") or abort(400, "Give a 'name'.")
        if db.session.scalar(select(Item).where(Item.name == name)) is not None:
            # A 4xx rolls back: anything this request wrote so far is dropped.
            return {"error": f"{name!r} exists"}, 409
        db.session.add(Item(name=name))
        return {"created": name}, 201  # committed before the 201 leaves the process

    @app.post("/fail")
    def fail() -> ResponseReturnValue:
        db.session.add(Item(name=request.form.get("name", "doomed")))
        db.session.flush()
        raise RuntimeError("the view failed after writing: the write is rolled back")

    @app.cli.command("count")
    def count() -> None:
        """Print how many items are stored (the command's app context has a session)."""
        click.echo(db.session.scalar(select(func.count()).select_from(Item)))

    return app


app = create_app()

if __name__ == "__main__":
    app.run()
