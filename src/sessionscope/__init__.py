"""Request-scoped SQLAlchemy sessions for ASGI and WSGI apps.

A session per request, committed if the response succeeds, rolled back if not, and never a
leaked connection. Importing this package loads no web framework.
"""

from ._core import Database
from .middleware.asgi import SessionMiddleware
from .middleware.wsgi import WSGISessionMiddleware

__all__ = ["Database", "SessionMiddleware", "WSGISessionMiddleware", "db"]

db: Database = Database()
"""The default database: ``DATABASE_URL``, else ``sessionscope.sqlite3`` in the working
directory. ``SessionMiddleware`` and ``WSGISessionMiddleware`` use it when given no ``db``."""
