"""The memory soak: resident memory of one server across a long mixed load.

Each server gets a warm-up of 5,000 mixed requests, then its RSS is read from ``/proc``,
then at least ``--soak-requests`` more (40% reads, 40% inserts, 15% noop, 5% failing
writes), then the correctness checks run and RSS is read again. Target: < 5 MB growth
across 100,000 requests for sessionscope. The soak covers the ASGI variants only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import checks, load, servers
from .database import Backend
from .variants import VARIANTS

__all__ = ["run_soak"]

HERE = Path(__file__).resolve().parent
# sessionscope first: an interrupted soak still has the figures the target is about.
SOAK_VARIANTS = ["sessionscope-sync", "sessionscope-async", "baseline-sync", "baseline-async"]


def _mixed(port: int, requests: int, core: int) -> tuple[dict[str, Any], int]:
    """At least ``requests`` mixed requests in 10 s wrk runs (wrk can only stop on time)."""
    total: dict[str, Any] = {"requests": 0, "acked": []}
    chunks = 0
    while total["requests"] < requests:
        wrk = load.run_wrk(port, "mix", 32, 10, core=core)
        total["requests"] += wrk["requests"]
        total["acked"] += wrk["acked"]
        chunks += 1
    return total, chunks


def run_soak(
    requests: int,
    chosen: Backend,
    port: int,
    server_core: int,
    load_core: int,
    results: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Soak sessionscope and the baseline, sync and async, on ``chosen``; one result each.

    Results are appended to ``results`` as they come, so that a caller keeps what was
    measured if the soak is interrupted.
    """
    results = [] if results is None else results
    names = SOAK_VARIANTS
    engine = chosen.engine()
    for i, name in enumerate(names):
        variant = VARIANTS[name]
        print(
            f"[soak {i + 1}/{len(names)}] {chosen.name} {name}: {requests:,} mixed requests",
            flush=True,
        )
        server = servers.start(
            variant,
            chosen.url(variant.mode),
            port + i,
            sys.executable,
            server_core,
            HERE / "results" / "tmp" / "logs",
        )
        try:
            if not servers.wait_ready(server, 60.0):
                results.append({"variant": name, "error": server.error})
                continue
            _mixed(server.port, 5000, load_core)
            checks.wait_drained(server.port, 10.0)
            chosen.reset(engine)
            before = server.rss_bytes()
            wrk, chunks = _mixed(server.port, requests, load_core)
            check = checks.check_run(server, chosen, engine, "mix", wrk, 32 * chunks, 10.0)
            after = server.rss_bytes()
            results.append(
                {
                    "variant": name,
                    "backend": chosen.name,
                    "requests": wrk["requests"],
                    "rss_before_mb": before / 2**20,
                    "rss_after_mb": after / 2**20,
                    "growth_mb": (after - before) / 2**20,
                    "problems": check["problems"],
                }
            )
            print(f"  RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MB", flush=True)
        finally:
            servers.stop(server)
    engine.dispose()
    return results
