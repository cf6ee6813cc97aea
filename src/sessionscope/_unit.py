"""Units of work: the key a session is registered under, and what code inside one sees."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ._core import Database
    from ._source import Source

__all__ = ["SAFE_METHODS", "Binding", "Cancel", "Unit", "default_commit_on"]

# Tokens are never reused: a key left behind by a failed cleanup can never be handed to a
# later unit, unlike id() of a request, task or thread.
_tokens = itertools.count(1)


class Unit:
    """One unit of work: a request, a background job, a ``db.begin()`` block.

    The unit's ``key`` is what the session registry is keyed by. A unit holds no session and
    no connection until the code running inside it touches ``db.session``.
    """

    __slots__ = (
        "attempt",
        "callbacks",
        "closed",
        "commits",
        "exhausted",
        "holds",
        "key",
        "logged_by_adapter",
        "no_retry",
        "opened_in",
        "parent",
        "reads_replica",
        "ready",
        "replica",
        "request",
        "retries_left",
        "rollback_only",
        "routed",
        "source",
        "stored",
        "streaming",
        "writes",
    )

    def __init__(
        self,
        streaming: bool = False,
        source: Source | None = None,
        parent: Unit | None = None,
        writes: bool = False,
    ) -> None:
        self.key = next(_tokens)
        # Expected to write: a request whose method is not a safe one (see _sqlite).
        self.writes = writes
        # The unit this one was opened in (a 'db.begin()' block inside a request), if any,
        # and the binding of the code that opened it (see Binding.stored_inside).
        self.parent = parent
        self.opened_in: Binding | None = None
        # Where the unit's session connects: None for the database's own engine.
        self.source = source
        self.rollback_only = False
        self.closed = False
        # The response has started under ASGI: what the unit does now is stream work, and
        # the engines whose connection a sync body holds are counted (see _streams).
        self.streaming = streaming
        self.holds: list[Engine] | None = None
        # Commits of the unit's session the database acknowledged (counted by a listener).
        self.commits = 0
        # A checkout from the pool timed out in the unit (see _exhaustion), even if the app
        # caught the error: its 5xx is the server being busy.
        self.exhausted = False
        # Set while an adapter settles the unit at the response start with the app's
        # 'on_commit_error': a failed commit is then logged by the adapter, which knows how
        # the app answered it.
        self.logged_by_adapter = False
        # The request whose response started with this unit (method, path, database): a
        # failed commit of it, at the start or at the end of its stream, names them.
        self.request: tuple[str, str, Database[Any]] | None = None
        # Which run of its work this is (1: the first), whether runs remain should it lose a
        # race (see _retry), and whether it must not be run again (it or a unit nested in it
        # committed, or the app said so: 'db.no_retry()').
        self.attempt = 1
        self.retries_left = False
        self.no_retry = False
        # Read replicas (see _replicas): whether the unit starts on one (a request with a
        # safe method, or 'db.use_replica()'), the one its reads go to until it writes
        # (None: the primary), whether its sessions are routed (its database has
        # replicas), and whether a commit of it, or of a unit nested in it, stored a write
        # (its client then reads from the primary for a while).
        self.reads_replica = False
        self.replica: Engine | None = None
        self.routed = False
        self.stored = False
        # After-commit callbacks: those waiting for a commit, and those whose commit
        # succeeded (ours, or one the app made itself), to run when the unit settles.
        self.callbacks: list[Callable[[], object]] | None = None
        self.ready: list[Callable[[], object]] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Unit {self.key} {state}>"


class Binding:
    """What a ``ContextVar`` holds for the code running inside a unit.

    It is a mutable holder, created before the app runs, so that every child context
    (worker threads, tasks, inner middleware) sees the same object, and an adapter can swap
    the unit it points to (work after the response gets a fresh unit) or clear it (the
    request is over) without setting the ``ContextVar`` again in a context it does not own.
    """

    __slots__ = (
        "attempt",
        "owner",
        "reads_replica",
        "renewable",
        "retries_left",
        "source",
        "stored_inside",
        "streaming",
        "unit",
        "writes",
    )

    def __init__(
        self,
        unit: Unit | None,
        owner: object,
        renewable: bool = False,
        source: Source | None = None,
        writes: bool = False,
    ) -> None:
        self.unit = unit
        self.owner = owner
        # Where a unit opened through this binding connects (see Unit.source).
        self.source = source
        # Whether a unit opened through this binding is expected to write (Unit.writes).
        self.writes = writes
        # Set by the ASGI middleware while the response streams: a unit opened now does
        # stream work.
        self.streaming = False
        # When true and ``unit`` is None, the next use of ``db.session`` opens a fresh unit
        # (the request's own, or work after the response); nothing is created for requests
        # that never need one.
        self.renewable = renewable
        # For a unit opened through this binding (Unit.attempt, Unit.retries_left): a
        # middleware that runs a request again sets them per attempt.
        self.attempt = 1
        self.retries_left = False
        # A unit the running code opened ('db.begin()') committed, also after this binding's
        # own unit ended: the request stored something, and must not run again.
        self.stored_inside = False
        # Whether a unit opened through this binding starts on a read replica (a request
        # with a safe method whose client did not just write: see _replicas).
        self.reads_replica = False

    def stop_retries(self) -> None:
        """The work running through this binding can no longer be run again (its body is
        not kept, its client left, its response started): neither can its unit."""
        self.retries_left = False
        unit = self.unit
        if unit is not None:
            unit.retries_left = False

    def handling_request(self) -> bool:
        """Whether a middleware (ASGI or WSGI) is handling a request or socket through this.

        Another middleware of the same database meeting it is installed twice. Adapters
        that open requests mark themselves with ``opens_requests``; the ASGI request
        binding answers for itself (its unit opens on first use).
        """
        unit = self.unit
        live = self.renewable if unit is None else not unit.closed
        return live and getattr(self.owner, "opens_requests", False)


class Cancel:
    """A request's cancellation, as seen by the work that ends its unit.

    ``requested`` is set when the request is cancelled while its unit ends; the commit reads
    it just before it sends COMMIT and rolls back instead. ``committing`` is set once COMMIT
    is on its way: from then on the outcome is awaited, never interrupted.
    """

    __slots__ = ("_event", "committing")

    def __init__(self) -> None:
        self._event = threading.Event()  # read from the worker thread of a sync commit
        self.committing = False

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()


# RFC 9110's safe methods: a request with another one is expected to write.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def default_commit_on(status: int) -> bool:
    """The default commit predicate: commit below 400, roll back from 400."""
    return status < 400
