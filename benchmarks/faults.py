"""The fault soak: ``python -m benchmarks.faults [options]``.

For each mode (``sync``: psycopg and ``def`` endpoints; ``async``: asyncpg and ``async def``)
and each client count, one uvicorn server runs ``benchmarks.apps.faults_app`` (the default
pool of 15 connections, ``SessionMiddleware`` with its default options) pinned to core 0,
and ``--rounds`` rounds run against it one after another. In a round the load generator
(``benchmarks.faultload``, a process of its own pinned to core 1) keeps ``--connections``
clients busy for ``--seconds`` with good writes (``add()`` only, or flushed: 201), handled
409s and raising endpoints (500) that wrote first, clients that leave while the endpoint
sleeps after writing, and streams whose body writes (read whole, or left after the first
chunk); ``--burst-at`` s in, a burst of 31 slow requests (write, sleep 2 s, 201) arrives on
sockets of their own; every 3 s one PostgreSQL backend of the server's pool is terminated
(``benchmarks.faultwatch``). Then the harness waits until the server has nothing in flight
(``GET /_stats``) and checks the round for lost writes, phantom writes, leaked connections
and stalls, by the rules that ``benchmarks.faultchecks`` states.

It prints a table as it goes and writes ``benchmarks/results/<stamp>-faults.json``; the load
records and stall dumps stay in ``benchmarks/results/tmp/faults/``. The exit status is 1 if
any round had a problem. ``--src`` puts another copy of sessionscope first on the server's
``PYTHONPATH``: an export of a commit, or a copy of a tree that is being edited, so that
every server of the run imports the same code (the JSON keeps its digest). ``--python`` is
the interpreter for the server and the load generator (one with uvloop and httptools, as
``benchmarks.serve`` defaults to).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from . import checks, servers
from .apps.shared import SEED_ROWS
from .database import Backend, backend
from .faultchecks import stored_ids, verdict
from .faultload import REQUEST_TIMEOUT, parse_mix
from .faultwatch import Watch
from .machine import describe
from .variants import FAULT_VARIANTS

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVER_CORE, LOAD_CORE = 0, 1
DATABASE = "sessionscope_faults"
ROUND_IDS = 1_000_000
"""Ids per round: every round's ids are new, so nothing of an earlier round is mistaken."""
DRAIN = 45.0
"""How long the server may take to finish what is in flight (past the pool's 30 s timeout)."""


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__)
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--modes", default="sync,async", help="comma list of sync,async")
    parser.add_argument("--connections", default="128,256", help="comma list of client counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in a row per server")
    parser.add_argument("--seconds", type=float, default=25.0, help="seconds of load per round")
    parser.add_argument("--burst-at", type=float, default=5.0, help="seconds into a round")
    parser.add_argument(
        "--mix", default="", help="kind=weight,... to change the mix (benchmarks.faultload)"
    )
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--python", default=sys.executable, help="server and load interpreter")
    parser.add_argument("--src", default=str(REPO / "src"), help="sessionscope's source dir")
    parser.add_argument("--label", default="", help="a name for this run in the output")
    parser.add_argument("--py-spy", help="py-spy for stall dumps (default: found; 'none': off)")
    options = parser.parse_args(argv)
    options.modes = options.modes.split(",")
    if set(options.modes) - {"sync", "async"}:
        parser.error("--modes takes sync and/or async")
    options.connections = [int(c) for c in options.connections.split(",")]
    if options.mix:
        try:
            parse_mix(options.mix)
        except ValueError as error:
            parser.error(f"--mix: {error}")
    if options.py_spy is None:
        beside = Path(options.python).parent / "py-spy"
        options.py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    elif options.py_spy == "none":
        options.py_spy = None
    return options


def main(argv: list[str] | None = None) -> int:
    """Run every mode and client count, ``--rounds`` rounds each; 1 if anything failed."""
    options = _options(argv)
    scratch = HERE / "results" / "tmp" / "faults"
    scratch.mkdir(parents=True, exist_ok=True)
    chosen = backend(options.backend, scratch, DATABASE)
    chosen.prepare()
    engine = chosen.engine()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data: dict[str, Any] = {
        "label": options.label,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": {
            k: shown(v) if k in ("python", "src") else v
            for k, v in vars(options).items()
            if k != "py_spy"
        },
        "machine": describe([chosen]),
        "src_digest": _digest(Path(options.src)),
        "src_changes": _src_changes(options.src),
        "runs": [],
    }
    print(_row(HEADER), flush=True)
    batch = 0
    try:
        for mode in options.modes:
            for connections in options.connections:
                run = _run(options, chosen, engine, mode, connections, batch, scratch / stamp)
                data["runs"].append(run)
                batch += 1
    finally:
        engine.dispose()
        path = HERE / "results" / f"{stamp}-faults.json"
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(f"wrote {path.relative_to(REPO)}", flush=True)
    failed = [r for run in data["runs"] for r in [run, *run.get("rounds", [])] if r["problems"]]
    return 1 if failed else 0


def shown(path: str | Path) -> str:
    """``path`` as a report may show it: relative to the repository, else its last parts."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO))
    return str(Path(*resolved.parts[-2:]))


def _digest(src: Path) -> str:
    """A short hash of every ``.py`` file under ``src``: which code the servers ran."""
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _src_changes(src: str) -> list[str] | None:
    """``git status`` of the source dir the server runs, when it is this checkout's."""
    if Path(src).resolve() != REPO / "src":
        return None
    done = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.splitlines()


def _run(
    options: argparse.Namespace,
    chosen: Backend,
    engine: Engine,
    mode: str,
    connections: int,
    batch: int,
    prefix: Path,
) -> dict[str, Any]:
    """One server for ``mode``, ``--rounds`` rounds of ``connections`` clients against it."""
    variant = FAULT_VARIANTS[f"faults-{mode}"]
    port = options.port + batch
    path = f"{options.src}{os.pathsep}{REPO}"
    server = servers.start(
        variant,
        chosen.url(mode),
        port,
        options.python,
        SERVER_CORE,
        prefix.parent / "logs",
        extra_env={"PYTHONPATH": path},
    )
    run: dict[str, Any] = {"mode": mode, "connections": connections, "rounds": [], "problems": []}
    try:
        if not servers.wait_ready(server, 60.0):
            run["problems"].append(f"server did not start: {server.error}\n{server.log_tail()}")
            return run
        info = servers.get_json(port, "/_info")
        run["server"] = {**info, "sessionscope": shown(info["sessionscope"])}
        for index in range(options.rounds):
            first_id = SEED_ROWS + 1 + (batch * options.rounds + index) * ROUND_IDS
            where = Path(f"{prefix}-{mode}-{connections}-r{index + 1}")
            result = _round(options, server, chosen, engine, connections, first_id, where)
            result["round"] = index + 1
            run["rounds"].append(result)
            print(_row(_cells(options.label, mode, connections, result)), flush=True)
            if not server.alive():
                run["problems"].append(f"server died:\n{server.log_tail()}")
                break
    finally:
        servers.stop(server)
        run["log"] = shown(server.log_path)
    return run


def _round(
    options: argparse.Namespace,
    server: servers.ServerProcess,
    chosen: Backend,
    engine: Engine,
    connections: int,
    first_id: int,
    where: Path,
) -> dict[str, Any]:
    """One round of load and faults, then its checks."""
    error = checks.reset_table(chosen, engine)
    records = where.with_suffix(".json")
    command = [
        *("taskset", "-c", str(LOAD_CORE), options.python, "-m", "benchmarks.faultload"),
        *(str(server.port), str(connections), str(options.seconds), str(first_id)),
        *(str(records), "--seed", str(first_id), "--burst-at", str(options.burst_at)),
        *(("--mix", options.mix) if options.mix else ()),
    ]
    with where.with_suffix(".log").open("w") as log:
        load = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        assert load.stdout is not None
        deadline = time.monotonic() + options.seconds
        watch = Watch(server, chosen, load.stdout, deadline, where, options.py_spy)
        try:
            load.wait(timeout=options.seconds + REQUEST_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
        finally:
            watch.stop()
    stats, waited = checks.wait_drained(server.port, DRAIN)
    try:
        answers = servers.get_json(server.port, "/_answers", timeout=10.0)
    except (OSError, ValueError) as failure:
        answers = {"error": repr(failure)}
    stored = stored_ids(engine, first_id, ROUND_IDS)
    idle = chosen.idle_in_transaction(engine, server.tcp_ports() if server.alive() else None)
    result = verdict(records, answers, stored, stats, waited, idle, watch)
    result["records"] = shown(records)
    if error is not None:
        result["problems"].append(f"could not clean the table before the round: {error}")
    return result


HEADER = ("run", "mode", "conns", "rnd", "requests", "2xx", "lost", "phantom", "unseen 2xx",
          "leaked", "idle-tx", "peak idle-tx", "stall s (at)", "kills", "problems")  # fmt: skip


def _cells(label: str, mode: str, connections: int, result: dict[str, Any]) -> tuple[str, ...]:
    if "requests" not in result:
        return (label, mode, str(connections), str(result["round"]), *("-",) * 10,
                "; ".join(result["problems"]))  # fmt: skip
    stats = result["after_drain"]
    leaked = sum(stats.get(k, 0) for k in ("checkedout", "live_units", "live_sessions"))
    return (
        label,
        mode,
        str(connections),
        str(result["round"]),
        str(result["requests"]),
        str(result["acked"]),
        str(len(result["lost"])),
        str(len(result["phantom"])),
        str(result["stored_unseen_2xx"]),
        str(leaked) if "error" not in stats else "?",
        str(result["idle_in_tx"]),
        str(result["peak_idle_in_tx"]),
        f"{result['stall_s']:.1f} ({result['stall_at_s']:.0f})",
        str(len(result["kills"])),
        "; ".join(result["problems"]) or "ok",
    )


def _row(cells: tuple[str, ...]) -> str:
    widths = (6, 5, 5, 3, 8, 6, 4, 7, 10, 6, 7, 12, 12, 5, 0)
    return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))


if __name__ == "__main__":
    sys.exit(main())
