"""Placeholder until the WSGI middleware lands."""

from typing import Any

__all__ = ["WSGISessionMiddleware"]


class WSGISessionMiddleware:
    def __init__(self, app: Any, db: Any = None, **options: Any) -> None:
        raise NotImplementedError
