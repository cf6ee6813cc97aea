"""Request-scoped SQLAlchemy sessions for ASGI and WSGI apps.

A session per request, committed if the response succeeds, rolled back if not, and never a
leaked connection. Importing this package loads no web framework.
"""

from sqlalchemy.orm import Session

from ._core import Database
from .middleware.asgi import SessionMiddleware
from .middleware.wsgi import WSGISessionMiddleware

__all__ = ["Database", "SessionMiddleware", "WSGISessionMiddleware", "db"]

db: Database[Session] = Database()
"""The default database: ``DATABASE_URL``, else ``sessionscope.sqlite3`` in the working
directory. ``SessionMiddleware`` and ``WSGISessionMiddleware`` use it when given no ``db``.

It is typed for a sync driver (``db.session`` is a ``scoped_session[Session]``), as the
embedded default is. With an async driver in ``DATABASE_URL`` it hands out ``AsyncSession``
objects; declare your own to have them typed: ``db: Database[AsyncSession] = Database()``."""
