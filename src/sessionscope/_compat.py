"""What sessionscope reads of SQLAlchemy that 2.0 does not offer: a transaction's connections.

SQLAlchemy 2.1.7 added ``SessionTransaction.connections``, which the ends of a unit read
(did it write, did a statement fail, which connections to roll back after a failed COMMIT).
``connections(transaction)`` answers with the connections a root transaction or savepoint
has acquired so far, also after it ended, and never acquires one. On 2.1.7 and later it is
that property's getter.

Before 2.1.7 (2.0, and 2.1.0 to 2.1.6) it reads what the property reads: the connections
SQLAlchemy keeps on the transaction that bounds a savepoint or subtransaction, in a private
attribute whose shape is the same across those releases. No public event can stand in for
it: a listener of 'after_begin' misses the connection when one of the app's, registered
first, raises there, and the transaction holds the connection all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from sqlalchemy import Connection
from sqlalchemy.orm import SessionTransaction

__all__ = ["connections"]

_Reader = Callable[[SessionTransaction], Collection[Connection]]

if hasattr(SessionTransaction, "connections"):  # SQLAlchemy 2.1.7 and later
    # The property's own getter: calling it costs what reading 'transaction.connections'
    # does, no call more. (2.0's type stubs have no such property.)
    connections: _Reader = SessionTransaction.connections.fget  # type: ignore[attr-defined,assignment,unused-ignore]

else:  # SQLAlchemy before 2.1.7

    def _held(transaction: SessionTransaction) -> Collection[Connection]:
        # What 2.1.7's property does: a subtransaction's connections are those of the
        # transaction or savepoint it belongs to. Each entry of '_connections' is
        # (connection, transaction, should commit, should close); the dict is kept after
        # the transaction ends.
        boundary = transaction
        while not boundary._is_transaction_boundary:
            parent = boundary._parent
            assert parent is not None
            boundary = parent
        return frozenset(entry[0] for entry in boundary._connections.values())

    connections = _held
