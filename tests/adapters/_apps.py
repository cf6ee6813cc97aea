"""Flask apps the adapter tests share."""

from __future__ import annotations

from typing import Any

from flask import Flask

from sessionscope import Database

from .._models import Item


def items_app(db: Database[Any], **options: Any) -> Flask:
    """A Flask app with ``db`` registered; POST /<name> stores an item and answers 201."""
    app = Flask(__name__)
    db.init_app(app, **options)

    @app.post("/<name>")
    def create(name: str) -> tuple[str, int]:
        db.session.add(Item(name=name))
        return name, 201

    return app
