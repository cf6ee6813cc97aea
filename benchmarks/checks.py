"""Correctness under load, checked after every run.

After wrk stops, the server finishes what was in flight; then every pool must be back to
0 connections checked out (and, where the variant has them, 0 live sessions and units), no
PostgreSQL backend may be ``idle in transaction``, every id that ``POST /items`` acknowledged
with a 2xx must be in the table (no lost writes), the table may hold at most one
unacknowledged row per connection (requests in flight when wrk stopped), and a burst of
``GET /fail`` must answer 500 and leave no row behind.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine

from .database import Backend
from .servers import ServerProcess, get_json, get_status

__all__ = ["check_run", "wait_drained"]

FAIL_PROBES = 8


def wait_drained(port: int, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll ``GET /_stats`` until every figure is 0; return the last figures and the wait."""
    started = time.monotonic()
    stats: dict[str, Any] = {}
    while True:
        try:
            stats = get_json(port, "/_stats", timeout=max(1.0, timeout))
        except (OSError, ValueError) as error:
            stats = {"error": repr(error)}
        waited = time.monotonic() - started
        busy = "error" in stats or any(value for value in stats.values())
        if not busy or waited >= timeout:
            return stats, waited
        time.sleep(0.05)


def check_run(
    server: ServerProcess,
    backend: Backend,
    engine: Engine,
    workload: str,
    wrk: dict[str, Any],
    connections: int,
    drain_timeout: float,
) -> dict[str, Any]:
    """Check one finished run; ``problems`` lists whatever is wrong (empty when clean)."""
    problems: list[str] = []
    stats, waited = wait_drained(server.port, drain_timeout)
    if "error" in stats:
        problems.append(f"GET /_stats failed after the run: {stats['error']}")
    else:
        problems += [f"{key}={value} after {waited:.1f} s" for key, value in stats.items() if value]
    # Only this server's connections: a wedged variant stopped late must not be counted here.
    idle = backend.idle_in_transaction(engine, server.tcp_ports() if server.alive() else None)
    if idle:
        problems.append(f"{idle} PostgreSQL backend(s) of this server idle in transaction")
    result: dict[str, Any] = {"stats": stats, "drain_s": round(waited, 3), "idle_in_tx": idle}
    if workload in ("write", "mix"):
        written = backend.written_ids(engine)
        acked = set(wrk.get("acked", []))
        lost = len(acked - written)
        unacked = len(written - acked)
        result.update(written=len(written), acked=len(acked), lost=lost, unacked=unacked)
        if lost:
            problems.append(f"{lost} acknowledged POST /items rows missing (lost writes)")
        if unacked > connections:
            problems.append(
                f"{unacked} rows written without a 2xx (more than the"
                f" {connections} requests that can be in flight at the stop)"
            )
    if server.alive():
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: _fail_status(server.port), range(FAIL_PROBES)))
        result["fail_statuses"] = sorted(set(statuses))
        if any(status != 500 for status in statuses):
            problems.append(f"GET /fail answered {sorted(set(statuses))}, expected 500")
        stats, waited = wait_drained(server.port, drain_timeout)
        if any(value for value in stats.values()):
            problems.append(f"after GET /fail: {stats}")
    else:
        problems.append(f"server died: exit code {server.process.returncode}")
    fail_rows = backend.fail_rows(engine)
    if fail_rows:
        problems.append(f"{fail_rows} GET /fail row(s) committed")
    # A pool that never drained is a server that wedged or leaked: the harness stops it.
    result["wedged"] = "error" in stats or bool(stats.get("checkedout"))
    error = reset_table(backend, engine)
    if error is not None:
        problems.append(f"could not clean the table after the run: {error}")
    result["problems"] = problems
    return result


def reset_table(backend: Backend, engine: Engine) -> str | None:
    """Delete what the run wrote; say why not (a lock another server holds) instead of raising."""
    try:
        backend.reset(engine)
    except Exception as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def _fail_status(port: int) -> int:
    try:
        return get_status(port, "/fail")
    except OSError:
        return -1
