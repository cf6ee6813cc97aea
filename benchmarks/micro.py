"""In-process micro-benchmark: microseconds a middleware adds per request, without a network.

Each app is called in a loop with a hand-made ASGI scope, ``receive`` and ``send``, one
request at a time on one event loop (uvloop, as under the servers). Variants are timed in
interleaved batches (A B C, B C A, ...), and each figure is the median over the rounds; the
added cost is the median of the per-round differences with the baseline, so that drift of
the machine cancels out. It times the ASGI side only (the WSGI variants are measured under
gunicorn by the load benchmark). Run alone with ``python -m benchmarks.micro [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from .variants import VARIANTS

__all__ = ["run_micro"]

MICRO_VARIANTS = ("baseline", "empty-mw", "sessionscope")
CASES = {"noop": ("GET", "/noop"), "read": ("GET", "/items/{}")}


def _scope(method: str, path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _call(app: Any, method: str, path: str) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(method, path), receive, send)
    return status


async def _batch(app: Any, case: str, count: int, offset: int) -> float:
    method, template = CASES[case]
    started = time.perf_counter()
    for i in range(count):
        status = await _call(app, method, template.format((offset + i) % 10_000 + 1))
        if status != 200:
            raise RuntimeError(f"{case}: the app answered {status}")
    return (time.perf_counter() - started) / count * 1e6


def _build(variant: str, url: str) -> Any:
    module_name, _, function = VARIANTS[variant].factory.partition(":")
    return getattr(importlib.import_module(module_name), function)(url, VARIANTS[variant].mode)


async def _measure(apps: dict[str, Any], case: str, count: int, rounds: int) -> dict[str, Any]:
    names = list(apps)
    for name in names:  # warm-up: imports, pool, statement caches
        await _batch(apps[name], case, max(50, count // 5), 0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(await _batch(apps[name], case, count, r * count))
    base = next(name for name in names if VARIANTS[name].is_baseline)
    out: dict[str, Any] = {}
    for name in names:
        diffs = [a - b for a, b in zip(times[name], times[base], strict=True)]
        out[name] = {
            "us_per_request": statistics.median(times[name]),
            "added_us": statistics.median(diffs),
            "spread_us": statistics.quantiles(diffs, n=4) if len(diffs) >= 4 else None,
            "ratio": statistics.median(times[name]) / statistics.median(times[base]),
        }
    return out


def run_micro(
    urls: dict[str, dict[str, str]], quick: bool, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Time baseline, empty middleware and sessionscope per backend, mode and case.

    :param urls: ``{backend: {mode: url}}``.
    """
    import uvloop

    counts = {"noop": 2000, "read": 300} if quick else {"noop": 5000, "read": 1000}
    rounds = 5 if quick else 15
    results: dict[str, Any] = {"counts": counts, "rounds": rounds, "results": []}
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        for backend, by_mode in urls.items():
            for mode, url in by_mode.items():
                apps = {f"{v}-{mode}": _build(f"{v}-{mode}", url) for v in MICRO_VARIANTS}
                for case in CASES:
                    log(f"  micro {backend} {mode} {case}")
                    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                        figures = runner.run(_measure(apps, case, counts[case], rounds))
                    results["results"].append(
                        {"backend": backend, "mode": mode, "case": case, "variants": figures}
                    )
    finally:
        os.sched_setaffinity(0, affinity)
    return results


def main() -> None:
    """Run the micro-benchmark alone and print its JSON."""
    from pathlib import Path

    from .database import backend

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--db", default="sqlite,postgresql")
    args = parser.parse_args()
    scratch = Path(__file__).resolve().parent / "results" / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    urls = {}
    for name in args.db.split(","):
        chosen = backend(name, scratch)
        chosen.prepare()
        urls[name] = {"sync": chosen.sync_url, "async": chosen.async_url}
    print(json.dumps(run_micro(urls, args.quick), indent=1))


if __name__ == "__main__":
    main()
