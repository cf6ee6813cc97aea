"""The fault soak's load generator: ``python -m benchmarks.faultload PORT CONNECTIONS ...``.

``benchmarks.faults`` starts it in a process of its own, pinned to the load core. It speaks
HTTP/1.1 over raw asyncio sockets to ``127.0.0.1`` only: ``CONNECTIONS`` keep-alive clients
send ``POST /w/<kind>/<id>`` (ids counted up from ``FIRST_ID``, never reused) with the mix of
``KINDS`` (``--mix`` changes weights) for ``SECONDS``, and a burst of ``BURST`` slow requests
on sockets of their own starts ``BURST_AT`` seconds in. ``drop`` clients close the socket
``DROP_AFTER`` s after sending (the endpoint is still sleeping); ``stream-drop`` clients close
it after the first body chunk. Then it waits for the requests in flight (each bounded by
``REQUEST_TIMEOUT``), writes every request's record as JSON to ``OUT`` and exits; it never
runs longer than ``SECONDS + REQUEST_TIMEOUT + 15`` s.

While it runs it prints ``P <monotonic time> <complete responses>`` every 0.2 s, so that the
harness can see a stall as it happens. Times are ``time.monotonic()``, the same clock in
every process of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["KINDS", "main", "parse_mix"]

KINDS = {
    "good": 50,
    "good-flush": 15,
    "conflict": 8,
    "raise": 7,
    "drop": 8,
    "stream": 30,
    "stream-drop": 7,
}
"""Relative weights of the request kinds in the steady mix (the burst is ``slow``). Streams
read whole weigh this much because a sync stream that wrote holds its connection between
chunks: with 5 of 120 the stall of issue 12 did not show at 492ca94 in 6 rounds, nor with 15
or 25; with 30 of 145 it showed in 6 rounds of 7."""
PATHS = {
    "good": "/w/good/{}",
    "good-flush": "/w/good/{}?flush=1",
    "conflict": "/w/conflict/{}",
    "raise": "/w/raise/{}",
    "drop": "/w/drop/{}",
    "slow": "/w/slow/{}",
    "stream": "/w/stream/{}",
    "stream-drop": "/w/stream/{}",
}
DROP_AFTER = 0.3
"""Seconds after sending that a ``drop`` client closes its socket (the endpoint sleeps 1 s)."""
REQUEST_TIMEOUT = 45.0
"""Longer than the pool's 30 s timeout: a stall shows as late answers, not client timeouts."""
Record = tuple[int, str, float, float, int | None, str]
"""``(id, kind, started, ended, status or None, outcome)``; outcome is ``answered`` (the
whole response arrived), ``dropped`` (the client left on purpose), ``failed (<error>)``
(the connection broke first) or ``timeout``."""


class Client:
    """One keep-alive connection's worth of requests, reopened after every drop or error."""

    def __init__(self, port: int, records: list[Record], progress: list[int]) -> None:
        self.port = port
        self.records = records
        self.progress = progress
        self.stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, kind: str, item_id: int) -> None:
        """Send one request, record how it ended, keep the connection when it is reusable."""
        started = time.monotonic()
        status: int | None = None
        outcome = "failed"
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, outcome = await self._exchange(kind, item_id)
        except TimeoutError:
            outcome = "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            outcome = f"failed ({type(e).__name__})"
        ended = time.monotonic()
        if outcome != "answered":
            self.close()
        else:
            self.progress[0] += 1
        self.records.append((item_id, kind, started, ended, status, outcome))

    async def _exchange(self, kind: str, item_id: int) -> tuple[int | None, str]:
        if self.stream is None:
            self.stream = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.stream
        path = PATHS[kind].format(item_id)
        if kind.startswith("stream") and item_id % 2:
            path += "?late=1"  # the body writes after its first chunk, not before
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()
        )
        await writer.drain()
        if kind == "drop":
            await asyncio.sleep(DROP_AFTER)
            return None, "dropped"
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = _headers(head)
        if headers.get("transfer-encoding") == "chunked":
            while await _chunk(reader):
                if kind == "stream-drop":
                    return status, "dropped"
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection") == "close" or status >= 500:
            # uvicorn closes the connection after an app that raised once it answered.
            self.close()
        return status, "answered"

    def close(self) -> None:
        """Close the socket (a ``drop`` or ``stream-drop`` client leaving)."""
        if self.stream is not None:
            self.stream[1].close()
            self.stream = None


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip().lower() for name, value in pairs}


async def _chunk(reader: asyncio.StreamReader) -> bool:
    """Read one chunk of a chunked body; false at the last (empty) chunk."""
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
    await reader.readexactly(size + 2)
    return size > 0


async def _steady(
    client: Client, ids: Iterator[int], deadline: float, mix: dict[str, int], seed: int
) -> None:
    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    while time.monotonic() < deadline:
        await client.request(rng.choices(kinds, weights)[0], next(ids))
    client.close()


async def _burst(client: Client, ids: Iterator[int], at: float, size: int) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    clients = [Client(client.port, client.records, client.progress) for _ in range(size)]
    await asyncio.gather(*(client.request("slow", next(ids)) for client in clients))
    for client in clients:
        client.close()


async def _report(progress: list[int]) -> None:
    while True:
        print(f"P {time.monotonic():.3f} {progress[0]}", flush=True)
        await asyncio.sleep(0.2)


async def run(options: argparse.Namespace) -> dict[str, Any]:
    """Run the load described by ``options``; the records and when things happened."""
    started = time.monotonic()
    deadline = started + options.seconds
    records: list[Record] = []
    progress = [0]
    ids = itertools.count(options.first_id)
    mix = {**KINDS, **options.mix}
    reporter = asyncio.ensure_future(_report(progress))
    work = [
        _steady(Client(options.port, records, progress), ids, deadline, mix, options.seed + n)
        for n in range(options.connections)
    ]
    burst_at = started + options.burst_at
    if options.burst:
        burst = Client(options.port, records, progress)
        work.append(_burst(burst, ids, burst_at, options.burst))
    limit = options.seconds + REQUEST_TIMEOUT + 15
    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*work)
    except TimeoutError:
        print(f"load generator stopped at its {limit:.0f} s limit", file=sys.stderr)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    return {
        "started": started,
        "deadline": deadline,
        "ended": time.monotonic(),
        "burst_at": burst_at if options.burst else None,
        "records": records,
    }


def parse_mix(text: str) -> dict[str, int]:
    """``"stream=20,drop=0"`` as weights that replace those of ``KINDS``."""
    mix = {kind: int(weight) for kind, _, weight in (p.partition("=") for p in text.split(","))}
    if set(mix) - set(KINDS):
        raise ValueError(f"unknown kinds {sorted(set(mix) - set(KINDS))}; use {sorted(KINDS)}")
    return mix


def main() -> None:
    """Parse the arguments, run the load, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("connections", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("first_id", type=int)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--burst", type=int, default=31)
    parser.add_argument("--burst-at", type=float, default=5.0)
    parser.add_argument("--mix", type=parse_mix, default={}, help="kind=weight,... over KINDS")
    options = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        result = asyncio.run(run(options))
    else:
        result = uvloop.run(run(options))
    with open(options.out, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
