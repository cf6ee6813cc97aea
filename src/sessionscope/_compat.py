"""What sessionscope reads of SQLAlchemy that 2.0 does not offer: a transaction's connections.

SQLAlchemy 2.1.7 added ``SessionTransaction.connections``, which the ends of a unit read
(did it write, did a statement fail, which connections to roll back after a failed COMMIT).
On 2.1, ``connections`` reads that property. On 2.0, a listener of the session's public
``after_begin`` event keeps them instead: SQLAlchemy calls it for every connection a root
transaction or savepoint begins, right after the transaction starts holding it, and the
listener runs before any other (an app's, or sessionscope's own, may raise there).
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["connections"]

if hasattr(SessionTransaction, "connections"):  # SQLAlchemy 2.1.7 and later

    def connections(transaction: SessionTransaction) -> Collection[Connection]:
        """The connections ``transaction`` (a root transaction or a savepoint) has acquired
        so far, also after it ended; reading them never acquires one."""
        # Not in 2.0's type stubs, where this branch never runs.
        held: Collection[Connection] = transaction.connections  # type: ignore[attr-defined,unused-ignore]
        return held

else:  # SQLAlchemy 2.0
    _held: weakref.WeakKeyDictionary[SessionTransaction, list[Connection]]
    _held = weakref.WeakKeyDictionary()

    def connections(transaction: SessionTransaction) -> Collection[Connection]:
        """The connections ``transaction`` (a root transaction or a savepoint) has acquired
        so far, also after it ended; reading them never acquires one."""
        return _held.get(transaction, ())

    @event.listens_for(Session, "after_begin", insert=True)
    def _hold(session: Session, transaction: SessionTransaction, connection: Any) -> None:
        held = _held.get(transaction)
        if held is None:
            _held[transaction] = [connection]
        else:
            held.append(connection)
