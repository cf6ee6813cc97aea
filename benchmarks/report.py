"""Turn the raw runs into ratios, target verdicts, Markdown, JSON and a PNG chart.

Every figure is set against the baseline of the same side and mode (same server and
driver: bare Starlette under uvicorn, bare Flask under gunicorn), measured in the same
round of the same run: the ratio reported is the median over rounds of the per-round
ratios, so that slow drift of a shared machine cancels out.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .summary import summarise, targets

__all__ = ["write_report"]


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _wsgi_method(data: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    if not any(row["side"] == "wsgi" for row in rows):
        return ""
    threads = data["settings"].get("gunicorn_threads", "?")
    return (
        f" WSGI variants (Flask): gunicorn (1 gthread worker, {threads} threads, pure-Python"
        " HTTP parser) pinned to core 0, their ratios are to `flask-baseline-sync` (bare"
        " Flask opening its session by hand) and their CPU is that of gunicorn's whole"
        " process tree (master and worker), their RSS the worker's."
    )


def _markdown(data: dict[str, Any], rows: list[dict[str, Any]], verdicts: list[Any]) -> str:
    machine, settings = data["machine"], data["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    lines = [
        f"# sessionscope benchmark ({data.get('kind') or ('quick' if data['quick'] else 'full')})",
        "",
        f"Started {data['started']}, took {data['elapsed_s']:.0f} s."
        f" Command: `python -m benchmarks {' '.join(data['argv'])}`.",
        "",
        f"**Machine:** {machine['cpu_model']}, {machine['cores']} cores, Linux"
        f" {machine['kernel']}; load average at start"
        f" {', '.join(f'{x:.2f}' for x in machine['load_average'])}, at end"
        f" {', '.join(f'{x:.2f}' for x in machine.get('load_average_end', []))}"
        " (the machine is shared: absolute figures are noisy, the same-run ratios less so)."
        f" sessionscope at commit {machine.get('git_commit') or 'unknown'}.",
        "",
        f"**Versions:** {versions}.",
        "",
        f"**Method:** uvicorn (1 worker, uvloop + httptools) pinned to core 0, wrk (1 thread)"
        f" pinned to core 1, PostgreSQL backends unpinned; {settings['warmup']} s warm-up then"
        f" {settings['duration']} s per run, {settings['repeats']} interleaved round(s),"
        f" connections {settings['connections']}, default pool (5 + 10 overflow, 30 s"
        " timeout). Ratios are to the hand-written baseline of the same server, mode and"
        " driver (sync: psycopg 3 / pysqlite, async: asyncpg / aiosqlite); for req/s higher"
        " is better, for latency and CPU lower is better." + _wsgi_method(data, rows),
        "",
        "## Targets",
        "",
        "| target | result | detail |",
        "|---|---|---|",
    ]
    for verdict in verdicts:
        lines.append(f"| {verdict['target']} | {verdict['result']} | {verdict['detail']} |")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["backend"], row["connections"])].append(row)
    for (backend, connections), group in groups.items():
        lines += [
            "",
            f"## {backend}, {connections} connections",
            "",
            "| variant | workload | req/s | ratio | p50 ms | ratio | p99 ms | ratio"
            " | CPU µs/req | ratio | errors | checks |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for row in group:
            checks = (
                "ok"
                if not row["problems"]
                else "**FLAGGED**: " + "; ".join(sorted(set(row["problems"])))[:300]
            )
            lines.append(
                f"| {row['variant']} | {row['workload']} | {_fmt(row['rps'])} |"
                f" {_ratio(row['rps_ratio'])} | {_fmt(row['p50_ms'], 2)} |"
                f" {_ratio(row['p50_ratio'])} | {_fmt(row['p99_ms'], 1)} |"
                f" {_ratio(row['p99_ratio'])} | {_fmt(row['cpu_us'])} |"
                f" {_ratio(row['cpu_ratio'])} | {row['errors']} | {checks} |"
            )
    lines += _peer_lines(data) + _instruction_lines(data) + _micro_lines(data) + _soak_lines(data)
    if data["failures"]:
        lines += ["", "## Variants that failed to start or run", ""]
        for name, error in data["failures"].items():
            lines += [f"- **{name}**:", "", "```", error.strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def _peer_lines(data: dict[str, Any]) -> list[str]:
    if not data["peers"]:
        return ["", "Peers were not run (`--no-peers`)."]
    lines = [
        "",
        "## Peers",
        "",
        "| peer | version | installed | same pins as the project | other versions |",
        "|---|---|---|---|---|",
    ]
    for name, status in data["peers"].items():
        others = ", ".join(f"{k} {v}" for k, v in status["versions"].items() if k != name)
        installed = "yes" if status["installed"] else f"**no**: {status['error'][-200:]}"
        lines.append(
            f"| {name} | {status['version'] or '-'} | {installed} |"
            f" {'yes' if status['pinned'] else 'no'} | {others} |"
        )
    return lines


def _instruction_lines(data: dict[str, Any]) -> list[str]:
    counted = data.get("instructions")
    if not counted:
        return []
    lines = [
        "",
        "## Instructions per request under uvicorn (callgrind)",
        "",
        "Each server ran twice under callgrind and answered a fixed number of requests over"
        f" {counted['connections']} connections ("
        + ", ".join(f"{a:,} then {b:,} {case}" for case, (a, b) in counted["counts"].items())
        + "); per request = difference of the totals / difference of the counts. Repeatable"
        " within about 1% for /noop, 2-3% for reads (thread scheduling); no waits and no"
        " cache misses are in it.",
        "",
        "| backend | mode | case | variant | instructions/request | added | ratio |",
        "|---|---|---|---|--:|--:|--:|",
    ]
    return lines + _variant_rows(
        counted["results"], lambda f: f"{f['instructions']:,} | {f['added']:+,}"
    )


def _micro_lines(data: dict[str, Any]) -> list[str]:
    micro = data.get("micro")
    if not micro:
        return []
    lines = [
        "",
        "## In-process micro-benchmark (no network)",
        "",
        "One request at a time through the ASGI app, "
        + ", ".join(f"{n:,} {case}" for case, n in micro["counts"].items())
        + f" requests per batch, {micro['rounds']} interleaved rounds;"
        " µs added = median of the per-round differences with the baseline.",
        "",
        "| backend | mode | case | variant | µs/request | µs added | ratio |",
        "|---|---|---|---|--:|--:|--:|",
    ]
    return lines + _variant_rows(
        micro["results"], lambda f: f"{f['us_per_request']:.1f} | {f['added_us']:+.1f}"
    )


def _variant_rows(
    results: list[dict[str, Any]], cells: Callable[[dict[str, Any]], str]
) -> list[str]:
    """One table row per variant of each result: its key, ``cells(figures)``, its ratio."""
    return [
        f"| {result['backend']} | {result['mode']} | {result['case']} | {name}"
        f" | {cells(figures)} | {figures['ratio']:.3f}x |"
        for result in results
        for name, figures in result["variants"].items()
    ]


def _soak_lines(data: dict[str, Any]) -> list[str]:
    if not data["soak"]:
        return ["", "Memory soak not run (quick mode or `--soak-requests 0`)."]
    lines = [
        "",
        "## Memory soak (mixed requests, 32 connections)",
        "",
        "| variant | backend | requests | RSS before MB | RSS after MB | growth MB | checks |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for soak in data["soak"]:
        if "error" in soak:
            lines.append(f"| {soak['variant']} | - | - | - | - | - | failed: {soak['error']} |")
            continue
        checks = "ok" if not soak["problems"] else "**FLAGGED**: " + "; ".join(soak["problems"])
        lines.append(
            f"| {soak['variant']} | {soak['backend']} | {soak['requests']:,} |"
            f" {soak['rss_before_mb']:.1f} | {soak['rss_after_mb']:.1f} |"
            f" {soak['growth_mb']:+.1f} | {checks} |"
        )
    return lines


def _chart(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if not row["is_baseline"]:
            groups[(row["backend"], row["connections"])].append(row)
    if not groups:
        return False
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 7), squeeze=False)
    colours = {"noop": "#4c72b0", "read": "#55a868", "write": "#c44e52"}
    for axis, ((backend, connections), group) in zip(axes[0], groups.items(), strict=True):
        names = list(dict.fromkeys(row["variant"] for row in group))
        workloads = list(dict.fromkeys(row["workload"] for row in group))
        height = 0.8 / len(workloads)
        for k, workload in enumerate(workloads):
            values = {r["variant"]: r["rps_ratio"] or 0 for r in group if r["workload"] == workload}
            axis.barh(
                [i + k * height for i in range(len(names))],
                [values.get(name, 0) for name in names],
                height=height,
                label=workload,
                color=colours.get(workload),
            )
        axis.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=8)
        axis.invert_yaxis()
        axis.axvline(1.0, color="black", linewidth=1)
        axis.axvline(0.95, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{backend}, {connections} connections")
        axis.set_xlabel("throughput / baseline of the same server and mode")
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle("Throughput ratio to the hand-written baseline (same run, same driver)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(data: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Write ``<stamp>-<kind>.json``, ``.md`` and ``.png`` into ``directory``.

    A full run also becomes ``latest.md`` and ``latest.png``, the report README shows; a
    quick or partial run (one that leaves out a database, a variant, a workload...) only
    fills them in when there are none.
    """
    rows = summarise(data["runs"])
    verdicts = targets(rows, data)
    data = {**data, "summary": rows, "targets": verdicts}
    kind = data.get("kind") or ("quick" if data["quick"] else "full")
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / f"{stem}.json", "markdown": directory / f"{stem}.md"}
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    markdown = _markdown(data, rows, verdicts)
    if _chart(rows, directory / f"{stem}.png"):
        paths["chart"] = directory / f"{stem}.png"
        markdown += f"\n![throughput ratios]({stem}.png)\n"
    paths["markdown"].write_text(markdown)
    if kind == "full" or not (directory / "latest.md").exists():
        # README shows latest.md and latest.png: a full run replaces them.
        (directory / "latest.md").write_text(markdown.replace(f"({stem}.png)", "(latest.png)"))
        if "chart" in paths:
            shutil.copyfile(paths["chart"], directory / "latest.png")
    print(markdown, flush=True)
    return paths
