"""A ``Source``: where a unit's sessions connect, an engine and its session factory.

A ``Database`` has its engine of its own. An adapter may give the units it opens another
source (``db.init_app`` gives each Flask app whose config names a database one), so that one
``Database`` serves several apps (an app per test, say) with their own settings. The engine
is created on first use: registering an app, or listening on ``db.session``, connects to
nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from . import _config

__all__ = ["Source"]


class Source:
    """A sync engine built on first use from ``url`` and its options, and its sessions.

    Sessions are instances of a subclass of ``session_class``, so that listeners registered
    on the database's session class (``event.listen(db.session, ...)``) apply to them.
    """

    __slots__ = (
        "__weakref__",
        "_engine",
        "_factory",
        "_lock",
        "_prepare",
        "engine_options",
        "session_class",
        "session_options",
        "url",
    )

    def __init__(
        self,
        url: str | URL,
        engine_options: Mapping[str, Any],
        session_options: Mapping[str, Any],
        session_class: type[Session],
        prepare: Callable[[Engine], None],
    ) -> None:
        self.url = url
        self.engine_options = dict(engine_options)
        self.session_options = dict(session_options)
        self.session_class = session_class
        self._engine: Engine | None = None
        self._factory: sessionmaker[Session] | None = None
        self._lock = threading.Lock()
        # What the Database does to every engine it uses (tracking, forks, the pool).
        self._prepare = prepare

    @property
    def built_engine(self) -> Engine | None:
        """The engine if it was created, else None (reading this creates nothing)."""
        return self._engine

    @property
    def engine(self) -> Engine:
        """The engine; created on first use."""
        return self.factory().kw["bind"]  # type: ignore[no-any-return]

    def factory(self) -> sessionmaker[Session]:
        """The session factory, with the engine created on first use."""
        factory = self._factory
        if factory is not None:
            return factory
        with self._lock:
            if self._factory is None:
                embedded = _config.is_embedded(self.url)
                engine = _config.make_engine(self.url, self.engine_options, embedded=embedded)
                assert isinstance(engine, Engine)  # 'add_source' refuses async URLs
                self._prepare(engine)
                # A class of the app's own (SQLModel's Session, say) wins over ours.
                options = {"class_": self.session_class, **self.session_options}
                made = _config.make_session_factory(engine, options)
                assert isinstance(made, sessionmaker)
                self._engine, self._factory = engine, made
            return self._factory

    def dispose(self) -> None:
        """Close the engine's pooled connections, if the engine was created."""
        engine = self._engine
        if engine is not None:
            engine.dispose()

    def __repr__(self) -> str:
        return f"<Source {_config.safe_url(self.url)}>"
