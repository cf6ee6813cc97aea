"""What sessionscope reads of SQLAlchemy that 2.0 does not offer: a transaction's connections.

SQLAlchemy 2.1.7 added ``SessionTransaction.connections``, which the ends of a unit read
(did it write, did a statement fail, which connections to roll back after a failed COMMIT).
``connections(transaction)`` answers with the connections a root transaction or savepoint
has acquired so far, also after it ended, and never acquires one. On 2.1 it is that
property's getter. On 2.0, a listener of the session's public
``after_begin`` event keeps them instead: SQLAlchemy calls it for every connection a root
transaction or savepoint begins, right after the transaction starts holding it, and the
listener runs before any other (an app's, or sessionscope's own, may raise there).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["connections"]

_Reader = Callable[[SessionTransaction], Collection[Connection]]

if hasattr(SessionTransaction, "connections"):  # SQLAlchemy 2.1.7 and later
    # The property's own getter: calling it costs what reading 'transaction.connections'
    # does, no call more. (2.0's type stubs have no such property.)
    connections: _Reader = SessionTransaction.connections.fget  # type: ignore[attr-defined,assignment,unused-ignore]

else:  # SQLAlchemy 2.0
    _held: weakref.WeakKeyDictionary[SessionTransaction, list[Connection]]
    _held = weakref.WeakKeyDictionary()

    def _recorded(transaction: SessionTransaction) -> Collection[Connection]:
        return _held.get(transaction, ())

    connections = _recorded

    @event.listens_for(Session, "after_begin", insert=True)
    def _hold(session: Session, transaction: SessionTransaction, connection: Any) -> None:
        held = _held.get(transaction)
        if held is None:
            _held[transaction] = [connection]
        else:
            held.append(connection)
