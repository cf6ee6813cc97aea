"""Machine instructions per request under a real uvicorn server, counted by callgrind.

Throughput on a shared two-core machine drifts by more than the few percent the ``/noop``
target is about (the same bare app measured 13,700 and 18,200 req/s in one run); a count
of instructions does not. Each variant's server runs twice under ``valgrind
--tool=callgrind``, with the hash seed fixed and address-space randomisation off, and
answers a fixed number of requests each time (``SHORT`` then ``LONG``, sent by the client
here over 32 keep-alive connections). The difference of the two totals divided by the
difference of the counts is what one request costs; start-up, warm-up and shutdown cancel
out. The count repeats within about 1%.

It counts instructions, not time: what a request waits for (the pool, a lock, the loop) and
what it loses to cache misses are not in it, which is what the load benchmark measures. ASGI
variants only (baseline, empty middleware, sessionscope). Run alone with
``python -m benchmarks.instructions [--db sqlite]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import servers
from .load import ensure_command
from .variants import VARIANTS

__all__ = ["run_instructions"]

VARIANT_FAMILIES = ("baseline", "empty-mw", "sessionscope")
CASES = {"noop": "/noop", "read": "/items/{}"}
COUNTS = {"noop": (1_000, 3_000), "read": (300, 900)}
"""Requests per case in the short and the long run (a read costs about ten noops)."""
CONNECTIONS = 32
FIRST_PORT = 18500
_SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.MULTILINE)


def _request_paths(case: str, count: int) -> list[str]:
    template = CASES[case]
    return [template.format(i % 10_000 + 1) for i in range(count)]


async def _drive(port: int, paths: list[str]) -> int:
    """Send every path once over ``CONNECTIONS`` keep-alive connections; count the 200s."""
    pending = iter(paths)

    async def connection() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answered = 0
        try:
            for path in pending:  # shared by every connection: each path is sent once
                writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length is None:
                    raise RuntimeError(f"GET {path}: the answer has no content-length")
                await reader.readexactly(int(length.group(1)))
                if status != 200:
                    raise RuntimeError(f"GET {path}: the server answered {status}")
                answered += 1
        finally:
            writer.close()
            await writer.wait_closed()
        return answered

    return sum(await asyncio.gather(*(connection() for _ in range(CONNECTIONS))))


def _count(
    variant: str, url: str, case: str, requests: int, port: int, core: int, scratch: Path
) -> int:
    """Total instructions of one server process that answered ``requests`` requests."""
    out = scratch / f"callgrind-{variant}-{case}-{requests}.out"
    wrapper = [
        "setarch",
        "-R",
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
    ]
    server = servers.start(
        VARIANTS[variant],
        url,
        port,
        sys.executable,
        core,
        scratch / "logs",
        extra_env={"PYTHONHASHSEED": "0"},
        wrapper=wrapper,
    )
    try:
        if not servers.wait_ready(server, timeout=180.0):
            raise RuntimeError(f"{variant} under callgrind: {server.error}\n{server.log_tail()}")
        answered = asyncio.run(_drive(port, _request_paths(case, requests)))
        if answered != requests:
            raise RuntimeError(f"{variant}: {answered} of {requests} requests answered")
    finally:
        servers.stop(server, grace=120.0)
    try:
        found = _SUMMARY.search(out.read_bytes())
    finally:
        out.unlink(missing_ok=True)
    if found is None:
        raise RuntimeError(f"{variant}: callgrind wrote no summary\n{server.log_tail()}")
    return int(found.group(1))


def _per_request(
    variant: str, url: str, case: str, port: int, core: int, scratch: Path
) -> dict[str, Any]:
    short, long = COUNTS[case]
    first = _count(variant, url, case, short, port, core, scratch)
    second = _count(variant, url, case, long, port, core, scratch)
    return {"instructions": (second - first) / (long - short), "requests": [short, long]}


def run_instructions(
    backend: str, urls: dict[str, str], log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Count instructions per request for each mode, case and variant, two servers at once.

    :param backend: the database's name, for the report.
    :param urls: ``{mode: url}``.
    """
    ensure_command("valgrind", "valgrind")
    ensure_command("setarch", "util-linux")
    jobs = [
        (mode, case, f"{family}-{mode}")
        for mode in urls
        for case in CASES
        for family in VARIANT_FAMILIES
    ]
    counted: dict[tuple[str, str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="callgrind-") as directory:
        scratch = Path(directory)
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = {}
            for index, (mode, case, variant) in enumerate(jobs):
                log(f"  instructions {backend} {mode} {case} {variant}")
                futures[(mode, case, variant)] = pool.submit(
                    _per_request,
                    variant,
                    urls[mode],
                    case,
                    FIRST_PORT + index,
                    index % 2,
                    scratch,
                )
            for key, future in futures.items():
                counted[key] = future.result()
    results = []
    for mode in urls:
        for case in CASES:
            base = counted[(mode, case, f"baseline-{mode}")]["instructions"]
            figures = {}
            for family in VARIANT_FAMILIES:
                name = f"{family}-{mode}"
                value = counted[(mode, case, name)]["instructions"]
                figures[name] = {
                    "instructions": round(value),
                    "added": round(value - base),
                    "ratio": value / base,
                }
            results.append({"backend": backend, "mode": mode, "case": case, "variants": figures})
    return {"counts": COUNTS, "connections": CONNECTIONS, "results": results}


def main() -> None:
    """Count alone and print the JSON."""
    from .database import backend

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", default="sqlite")
    args = parser.parse_args()
    scratch = Path(__file__).resolve().parent / "results" / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    chosen = backend(args.db, scratch)
    chosen.prepare()
    urls = {"sync": chosen.sync_url, "async": chosen.async_url}
    print(json.dumps(run_instructions(args.db, urls), indent=1))


if __name__ == "__main__":
    main()
