"""Medians, same-run ratios to the baseline, and the verdict on each target of issue #5.

Each variant is set against the baseline of its own side and mode (``baseline-sync`` /
``baseline-async`` under uvicorn, ``flask-baseline-sync`` under gunicorn), which every run
records; sessionscope's Flask extension is compared with the Flask peers, its ASGI
middleware with the ASGI peers.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from .variants import VARIANTS, baseline_of

__all__ = ["summarise", "targets"]

METRICS = {"rps": "rps", "p50_ms": "p50", "p99_ms": "p99", "cpu_us_per_request": "cpu"}


def _errors(run: dict[str, Any]) -> int:
    wrk = run["wrk"]
    socket = sum(v for k, v in wrk["errors"].items() if k != "status")
    return int(socket + wrk["status"]["4xx"] + wrk["status"]["5xx"] + wrk["status"]["other"])


def _describe(run: dict[str, Any]) -> dict[str, Any]:
    """Side, baseline, family and peer flag of a run's variant (older runs: ASGI)."""
    known = VARIANTS.get(run["variant"])
    if known is not None:
        return {
            "side": known.side,
            "baseline": baseline_of(known).name,
            "family": known.family,
            "peer": known.peer is not None,
        }
    return {
        "side": run.get("side", "asgi"),
        "baseline": run.get("baseline", f"baseline-{run['mode']}"),
        "family": run["variant"],
        "peer": False,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per backend, connections, workload and variant, each side's baseline first."""
    by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_key[(run["backend"], run["connections"], run["workload"], run["variant"])].append(run)
    rows = []
    for (backend, connections, workload, variant), group in by_key.items():
        described = _describe(group[0])
        base_runs = {
            r["repeat"]: r
            for r in by_key.get((backend, connections, workload, described["baseline"]), [])
        }
        row: dict[str, Any] = {
            "backend": backend,
            "connections": connections,
            "workload": workload,
            "variant": variant,
            "mode": group[0]["mode"],
            **described,
            "is_baseline": variant == described["baseline"],
            "rounds": len(group),
        }
        for field, short in METRICS.items():
            row[field if short in ("p50", "p99") else short] = statistics.median(
                r[field] for r in group
            )
            ratios = [
                r[field] / base_runs[r["repeat"]][field]
                for r in group
                if r["repeat"] in base_runs and base_runs[r["repeat"]][field]
            ]
            row[f"{short}_ratio"] = statistics.median(ratios) if ratios else None
        row["cpu_us"] = row.pop("cpu")
        row["errors"] = sum(_errors(r) for r in group)
        row["problems"] = [p for r in group for p in r["check"]["problems"]]
        rows.append(row)
    rows.sort(
        key=lambda r: (
            r["backend"],
            r["connections"],
            r["workload"],
            r["side"],
            not r["is_baseline"],
            r["mode"],
            r["variant"],
        )
    )
    return rows


def _verdict(target: str, passed: bool | None, detail: str) -> dict[str, str]:
    if passed is None:
        # A row that only informs has no pass mark; its detail says what was measured.
        result = "information" if target.endswith("(information)") else "not measured"
    else:
        result = "PASS" if passed else "**FAIL**"
    return {"target": target, "result": result, "detail": detail}


def targets(rows: list[dict[str, Any]], data: dict[str, Any]) -> list[dict[str, str]]:
    """Check the targets of issue #5 against the summary rows.

    sessionscope's rows are its ASGI middleware (``sessionscope-*``, against bare Starlette
    and the ASGI peers) and its Flask extension (``sessionscope-flask-sync``, against bare
    Flask and the Flask peers); each ratio is already to the baseline of the row's side.
    """
    ours = [r for r in rows if r["family"] in ("sessionscope", "sessionscope-flask")]
    out = []
    for workloads, floor, what in (
        (("noop",), 0.97, "/noop >= 0.97x bare app"),
        (("read", "write"), 0.95, "/items/{id} and POST /items >= 0.95x baseline"),
    ):
        chosen = [r for r in ours if r["workload"] in workloads and r["rps_ratio"] is not None]
        worst_by_side: dict[str, dict[str, Any]] = {}
        for side in ("asgi", "wsgi"):
            worst = min(
                (r for r in chosen if r["side"] == side),
                key=lambda r: r["rps_ratio"],
                default=None,
            )
            if worst is not None:
                worst_by_side[side] = worst
        out.append(
            _verdict(
                what,
                None
                if not worst_by_side
                else all(w["rps_ratio"] >= floor for w in worst_by_side.values()),
                "; ".join(
                    f"{side.upper()}: worst {w['rps_ratio']:.3f}x ({w['variant']},"
                    f" {w['workload']}, {w['backend']} c={w['connections']})"
                    for side, w in worst_by_side.items()
                )
                or "no run",
            )
        )
    out.append(_instructions_verdict(data))
    behind = []
    compared = 0
    for row in ours:
        for peer in rows:
            if not peer["peer"] or (
                peer["backend"],
                peer["connections"],
                peer["workload"],
                peer["mode"],
                peer["side"],
            ) != (
                row["backend"],
                row["connections"],
                row["workload"],
                row["mode"],
                row["side"],
            ):
                continue
            compared += 1
            if peer["rps"] >= row["rps"]:
                behind.append(
                    f"{peer['variant']} {peer['rps']:.0f} >= {row['rps']:.0f} req/s"
                    f" ({row['workload']}, {row['backend']} c={row['connections']})"
                )
    out.append(
        _verdict(
            "ahead of every peer (req/s, same server, mode and workload)",
            None if not compared else not behind,
            f"{compared} comparisons" + ("; behind: " + "; ".join(behind[:6]) if behind else ""),
        )
    )
    flagged = sorted(
        {
            f"{r['variant']} ({r['workload']}, {r['backend']} c={r['connections']})"
            for r in rows
            if r["problems"]
        }
    )
    ours_flagged = [f for f in flagged if f.startswith("sessionscope")]
    out.append(
        _verdict(
            "zero leaks / lost rows (sessionscope)",
            not ours_flagged,
            "; ".join(ours_flagged) or "every run clean",
        )
    )
    out.append(
        _verdict(
            "peers flagged by the checks (information)",
            None,
            "; ".join(f for f in flagged if not f.startswith("sessionscope")) or "none",
        )
    )
    soaks = [s for s in data.get("soak", []) if s.get("variant", "").startswith("sessionscope")]
    out.append(
        _verdict(
            "RSS growth < 5 MB over the soak",
            None if not soaks else all("growth_mb" in s and s["growth_mb"] < 5 for s in soaks),
            "; ".join(
                f"{s['variant']} {s.get('growth_mb', float('nan')):+.1f} MB over"
                f" {s.get('requests', 0):,} requests"
                for s in soaks
            )
            or "not in this run",
        )
    )
    wide = [r for r in ours if r["connections"] >= 256]
    out.append(
        _verdict(
            "256 connections: no errors (pool timeouts would show as 5xx)",
            None if not wide else all(r["errors"] == 0 for r in wide),
            "; ".join(
                f"{r['variant']} {r['workload']} {r['backend']}: {r['errors']} errors"
                for r in wide
                if r["errors"]
            )
            or ("no errors" if wide else "not in this run"),
        )
    )
    return out


def _instructions_verdict(data: dict[str, Any]) -> dict[str, str]:
    """The instruction count of ``/noop`` (information: the target is on req/s)."""
    counted = data.get("instructions")
    if not counted:
        return _verdict(
            "/noop instructions per request, callgrind (information)", None, "not in this run"
        )
    parts = []
    for result in counted["results"]:
        if result["case"] != "noop":
            continue
        for name, figures in result["variants"].items():
            if not VARIANTS[name].is_baseline:
                parts.append(f"{name} {figures['ratio']:.3f}x ({figures['added']:+,})")
    return _verdict(
        "/noop instructions per request, callgrind (information)",
        None,
        "; ".join(parts) or "no /noop count",
    )
