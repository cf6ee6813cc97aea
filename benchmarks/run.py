"""Run the benchmark: ``python -m benchmarks [--quick]`` (or ``scripts/bench``).

Starts one server per variant pinned to core 0 (uvicorn with one worker for the ASGI
variants, gunicorn with one gthread worker for the WSGI ones), drives each with wrk
(pinned to core 1) in interleaved rounds (A B C ... A B C ...), checks correctness after
every run, then runs the memory soak and the count of instructions per request under
callgrind (full mode) and the in-process micro-benchmark (all three ASGI only), and writes
JSON, Markdown and a PNG chart into ``benchmarks/results/``. Each
variant is compared with the baseline of its own side and mode: bare Starlette for ASGI,
bare Flask (``flask-baseline-sync``) for WSGI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import checks, load, servers
from .database import Backend, backend
from .instructions import run_instructions
from .machine import describe
from .micro import run_micro
from .peers import prepare_peers
from .report import write_report
from .soak import run_soak
from .variants import VARIANTS, Variant, baseline_of

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
SERVER_CORE, LOAD_CORE = 0, 1
FIRST_PORT = 18300


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about two to three minutes: PostgreSQL, 32 connections, one round of 2 s"
        " runs, short micro, no soak, not every variant (see benchmarks/variants.py)",
    )
    parser.add_argument("--db", help="comma list of sqlite,postgresql")
    parser.add_argument("--connections", help="comma list, default 32,256")
    parser.add_argument("--workloads", default="noop,read,write")
    parser.add_argument(
        "--variants",
        help="comma list of variant names or families (e.g. sessionscope,sessionscope-flask);"
        " the baselines they are compared with are added",
    )
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--duration", type=int, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up before each run")
    parser.add_argument(
        "--warmup-every-round",
        action="store_true",
        help="warm up before every run, not only in the first round",
    )
    parser.add_argument("--soak-requests", type=int, help="0 skips the memory soak")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument("--no-micro", action="store_true")
    parser.add_argument(
        "--no-instructions",
        action="store_true",
        help="skip the count of instructions per request under callgrind (full mode only)",
    )
    parser.add_argument(
        "--gunicorn-threads",
        type=int,
        default=servers.GUNICORN_THREADS,
        help="threads of the one gthread worker serving each WSGI variant"
        f" (default {servers.GUNICORN_THREADS})",
    )
    options = parser.parse_args(argv)
    quick = options.quick
    # A run that leaves something out is partial: its report never replaces latest.md.
    options.partial = not quick and bool(
        options.db
        or options.connections
        or options.workloads != parser.get_default("workloads")
        or options.variants
        or options.no_peers
        or options.no_micro
        or options.no_instructions
        or options.soak_requests == 0
    )
    options.db = (options.db or ("postgresql" if quick else "sqlite,postgresql")).split(",")
    options.connections = [
        int(c) for c in (options.connections or ("32" if quick else "32,256")).split(",")
    ]
    options.workloads = options.workloads.split(",")
    options.repeats = options.repeats or (1 if quick else 3)
    options.duration = options.duration or (2 if quick else 5)
    options.warmup = options.warmup if options.warmup is not None else 1
    if options.soak_requests is None:
        options.soak_requests = 0 if quick else 100_000
    return options


def _selected(options: argparse.Namespace, peers_ok: dict[str, str]) -> list[Variant]:
    """The variants to run, in ``VARIANTS`` order, each with the baseline of its side."""
    wanted = set(options.variants.split(",")) if options.variants else None
    if wanted:
        unknown = wanted - {n for v in VARIANTS.values() for n in (v.name, v.family)}
        if unknown:
            raise SystemExit(f"Unknown variant(s) {', '.join(sorted(unknown))}.")
    chosen: set[str] = set()
    for variant in VARIANTS.values():
        if wanted is not None and not ({variant.name, variant.family} & wanted):
            continue
        if wanted is None and options.quick and not variant.quick:
            continue
        if variant.peer and (options.no_peers or variant.peer not in peers_ok):
            continue
        chosen |= {variant.name, baseline_of(variant).name}
    return [variant for name, variant in VARIANTS.items() if name in chosen]


def _relative(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).relative_to(HERE.parent))
    except ValueError:
        return path


def _python_for(variant: Variant, peers_ok: dict[str, str]) -> str:
    return peers_ok[variant.peer] if variant.peer else sys.executable


def _point(
    server: servers.ServerProcess,
    chosen: Backend,
    engine: Any,
    workload: str,
    connections: int,
    options: argparse.Namespace,
    first: bool,
) -> dict[str, Any]:
    port = server.port
    drain = 35.0 if connections > 32 else 10.0  # past the pool's 30 s timeout at 256
    if options.warmup and (first or options.warmup_every_round):
        load.run_wrk(port, workload, connections, options.warmup, core=LOAD_CORE)
        checks.wait_drained(port, drain)
        checks.reset_table(chosen, engine)
    # gunicorn's CPU is its whole process tree (master and worker); see benchmarks.servers.
    cpu_before, rss_before = server.cpu_seconds(), server.rss_bytes()
    wrk = load.run_wrk(port, workload, connections, options.duration, core=LOAD_CORE)
    cpu = server.cpu_seconds() - cpu_before
    rss_after = server.rss_bytes()
    check = checks.check_run(server, chosen, engine, workload, wrk, connections, drain)
    requests = max(1, wrk["requests"])
    wrk.pop("acked", None)
    return {
        "rps": wrk["requests"] / (wrk["duration_us"] / 1e6),
        "p50_ms": wrk["latency_us"]["p50"] / 1000,
        "p99_ms": wrk["latency_us"]["p99"] / 1000,
        "cpu_us_per_request": cpu / requests * 1e6,
        "rss_mb": rss_after / 2**20,
        "rss_delta_mb": (rss_after - rss_before) / 2**20,
        "wrk": wrk,
        "check": check,
    }


def _retire(
    server: servers.ServerProcess, chosen: Backend, engine: Any, failures: dict[str, str]
) -> None:
    """Stop a server whose pool never drained, so that it cannot hold up the others.

    A variant that keeps its connections after the load (a deadlock, a leak) also keeps
    their transactions: on SQLite one open write transaction locks the file for every
    other variant. Its remaining runs are reported as not run.
    """
    print(f"  ! {server.variant.name} kept its connections: stopped for the rest of the run")
    failures[f"{server.variant.name}@{chosen.name}"] = (
        "its pool never drained after a run (connections kept checked out); the server was"
        " stopped so that the other variants could go on"
    )
    servers.stop(server)
    checks.reset_table(chosen, engine)


def _load_phase(
    options: argparse.Namespace,
    chosen: Backend,
    variants: list[Variant],
    peers_ok: dict[str, str],
    runs: list[dict[str, Any]],
    failures: dict[str, str],
    counter: list[int],
) -> None:
    logs = HERE / "results" / "tmp" / "logs"
    started: list[servers.ServerProcess] = []
    engine = chosen.engine()
    try:
        for i, variant in enumerate(variants):
            started.append(
                servers.start(
                    variant,
                    chosen.url(variant.mode),
                    FIRST_PORT + i,
                    _python_for(variant, peers_ok),
                    SERVER_CORE,
                    logs,
                    gunicorn_threads=options.gunicorn_threads,
                )
            )
        alive = []
        for server in started:
            if servers.wait_ready(server, 60.0):
                alive.append(server)
            else:
                failures[f"{server.variant.name}@{chosen.name}"] = (
                    f"failed to start: {server.error}\n{server.log_tail()}"
                )
                print(f"  ! {server.variant.name} failed to start: {server.error}", flush=True)
        workloads = [w for w in options.workloads if w != "noop" or chosen.name == options.db[0]]
        for repeat in range(options.repeats):
            for connections in options.connections:
                for workload in workloads:
                    shift = repeat % max(1, len(alive))
                    for server in alive[shift:] + alive[:shift]:
                        counter[0] += 1
                        label = (
                            f"[{counter[0]:>3}/{counter[1]}] {chosen.name} {workload}"
                            f" c={connections} {server.variant.name}"
                            f" (round {repeat + 1}/{options.repeats})"
                        )
                        print(label, end=" ... ", flush=True)
                        if not server.alive():
                            print("server is down", flush=True)
                            continue
                        try:
                            point = _point(
                                server,
                                chosen,
                                engine,
                                workload,
                                connections,
                                options,
                                first=repeat == 0,
                            )
                        except (RuntimeError, OSError) as error:
                            print(f"error: {error}", flush=True)
                            failures[f"{server.variant.name}@{chosen.name}"] = str(error)
                            continue
                        point.update(
                            backend=chosen.name,
                            variant=server.variant.name,
                            mode=server.variant.mode,
                            server=server.variant.server,
                            side=server.variant.side,
                            baseline=baseline_of(server.variant).name,
                            workload=workload,
                            connections=connections,
                            repeat=repeat,
                        )
                        runs.append(point)
                        problems = point["check"]["problems"]
                        print(
                            f"{point['rps']:8.0f} req/s  p99 {point['p99_ms']:7.1f} ms"
                            f"  {'FLAGGED: ' + '; '.join(problems) if problems else 'ok'}",
                            flush=True,
                        )
                        if point["check"].get("wedged"):
                            _retire(server, chosen, engine, failures)
    finally:
        for server in started:
            servers.stop(server)
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """Run everything the options ask for and write the report; 0 unless setup failed."""
    options = _options(argv)
    # A plain kill must still run the 'finally' blocks that stop every server we started.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    started = time.time()
    (HERE / "results" / "tmp").mkdir(parents=True, exist_ok=True)
    load.ensure_wrk()
    backends = [backend(name, HERE / "results" / "tmp") for name in options.db]
    print("Preparing databases (seeding 10,000 rows)...", flush=True)
    for chosen in backends:
        chosen.prepare()
    peers: dict[str, Any] = {}
    if not options.no_peers:
        print("Preparing the peers' venv (benchmarks/.venv-peers)...", flush=True)
        peers = {
            name: status.as_dict()
            for name, status in prepare_peers(
                sorted({v.peer for v in VARIANTS.values() if v.peer})
            ).items()
        }
    peers_ok = {name: status["python"] for name, status in peers.items() if status["installed"]}
    variants = _selected(options, peers_ok)
    machine = describe(backends)
    runs: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    per_db = {
        c.name: len([w for w in options.workloads if w != "noop" or c.name == options.db[0]])
        for c in backends
    }
    total = sum(per_db.values()) * len(variants) * len(options.connections) * options.repeats
    counter = [0, total]
    for chosen in backends:
        _load_phase(options, chosen, variants, peers_ok, runs, failures, counter)
    # What follows the load phase must never cost the report its load figures: a failure
    # (or Ctrl-C) there is recorded, and the report is written with what was measured.
    soak: list[dict[str, Any]] = []
    micro = None
    instructions = None
    try:
        if not options.no_micro:
            print("In-process micro-benchmark...", flush=True)
            micro = run_micro(
                {c.name: {"sync": c.sync_url, "async": c.async_url} for c in backends},
                options.quick,
            )
        if options.soak_requests:
            run_soak(
                options.soak_requests,
                backends[-1],
                FIRST_PORT + 90,
                SERVER_CORE,
                LOAD_CORE,
                results=soak,
            )
        if not options.quick and not options.no_instructions:
            print("Instructions per request under callgrind (a few minutes)...", flush=True)
            first = backends[0]
            instructions = run_instructions(
                first.name, {"sync": first.sync_url, "async": first.async_url}
            )
    except Exception as error:
        failures["micro-benchmark or soak"] = f"{type(error).__name__}: {error}"
        print(f"  ! {failures['micro-benchmark or soak']}", flush=True)
    except (KeyboardInterrupt, SystemExit):
        failures["micro-benchmark or soak"] = "interrupted; the report keeps what was measured"
        print("  ! interrupted: writing the report with what was measured", flush=True)
    machine["load_average_end"] = os.getloadavg()
    data = {
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": options.quick,
        "kind": "quick" if options.quick else "partial" if options.partial else "full",
        "settings": dict(vars(options)),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "machine": machine,
        # Paths inside the repository, not this machine's: the report is committed.
        "peers": {
            name: {**status, "python": _relative(status.get("python"))}
            for name, status in peers.items()
        },
        "variants": [v.name for v in variants],
        "runs": runs,
        "failures": failures,
        "soak": soak,
        "micro": micro,
        "instructions": instructions,
    }
    paths = write_report(data, HERE / "results")
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0
