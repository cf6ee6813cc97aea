"""The fault soak's checks of one round (``benchmarks.faults``), and what they mean.

- **lost writes**: ids whose client received a complete 2xx response, not in the table.
- **phantom writes**: rows in the table whose request the server did not answer with a
  complete 2xx response. ``Answers``, the app's outermost middleware, notes for every id the
  status of the start that left the app and whether its final body message left too: the
  contract commits before the status leaves (a stream's body work before its final
  message), so a stored row is legitimate exactly when its id has a 2xx start and a final
  message. That makes the check exact for the requests whose client saw nothing: a client
  that left while its endpoint slept may still be answered 201 into a closed socket (the
  server does not learn of the disconnect), and then its row is rightly stored; a stream
  left after its first chunk is cancelled and must leave nothing. A stored row whose client
  saw a 409 or a 500 is always a phantom (``phantom_seen_error`` counts those).
  One outcome no library can rule out is counted as a phantom anyway: a backend terminated
  while its COMMIT runs may commit and die before answering (the server then answers 500);
  ``kills_in_commit`` counts the kills that hit an active COMMIT.
- **leaks**: after the drain, the pool's checked-out connections, the live units and sessions
  of the registry, and the server's PostgreSQL backends ``idle in transaction``.
- **stall**: the longest interval, from the round's start to its last request's end, in which
  no response at all completed (as the clients saw it). The slowest request by design takes
  2 s; more than ``STALL_FLAG`` (3 s) is flagged, and while one lasts the watch snapshots the
  server's backends and (with ``py-spy``) its threads.
- **sanity**: at least ``GOOD_SHARE`` of the good writes must get their 2xx (kills and pool
  timeouts cost some; a server that fails them all would pass every other check).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from .apps.shared import Item
from .faultwatch import STALL_FLAG, Watch

__all__ = ["GOOD_SHARE", "stored_ids", "verdict"]

GOOD_SHARE = 0.25
"""Below this share of 2xx among the good writes, the server is broken, not just faulted."""


def stored_ids(engine: Engine, first_id: int, count: int) -> set[int]:
    """The ids stored in ``[first_id, first_id + count)``: one round's."""
    with engine.connect() as connection:
        ids = select(Item.id).where(Item.id >= first_id, Item.id < first_id + count)
        return set(connection.scalars(ids))


def verdict(
    records_path: Path,
    answers: dict[str, Any],
    stored: set[int],
    stats: dict[str, Any],
    drained_s: float,
    idle: int,
    watch: Watch,
) -> dict[str, Any]:
    """The round's figures and its ``problems``, by the rules of this module."""
    problems: list[str] = []
    try:
        load = json.loads(records_path.read_text())
    except (OSError, ValueError) as error:
        return {"problems": [f"the load generator wrote no records: {error!r}"]}
    records = load["records"]
    answered = [r for r in records if r[5] == "answered"]
    acked = {r[0] for r in answered if 200 <= r[4] < 300}
    seen_error = {r[0] for r in answered if r[4] >= 300}
    if "error" in answers:
        problems.append(f"GET /_answers failed: {answers.pop('error')}")
    legit = {int(k) for k, (status, final) in answers.items() if 200 <= status < 300 and final}
    lost, phantom = acked - stored, stored - legit
    unseen = stored & legit - acked
    ends = sorted(r[3] for r in answered)
    points = [load["started"], *ends, max((r[3] for r in records), default=load["started"])]
    gap, at = max(((b - a, a) for a, b in itertools.pairwise(points)), default=(0, 0))
    kinds = Counter(f"{r[1]} {r[4] if r[5] == 'answered' else r[5]}" for r in records)
    peak_idle = max((s["backends"].get("idle in transaction", 0) for s in watch.samples
                     if "error" not in s["backends"]), default=0)  # fmt: skip
    result: dict[str, Any] = {
        "requests": len(records),
        "acked": len(acked),
        "lost": sorted(lost),
        "phantom": sorted(phantom),
        "phantom_seen_error": sorted(phantom & seen_error),
        "stored": len(stored),
        "stored_unseen_2xx": len(unseen),
        "acked_not_sent": sorted(acked - legit),
        "after_drain": stats,
        "drain_s": round(drained_s, 2),
        "idle_in_tx": idle,
        "stall_s": round(gap, 2),
        "stall_at_s": round(at - load["started"], 2),
        "burst_at_s": None if load["burst_at"] is None else load["burst_at"] - load["started"],
        "kinds": dict(sorted(kinds.items())),
        "kills": watch.kills,
        "kills_in_commit": sum(
            1
            for k in watch.kills
            if k.get("state") == "active" and (k.get("query") or "").startswith("COMMIT")
        ),
        "peak_idle_in_tx": peak_idle,
        "peak_threads": max((s["threads"] or 0 for s in watch.samples), default=0),
        "stall_snapshots": watch.stalls,
        "samples": watch.samples,
        "records": str(records_path),
    }
    if lost:
        problems.append(f"{len(lost)} lost writes (acknowledged 2xx, not stored)")
    if phantom:
        problems.append(f"{len(phantom)} phantom writes (stored, not answered 2xx in full)")
    if acked - legit:
        problems.append(f"{len(acked - legit)} 2xx the client saw but the app never sent")
    problems += [f"{key}={value} after the drain" for key, value in stats.items() if value]
    if idle:
        problems.append(f"{idle} backends idle in transaction after the drain")
    if gap > STALL_FLAG:
        problems.append(f"stall of {gap:.1f} s at {at - load['started']:.1f} s")
    good = [r[0] for r in records if r[1] in ("good", "good-flush")]
    share = sum(1 for item_id in good if item_id in acked) / max(1, len(good))
    result["good_2xx_share"] = round(share, 3)
    if share < GOOD_SHARE:
        problems.append(f"only {share:.0%} of the good writes answered 2xx")
    result["problems"] = problems
    return result
