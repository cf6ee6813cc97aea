"""One session's end: commit, roll back or close it, and never leave its connection dirty.

These functions never raise for a database's failure: a commit returns its error, a
rollback or close logs it and discards what it could not clean. They also guard the
sessions a unit hands out (``guard``): a close by hand inside the unit keeps its writes for
the unit to commit, and the session cannot open a connection once its unit has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import IllegalStateChangeError, InterfaceError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from . import _config, _exhaustion, _forks, _replicas, _streams, _tracking
from ._compat import connections
from ._retry import rerun_code
from ._unit import Cancel, Unit

__all__ = [
    "CANCELLED",
    "close_async_session",
    "close_session",
    "commit_session",
    "guard",
    "rollback_session",
]

logger = logging.getLogger("sessionscope")

# The unit of each session a unit handed out, while that unit is live (kept out of the
# session's own 'info', which is the app's), and the sessions whose unit has ended.
_units: weakref.WeakKeyDictionary[Session, Unit] = weakref.WeakKeyDictionary()
_ended: weakref.WeakSet[Session] = weakref.WeakSet()


class _Cancelled(Exception):
    """What ``commit_session`` returns when a cancellation arrived before COMMIT was sent."""


CANCELLED = _Cancelled("The request was cancelled before its COMMIT was sent; rolled back.")


def has_work(session: Session) -> bool:
    """Whether closing ``session`` now would discard writes (pending or sent)."""
    if session.new or session.dirty or session.deleted:
        return True
    root = session.get_transaction()
    return root is not None and _tracking.wrote(connections(root))


def can_wait(session: Session, unit: Unit) -> bool:
    """Whether ending ``session``'s transaction might wait (rule 16).

    It cannot wait only if it holds its connections already (no pool to wait for), has
    nothing to flush, every statement it ran was a SELECT that took no row lock (no lock,
    deferred constraint, busy SQLite file or synchronous standby makes the COMMIT or
    ROLLBACK of such a transaction wait), none of them failed (a driver may follow the
    ROLLBACK of a failed transaction with statements of its own: psycopg deallocates its
    prepared statements, which behind a transaction-pooling PgBouncer waits for a server
    connection), and nothing of the app's runs with it: no after-commit callback, and no
    session listener of the app's on the commit (an outbox listener may write, any may
    block).
    """
    if unit.callbacks or unit.ready:
        return True
    root = session.get_transaction()
    if root is None:
        return False
    held = connections(root)
    if not held or session.new or session.dirty or session.deleted:
        return True
    dispatch = session.dispatch
    for listeners in (
        dispatch.before_commit,
        dispatch.after_commit,
        dispatch.after_transaction_end,
    ):
        if any(fn not in _OURS for fn in listeners):
            return True
    return _tracking.wrote(held) or _tracking.failed(held)


# -- commit, rollback, close ----------------------------------------------------------------


def commit_session(session: Session, cancel: Cancel | None = None) -> BaseException | None:
    """Commit ``session``; on failure log once, clean the connection, and return the error.

    The flush (which may wait for the pool) runs first; a cancellation that arrived by then
    rolls back instead (``CANCELLED`` is returned). Whether COMMIT succeeded is known
    from a listener that SQLAlchemy calls only once every connection's COMMIT returned,
    before any of the app's: one of the app's raising after it (``after_commit``,
    ``after_transaction_end``) leaves the data stored and the response standing.
    """
    root = session.get_transaction()
    try:
        if session.new or session.dirty or session.deleted:
            session.flush()
    except Exception as exc:
        # The failed flush rolled the transaction back; the unit's close ends the session.
        _log_failed_commit(exc, _units.get(session))
        return exc
    if cancel is not None:
        if cancel.requested:
            logger.info("The request was cancelled before its COMMIT; rolling back")
            rollback_session(session)
            return CANCELLED
        cancel.committing = True
    unit = _units.get(session)
    commits = unit.commits if unit is not None else 0
    if unit is not None and unit.retries_left and _commits_many(root):
        # One COMMIT per connection, in no set order: a failed one may follow one that
        # succeeded, so the unit is not run again (nor is its failure spared the log).
        unit.no_retry = True
    try:
        session.commit()
    except Exception as exc:
        if unit is not None and unit.commits > commits:
            logger.error(
                "The COMMIT succeeded, but a listener raised afterwards; the data is stored"
                " and the response stands.",
                exc_info=True,
            )
            _reset(session)
            return None
        _log_failed_commit(exc, unit)
        _reset_failed_connections(root, discard=isinstance(exc, InterfaceError))
        return exc
    return None


def _log_failed_commit(error: BaseException, unit: Unit | None) -> None:
    if _exhaustion.is_pool_timeout(error):
        # Not a failure of the commit but a busy pool: the adapter answers 503 and says so.
        return
    if rerun_code(unit, error) is not None:
        return  # run again, and logged once as such (see _retry)
    if unit is not None and unit.logged_by_adapter:
        return  # answered by the app's 'on_commit_error': the adapter says how
    request = unit.request if unit is not None else None
    if request is not None:
        method, path, db = request
        logger.error(
            "Commit failed for %s %s on %s; the unit of work was rolled back.",
            method,
            path,
            db.url,
            exc_info=error,
        )
    else:
        logger.error("Commit failed; the unit of work was rolled back.", exc_info=error)


def log_request_failure(
    method: str, path: str, url: str, error: BaseException, answered: bool
) -> None:
    """Log a request's failed commit that its adapter left to the app's ``on_commit_error``
    (``Unit.logged_by_adapter``): one WARNING line when the app answered it (no traceback,
    SQL or values), else an ERROR with the traceback; both name the request and the
    database, as the commit's own ERROR line does (``Unit.request``)."""
    if answered:
        logger.warning(
            "Commit failed for %s %s on %s (%s); rolled back, and answered by 'on_commit_error'.",
            method,
            path,
            url,
            _config.brief(error),
        )
    else:
        logger.error(
            "Commit failed for %s %s on %s; the unit of work was rolled back.",
            method,
            path,
            url,
            exc_info=error,
        )


def _commits_many(root: SessionTransaction | None) -> bool:
    return root is not None and len(_replicas.committing(connections(root))) > 1


def _note_stored(session: Session, unit: Unit) -> None:
    # With read replicas: a write stored by the unit, or by a unit nested in it, sends the
    # request's client to the primary for a while (see _replicas).
    root = session.get_transaction()
    if root is None or not _tracking.wrote(connections(root)):
        return
    stored: Unit | None = unit
    while stored is not None:
        stored.stored = True
        stored = stored.parent


def rollback_session(session: Session) -> None:
    """Roll back ``session`` and keep it open; a failure is logged, ``close()`` ends it."""
    try:
        session.rollback()
    except Exception:
        logger.warning("Rollback failed; the session will be closed", exc_info=True)


def _reset(session: Session) -> None:
    # A transaction stuck in the committed state (its listener raised) is ended, so that the
    # session works again for the rest of the unit.
    try:
        session.reset()
    except Exception:
        logger.warning("Resetting the session after a raising listener failed", exc_info=True)


def close_session(session: Session) -> None:
    """Close ``session`` for good: an error is logged only, and a connection the failed
    close left checked out is discarded. From then on it opens no connection (``guard``).
    """
    root = session.get_transaction()
    _unguard(session)
    try:
        # A commit interrupted by a cancellation or another BaseException left its connection
        # in a transaction that close() would not roll back.
        _reset_failed_connections(root)
        session.close()
    except Exception:
        logger.warning("Closing the session failed", exc_info=True)
        _discard_connections(root)


# How long the close of an AsyncSession waits for another task still inside it (SQLAlchemy's
# default pool timeout: that task may be waiting for a connection).
CLOSE_WAIT = 30.0


async def close_async_session(session: AsyncSession) -> None:
    """Close ``session`` as ``close_session`` does, waiting for a task still inside it.

    Using one ``AsyncSession`` from several tasks at once is an error that SQLAlchemy reports
    to one of them; the others keep running, one may be checking out a connection, and
    ``close()`` refuses to run meanwhile. Giving up there would leave that connection to the
    garbage collector, so the close is retried until the other task is out.
    """
    deadline: float | None = None
    _unguard(session.sync_session)
    while True:
        root = session.sync_session.get_transaction()
        try:
            await session.run_sync(lambda _, root: _reset_failed_connections(root), root)
            await session.close()
        except IllegalStateChangeError:
            now = time.monotonic()
            if deadline is None:
                logger.warning(
                    "Another task is still using the session (one 'AsyncSession' was used"
                    " by several tasks at once); closing it once that task is out",
                    exc_info=True,
                )
                deadline = now + CLOSE_WAIT
            elif now > deadline:
                logger.error("Gave up closing a session another task kept using")
                return
            await asyncio.sleep(0.005)
        except Exception:
            logger.warning("Closing the session failed", exc_info=True)
            await session.run_sync(lambda _, root: _discard_connections(root), root)
            return
        else:
            return


def _reset_failed_connections(root: SessionTransaction | None, discard: bool = False) -> None:
    """Roll back, at the driver, connections whose COMMIT failed.

    SQLAlchemy marks the transaction inactive whether or not COMMIT succeeded, so it never
    rolls it back and the pool takes the connection back as it is; on SQLite a failed COMMIT
    leaves the transaction open, and the next unit to get that connection would run inside
    it. A connection that cannot be rolled back is invalidated instead, and so is every one
    when ``discard`` is true: the driver refused to send the COMMIT at all (an
    ``InterfaceError``, such as asyncpg's "another operation is in progress"), so what the
    connection holds is unknown, and a driver that forgot its transaction on the way (asyncpg
    again) would take a ROLLBACK for a no-op and leave the server inside the transaction.
    """
    if root is None:
        return
    for connection in connections(root):
        if connection.closed or connection.invalidated:
            continue
        transaction = connection.get_transaction()
        if transaction is None or transaction.is_active:
            # Nothing open, or an active transaction that close() will roll back itself.
            continue
        if discard:
            connection.invalidate()
            continue
        try:
            connection.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
        except Exception:
            logger.warning("Rolling back after a failed commit failed", exc_info=True)
            connection.invalidate()


def _discard_connections(root: SessionTransaction | None) -> None:
    """Invalidate the connections of ``root`` that a failed ``close()`` left checked out.

    ``close()`` detaches the transaction from the session before it rolls back and returns
    each connection; when a ROLLBACK fails with an error that is not a disconnect (the driver
    refusing it while another task's query runs on the connection, say), that connection is
    left checked out, owned by nothing but the garbage collector. Its state is unknown, so
    it is closed and the pool opens a fresh one in its place.
    """
    if root is None:
        return
    for connection in connections(root):
        if not connection.closed:
            connection.invalidate()
            connection.close()


# -- guarding the sessions a unit hands out ---------------------------------------------------


def guard(session: Session, unit: Unit) -> None:
    """Mark ``session`` as ``unit``'s: a close by hand cannot discard its writes (rule 20).

    ``close()`` is replaced on this one object: ``with db.session() as session:`` and
    ``db.session.close()`` inside the unit close it, and a close would silently throw away
    what the unit is about to commit. With writes (pending or sent) it leaves everything to
    the unit's end, which commits or rolls back by the unit's rules; without, it resets the
    session (its connection goes back to the pool), which stays usable for the unit.
    """
    _units[session] = unit

    def close() -> None:
        if has_work(session):
            logger.debug("A close by hand inside unit %s keeps its writes for the unit", unit.key)
            return
        session.reset()

    session.close = close  # type: ignore[method-assign]


def _unguard(session: Session) -> None:
    """The unit is ending: its own close goes through, and the session never reconnects."""
    _units.pop(session, None)
    _ended.add(session)
    session.__dict__.pop("close", None)
    session.get_bind = _refuse  # type: ignore[method-assign]


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(_ENDED)


_ENDED = (
    "This session belonged to a unit of work (a request or a 'db.begin()' block) that"
    " has ended; its work was committed or rolled back, and it cannot open a connection"
    " again. Work that outlives the request (a background task, a thread) must open"
    " its own unit: 'with db.begin() as session:' ('async with' for an async driver)."
)


# -- after-commit callbacks and aborted transactions, for every unit's session ---------------


@event.listens_for(Session, "before_commit")
def _refuse_aborted(session: Session) -> None:
    if session not in _units or session.in_nested_transaction():
        return
    root = session.get_transaction()
    if root is not None and _tracking.failed(connections(root)):
        raise RuntimeError(
            "A statement failed in this transaction and was not followed by a rollback, so"
            " it cannot commit: PostgreSQL would answer the COMMIT with a silent ROLLBACK,"
            " and a MariaDB deadlock has already rolled it back. Call 'session.rollback()'"
            " after catching a database error, or run the statement that may fail inside"
            " 'with session.begin_nested():' so that only it is rolled back."
        )


@event.listens_for(Session, "after_commit", insert=True)
def _committed(session: Session) -> None:
    # Every connection's COMMIT returned (SQLAlchemy calls this only then, and before the
    # app's own listeners): the unit's data is stored. The callbacks registered so far are
    # covered by it (the unit's commit, or one the app made itself): they run when the unit
    # next settles, whatever its status.
    unit = _units.get(session)
    if unit is None or session.in_nested_transaction():
        return
    unit.commits += 1
    outer = unit.parent
    while outer is not None:
        # Stored by a unit of its own: running the outer unit again would store it twice.
        outer.no_retry = True
        outer = outer.parent
    if unit.opened_in is not None:
        # A unit opened by a request's code, also after its own unit ended (a 'db.begin()'
        # in a dependency's cleanup, say): the request must not run again either.
        unit.opened_in.stored_inside = True
    if unit.routed:
        _note_stored(session, unit)
    if unit.callbacks is None:
        return
    if unit.ready is None:
        unit.ready = unit.callbacks
    else:
        unit.ready.extend(unit.callbacks)
    unit.callbacks = None


@event.listens_for(Session, "after_begin")
def _refuse_after_the_unit(session: Session, transaction: object, connection: Any) -> None:
    # A thread that was already past 'get_bind' (waiting for the pool, say) when the unit
    # ended gets its connection only now: give it back at once rather than leave it to
    # the garbage collector.
    if session in _ended:
        _give_back(session, connection)
        raise RuntimeError(_ENDED)
    unit = _units.get(session)
    if unit is None:
        return
    if unit.streaming:
        refusal = _streams.take(unit, connection.engine)
        if refusal is not None:
            _give_back(session, connection)
            raise RuntimeError(refusal)
    if _tracking.watch(connection.engine):
        # Another engine of the session's binds, met for the first time: its transaction
        # began before it was watched.
        connection.info[_tracking.KEY] = _tracking.Record()
        _forks.protect(connection.engine)


def _give_back(session: Session, connection: Any) -> None:
    # A connection the session was given (a test's shared one, see _isolation) is not the
    # session's to close: its transaction ends with the session's.
    if connection is not session.bind:
        connection.close()


_OURS = (_refuse_aborted, _committed)
