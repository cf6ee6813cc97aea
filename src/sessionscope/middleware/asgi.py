"""Placeholder."""

from typing import Any

__all__ = ["SessionMiddleware"]


class SessionMiddleware:
    def __init__(self, app: Any, db: Any = None, **options: Any) -> None:
        raise NotImplementedError
