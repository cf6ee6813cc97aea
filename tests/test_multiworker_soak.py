"""A bounded run of the multi-worker fault soak (``benchmarks.multiworker``).

gunicorn with 2 workers serves the fault app through a real PgBouncer in transaction pooling
mode, ``Database(url, pgbouncer=True)``: uvicorn workers with ``SessionMiddleware`` (sync and
async), and gthread workers with the Flask extension. 32 clients send the fault soak's mix
for 6 s (handled 409s, raising endpoints, clients that leave mid-request and, but for Flask,
mid-stream), a burst of slow requests exhausts both workers' pools, a PostgreSQL backend is
terminated every 3 s and PgBouncer restarts once. Every
request is then reconciled with the rows of its worker's ledger: no lost write, no phantom
write, every worker's pool and registry back to 0, no backend idle in a transaction, and
the server still answers fresh writes.

Without PostgreSQL on 127.0.0.1:5432, PgBouncer or gunicorn the test skips, except with
``CI=true``, where that fails it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from benchmarks.bouncer import pgbouncer_path
from benchmarks.database import PG_SERVER, Backend, backend
from benchmarks.multiworker import Soak, soak
from sqlalchemy.pool import NullPool

ADMIN_URL = f"postgresql+psycopg://{PG_SERVER}/postgres"


def _missing() -> str | None:
    if pgbouncer_path() is None:
        return "pgbouncer is not installed (Debian: 'apt-get install pgbouncer')"
    for module in ("gunicorn", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    engine = sa.create_engine(ADMIN_URL, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as error:
        return f"PostgreSQL is unreachable at {PG_SERVER}: {str(error).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Backend]:
    """A PostgreSQL database of this test's own, seeded, dropped at the end."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    chosen = backend("postgresql", tmp_path, f"sessionscope_mwsoak_{os.getpid()}")
    chosen.prepare()
    try:
        yield chosen
    finally:
        admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{chosen.database}" WITH (FORCE)'))
        admin.dispose()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("app", "mode"),
    [("asgi", "sync"), ("asgi", "async"), ("flask", "sync")],
    ids=["asgi-sync", "asgi-async", "flask-gthread"],
)
def test_two_workers_through_a_restarted_pgbouncer(
    database: Backend, tmp_path: Path, app: str, mode: str
) -> None:
    config = Soak(
        workers=2,
        connections=32,
        seconds=6.0,
        mode=mode,
        app=app,
        burst_at=1.5,
        burst_per_worker=24,
        restart_at=3.5,
        port=_free_port(),
    )
    result = soak(config, database, tmp_path / "soak")
    shown = {key: result.get(key) for key in ("problems", "kinds", "restart", "log_tail")}
    assert result["problems"] == [], shown
    assert result["lost"] == [], shown
    assert result["phantom"] == [], shown
    assert result["after_drain"], shown
    assert not any(result["after_drain"].values()), shown
    assert result["idle_in_tx"] == 0, shown
    assert len(result["workers_ended"]) == 2, shown
    assert "how" in result["restart"], shown
    assert any("pid" in kill for kill in result["kills"]), shown
    assert set(result["probes"]["statuses"]) == {201}, shown
    assert result["acked"] > 0, shown
    assert result["kinds"].get("conflict 409"), shown
