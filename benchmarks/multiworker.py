"""The fault soak with many workers: ``python -m benchmarks.multiworker [options]``.

For each worker count of ``--workers`` (and each mode and client count), a PgBouncer of its
own (``benchmarks.bouncer``: transaction pooling, ``--bouncer-pool`` server connections)
stands in front of PostgreSQL, and gunicorn runs ``-k uvicorn.workers.UvicornWorker -w N``
with ``benchmarks.apps.faults_multi``: the fault soak's app (``benchmarks.apps.faults_app``,
``SessionMiddleware`` with its default options, the default pool of 15 connections per
worker) built with ``Database(url, pgbouncer=True)`` on PgBouncer's port. With ``--app flask``
gunicorn runs ``-k gthread`` workers of ``GUNICORN_THREADS`` threads with
``benchmarks.apps.faults_flask`` (``db.init_app(app)``, sync only), and the mix has no
streams.

One round then runs as in ``benchmarks.faults``: the load generator
(``benchmarks.faultload``) keeps ``--connections`` clients busy for ``--seconds`` with the
same mix (good writes, handled 409s, raising endpoints, clients that leave mid-request and
mid-stream), ``--burst-at`` s in a burst of ``--burst-per-worker`` slow requests per worker
exhausts the pools, and every 3 s a PostgreSQL backend behind PgBouncer is terminated
(``benchmarks.faultwatch``; a transaction whose backend dies fails its next statement or its
COMMIT). ``--restart-at`` s in, PgBouncer is restarted (SIGINT, its safe shutdown, as
``systemctl restart`` does; SIGKILL if that takes more than 5 s): every connection of every
worker's pool breaks at once.

Then every worker is asked, on its private control port, until nothing is in flight and its
pool and registry are back to 0; the ledgers of all workers are merged and the round is
checked by ``benchmarks.faultchecks``' rules: 0 lost writes, 0 phantom writes, no backend
of the database ``idle in transaction``, no stall (the quiet spell of the PgBouncer restart
itself is reported apart: ``restart_gap_s``). Besides: every worker that started must still
be the one serving (a worker that died took its ledger with it), PgBouncer must have
restarted, a backend must have been killed, and after the round the server must still
answer fresh writes (201, stored) and every worker its control port.

Throughput is the complete responses (any status) that arrived within the ``--seconds`` of
load, per second; 2xx/s counts only those with a 2xx. The table ends with each worker
count's figure beside that of ``workers=1`` (the single-process server). Nothing is pinned
to a core: the workers, the load generator, PgBouncer and PostgreSQL share the machine.

It writes ``benchmarks/results/<stamp>-multiworker.json``; the load records and logs stay in
``benchmarks/results/tmp/multiworker/``. The exit status is 1 if any round had a problem.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checks, servers
from .apps.shared import SEED_ROWS
from .bouncer import Bouncer
from .database import Backend, backend
from .faultchecks import stored_ids, verdict
from .faultload import REQUEST_TIMEOUT, parse_mix
from .faults import shown
from .faultwatch import STALL_FLAG, Watch
from .variants import Variant

__all__ = ["Soak", "main", "soak"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATABASE = "sessionscope_multiworker"
ROUND_IDS = 1_000_000
DRAIN = 45.0
"""How long each worker may take to finish what is in flight (past the pool's 30 s)."""
PROBES = 4
"""Fresh writes per worker after the round: the server must still answer them."""
TARGETS = {
    "asgi": "benchmarks.apps.faults_multi:create",
    "flask": "benchmarks.apps.faults_flask:create",
}
WORKER_CLASSES = {
    "asgi": ("-k", "uvicorn.workers.UvicornWorker"),
    "flask": ("-k", "gthread", "--threads", str(servers.GUNICORN_THREADS)),
}
FLASK_MIX = "stream=0,stream-drop=0"
"""The Flask app has no streams (``benchmarks.apps.faults_flask``)."""
RESTART_SLACK = 2.0
"""Seconds after PgBouncer is back during which the pools reconnect (see ``_judge_stall``)."""


@dataclass
class Soak:
    """One round's settings."""

    workers: int
    connections: int
    seconds: float
    mode: str = "sync"
    app: str = "asgi"
    """``asgi``: uvicorn workers, ``SessionMiddleware``; ``flask``: gthread, ``init_app``."""
    burst_at: float = 5.0
    burst_per_worker: int = 31
    restart_at: float | None = None
    """Seconds into the load at which PgBouncer restarts; None: half way."""
    restart_grace: float = 5.0
    """Seconds PgBouncer's safe shutdown may take before it is killed."""
    bouncer_pool: int = 20
    mix: str = ""
    port: int = 18600
    first_id: int = SEED_ROWS + 1
    python: str = sys.executable
    py_spy: str | None = None


@dataclass
class Gunicorn(servers.ServerProcess):
    """gunicorn's master, whose database connections are PgBouncer's."""

    bouncer: Bouncer | None = None
    control: Path = field(default_factory=Path)

    def tcp_ports(self) -> set[int]:
        """PgBouncer's local ports: what PostgreSQL sees as the server's ``client_port``."""
        return self.bouncer.tcp_ports() if self.bouncer is not None else super().tcp_ports()

    def workers(self) -> dict[int, int]:
        """``{pid: control port}`` of every worker that has started so far."""
        found: dict[int, int] = {}
        for path in self.control.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                entry = json.loads(path.read_text())
                found[int(entry["pid"])] = int(entry["port"])
        return found


def start_gunicorn(config: Soak, url: str, bouncer: Bouncer, scratch: Path) -> Gunicorn:
    """gunicorn with ``config.workers`` uvicorn workers serving the fault app on ``url``."""
    name = f"faults-{config.app}-{config.mode}-c{config.connections}-w{config.workers}"
    variant = Variant(name, "faults", config.mode, TARGETS[config.app], server="gunicorn")
    control = scratch / f"{name}-control"
    control.mkdir(parents=True, exist_ok=True)
    for stale in control.glob("*.json"):
        stale.unlink()
    log_path = scratch / f"{name}.log"
    log = log_path.open("w")
    command = [
        *(config.python, "-m", "gunicorn", *WORKER_CLASSES[config.app]),
        *("-w", str(config.workers), "--bind", f"127.0.0.1:{config.port}"),
        *("--timeout", "120", "--graceful-timeout", "10", "--log-level", "warning"),
        f"{TARGETS[config.app]}()",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(REPO / "src"), str(REPO))),
        "PYTHONDONTWRITEBYTECODE": "1",
        "FAULTS_URL": url,
        "FAULTS_MODE": config.mode,
        "FAULTS_PGBOUNCER": "1",
        "FAULTS_CONTROL": str(control),
    }
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return Gunicorn(variant, config.port, process, log_path, log, bouncer=bouncer, control=control)


def wait_workers(server: Gunicorn, count: int, timeout: float) -> str | None:
    """Wait until ``count`` workers answer on their control ports and the shared port
    answers; say why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            return f"gunicorn exited with code {server.process.returncode}"
        workers = server.workers()
        ready = len(workers) >= count and all(_answers(port) for port in workers.values())
        if ready and _answers(server.port):
            return None
        time.sleep(0.1)
    return f"{len(server.workers())} of {count} workers answered within {timeout:.0f} s"


def _answers(port: int) -> bool:
    try:
        servers.get_json(port, "/_stats", timeout=2.0)
    except (OSError, ValueError):
        return False
    return True


def soak(config: Soak, chosen: Backend, scratch: Path) -> dict[str, Any]:
    """Run one round as ``config`` says, on ``chosen``'s (prepared) database; its figures and
    ``problems`` (empty when clean)."""
    scratch.mkdir(parents=True, exist_ok=True)
    engine = chosen.engine()
    bouncer = Bouncer(chosen.database, pool_size=config.bouncer_pool)
    result: dict[str, Any] = {"app": config.app, "workers": config.workers, "mode": config.mode,
                              "connections": config.connections, "problems": []}  # fmt: skip
    server: Gunicorn | None = None
    try:
        bouncer.start()
        server = start_gunicorn(config, bouncer.url(chosen.url(config.mode)), bouncer, scratch)
        why = wait_workers(server, config.workers, 60.0)
        if why is not None:
            result["problems"].append(f"server did not start: {why}\n{server.log_tail()}")
            return result
        result.update(_round(config, server, bouncer, chosen, engine, scratch))
    finally:
        if server is not None:
            servers.stop(server)
            result["log"] = shown(server.log_path)
            if server.log_path.exists():
                result["log_tail"] = server.log_tail(30)
        result["pgbouncer_log"] = bouncer.log_tail(30)
        bouncer.stop()
        engine.dispose()
    return result


def _round(
    config: Soak,
    server: Gunicorn,
    bouncer: Bouncer,
    chosen: Backend,
    engine: Any,
    scratch: Path,
) -> dict[str, Any]:
    error = checks.reset_table(chosen, engine)
    started_workers = server.workers()
    where = scratch / f"{config.app}-{config.mode}-w{config.workers}-c{config.connections}"
    records = where.with_suffix(".json")
    burst = config.burst_per_worker * config.workers
    mix = ",".join(m for m in (FLASK_MIX if config.app == "flask" else "", config.mix) if m)
    command = [
        *(config.python, "-m", "benchmarks.faultload", str(server.port)),
        *(str(config.connections), str(config.seconds), str(config.first_id), str(records)),
        *("--seed", str(config.first_id), "--burst-at", str(config.burst_at)),
        *("--burst", str(burst), *(("--mix", mix) if mix else ())),
    ]
    restart_at = config.seconds / 2 if config.restart_at is None else config.restart_at
    restart: dict[str, Any] = {}

    def restart_bouncer() -> None:
        try:
            restart.update(bouncer.restart(config.restart_grace))
        except Exception as failure:
            restart["error"] = repr(failure)

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
        began = time.monotonic()
        timer = threading.Timer(restart_at, restart_bouncer)
        timer.start()
        watch = Watch(server, chosen, load.stdout, began + config.seconds, where, config.py_spy)
        try:
            load.wait(timeout=config.seconds + REQUEST_TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
        finally:
            timer.cancel()
            timer.join()
            watch.stop()
            load.stdout.close()
    workers = server.workers()
    stats: dict[str, Any] = {}
    answers: dict[str, Any] = {}
    drained = 0.0
    for pid, port in sorted(workers.items()):
        figures, waited = checks.wait_drained(port, DRAIN)
        drained = max(drained, waited)
        stats.update({f"{key} (worker {pid})": value for key, value in figures.items()})
        try:
            answers.update(servers.get_json(port, "/_answers", timeout=10.0))
        except (OSError, ValueError) as failure:
            answers["error"] = f"worker {pid}: {failure!r}"
    stored = stored_ids(engine, config.first_id, ROUND_IDS)
    # The database is the soak's alone: every backend of it counts, whoever connected.
    idle = chosen.idle_in_transaction(engine)
    result = verdict(records, answers, stored, stats, drained, idle, watch)
    problems: list[str] = result["problems"]
    result["records"] = shown(records)
    if error is not None:
        problems.append(f"could not clean the table before the round: {error}")
    if "requests" not in result:
        return result
    load_data = json.loads(records.read_text())
    window_end = load_data["started"] + config.seconds
    answered = [r for r in load_data["records"] if r[5] == "answered" and r[3] <= window_end]
    result["req_s"] = round(len(answered) / config.seconds, 1)
    result["ok_s"] = round(sum(1 for r in answered if 200 <= r[4] < 300) / config.seconds, 1)
    result["restart"] = {**restart, "at_s": round(restart.get("t", began) - began, 2)}
    result["phantom_near_faults"] = _near_faults(load_data, result, restart)
    _judge_stall(load_data, result, restart)
    result["workers_started"] = sorted(started_workers)
    result["workers_ended"] = sorted(workers)
    if len(started_workers) != config.workers or set(workers) != set(started_workers):
        problems.append(
            f"workers changed during the round: {sorted(started_workers)} -> {sorted(workers)}"
        )
    if "error" in restart or "t" not in restart:
        problems.append(f"PgBouncer did not restart: {restart.get('error', 'never ran')}")
    if not any("pid" in kill for kill in watch.kills):
        problems.append("no PostgreSQL backend was killed")
    probes = _probe(server, config.first_id + ROUND_IDS - 1 - PROBES * config.workers,
                    PROBES * config.workers, engine)  # fmt: skip
    result["probes"] = probes
    problems += probes["problems"]
    return result


def _judge_stall(load: dict[str, Any], result: dict[str, Any], restart: dict[str, Any]) -> None:
    """Replace ``verdict``'s stall problem by one that leaves out the PgBouncer restart.

    While PgBouncer shuts down (its safe shutdown holds every new transaction until those in
    flight end, up to the restart's grace) and comes back, no request can reach the
    database: a quiet spell then is the fault itself. A gap of no completed response counts
    as a stall only when it does not overlap that window (plus ``RESTART_SLACK`` s);
    ``stall_s`` becomes the longest such gap and ``restart_gap_s`` the longest excused one.
    """
    problems: list[str] = result["problems"]
    problems[:] = [p for p in problems if not p.startswith("stall of ")]
    if "t" in restart:
        begin = restart["t"]
        end = begin + restart["stopped_s"] + restart["down_s"] + RESTART_SLACK
    else:
        begin = end = float("-inf")
    records = load["records"]
    ends = sorted(r[3] for r in records if r[5] == "answered")
    last = max((r[3] for r in records), default=load["started"])
    points = [load["started"], *ends, last]
    stall, stall_at, excused = 0.0, 0.0, 0.0
    for a, b in itertools.pairwise(points):
        if a <= end and b >= begin:
            excused = max(excused, b - a)
        elif b - a > stall:
            stall, stall_at = b - a, a - load["started"]
    result["stall_s"], result["stall_at_s"] = round(stall, 2), round(stall_at, 2)
    result["restart_gap_s"] = round(excused, 2)
    if stall > STALL_FLAG:
        problems.append(f"stall of {stall:.1f} s at {stall_at:.1f} s")


def _near_faults(load: dict[str, Any], result: dict[str, Any], restart: dict[str, Any]) -> Any:
    """For each phantom: whether its request was in flight at the PgBouncer restart or at a
    kill of a backend that was running COMMIT (outcomes no library can rule out)."""
    spans = {r[0]: (r[2], r[3]) for r in load["records"]}
    commits = [
        kill["t"]
        for kill in result["kills"]
        if kill.get("state") == "active" and (kill.get("query") or "").startswith("COMMIT")
    ]
    restart_span = (restart.get("t", -1.0), restart.get("t", -1.0) + restart.get("stopped_s", 0))
    found: dict[str, list[str]] = {}
    for item_id in result["phantom"]:
        begin, end = spans.get(item_id, (0.0, 0.0))
        reasons = []
        if begin <= restart_span[1] and end >= restart_span[0]:
            reasons.append("pgbouncer restart")
        if any(begin <= t <= end for t in commits):
            reasons.append("kill during COMMIT")
        found[str(item_id)] = reasons
    return found


def _probe(server: Gunicorn, first: int, count: int, engine: Any) -> dict[str, Any]:
    """After the round: fresh good writes on the shared port (each on a connection of its
    own) must answer 201 and be stored, and every worker's control port must answer."""
    statuses: list[int] = []
    for item_id in range(first, first + count):
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/w/good/{item_id}?flush=1", data=b"", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=40.0) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as failure:
            statuses.append(failure.code)
        except OSError:
            statuses.append(-1)
    stored = stored_ids(engine, first, count)
    silent = [pid for pid, port in server.workers().items() if not _answers(port)]
    problems = []
    if any(status != 201 for status in statuses):
        problems.append(f"after the round, fresh writes answered {statuses}")
    if len(stored) != sum(1 for status in statuses if status == 201):
        problems.append(f"after the round, {len(stored)} of {count} fresh writes stored")
    if silent:
        problems.append(f"after the round, workers {silent} did not answer")
    return {"statuses": statuses, "stored": len(stored), "problems": problems}


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.multiworker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", default="1,2,4", help="comma list of worker counts")
    parser.add_argument("--connections", default="128", help="comma list of client counts")
    parser.add_argument("--seconds", type=float, default=25.0, help="seconds of load per round")
    parser.add_argument("--mode", default="sync", help="sync, async or sync,async")
    parser.add_argument("--app", default="asgi", help="asgi (uvicorn workers), flask (gthread)")
    parser.add_argument("--burst-at", type=float, default=5.0, help="seconds into a round")
    parser.add_argument("--burst-per-worker", type=int, default=31, help="slow requests")
    parser.add_argument("--restart-at", type=float, help="seconds in (default: half way)")
    parser.add_argument("--restart-grace", type=float, default=5.0, help="then SIGKILL")
    parser.add_argument("--bouncer-pool", type=int, default=20, help="PgBouncer pool size")
    parser.add_argument("--mix", default="", help="kind=weight,... (benchmarks.faultload)")
    parser.add_argument("--port", type=int, default=18600)
    parser.add_argument("--python", default=sys.executable, help="server and load interpreter")
    parser.add_argument("--label", default="", help="a name for this run in the output")
    options = parser.parse_args(argv)
    options.workers = [int(w) for w in options.workers.split(",")]
    options.connections = [int(c) for c in options.connections.split(",")]
    options.modes = options.mode.split(",")
    options.apps = options.app.split(",")
    if set(options.apps) - {"asgi", "flask"}:
        parser.error("--app takes asgi and/or flask")
    if set(options.modes) - {"sync", "async"}:
        parser.error("--mode takes sync and/or async")
    if options.mix:
        try:
            parse_mix(options.mix)
        except ValueError as error:
            parser.error(f"--mix: {error}")
    return options


HEADER = ("app", "mode", "conns", "workers", "requests", "req/s", "2xx/s", "lost", "phantom",
          "leaked", "idle-tx", "stall s", "kills", "restart (gap s)", "problems")  # fmt: skip
WIDTHS = (5, 5, 5, 7, 8, 7, 7, 4, 7, 6, 7, 7, 5, 14, 0)


def _row(cells: tuple[str, ...]) -> str:
    return "  ".join(cell.rjust(width) for cell, width in zip(cells, WIDTHS, strict=True))


def _cells(result: dict[str, Any]) -> tuple[str, ...]:
    head = (result["app"], result["mode"], str(result["connections"]), str(result["workers"]))
    if "requests" not in result:
        return (*head, *("-",) * 10, "; ".join(result["problems"]))
    leaked = sum(v for k, v in result["after_drain"].items() if isinstance(v, int))
    restart = result.get("restart", {})
    return (
        *head,
        str(result["requests"]),
        f"{result['req_s']:.0f}",
        f"{result['ok_s']:.0f}",
        str(len(result["lost"])),
        str(len(result["phantom"])),
        str(leaked),
        str(result["idle_in_tx"]),
        f"{result['stall_s']:.1f}",
        str(sum(1 for k in result["kills"] if "pid" in k)),
        f"{restart.get('at_s', '-')}s {restart.get('how', '?')} ({result['restart_gap_s']})",
        "; ".join(result["problems"]) or "ok",
    )


def main(argv: list[str] | None = None) -> int:
    """Run every mode, client count and worker count; 1 if anything failed."""
    options = _options(argv)
    scratch = HERE / "results" / "tmp" / "multiworker"
    chosen = backend("postgresql", scratch, DATABASE)
    chosen.prepare()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data: dict[str, Any] = {
        "label": options.label,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": {k: shown(v) if k == "python" else v for k, v in vars(options).items()},
        "runs": [],
    }
    print(_row(HEADER), flush=True)
    batch = 0
    try:
        for app, mode in [(a, m) for a in options.apps for m in options.modes]:
            if app == "flask" and mode != "sync":
                continue
            for connections in options.connections:
                for workers in options.workers:
                    config = Soak(
                        app=app,
                        workers=workers,
                        connections=connections,
                        seconds=options.seconds,
                        mode=mode,
                        burst_at=options.burst_at,
                        burst_per_worker=options.burst_per_worker,
                        restart_at=options.restart_at,
                        restart_grace=options.restart_grace,
                        bouncer_pool=options.bouncer_pool,
                        mix=options.mix,
                        port=options.port + batch,
                        first_id=SEED_ROWS + 1 + batch * ROUND_IDS,
                        python=options.python,
                    )
                    result = soak(config, chosen, scratch / stamp)
                    data["runs"].append(result)
                    print(_row(_cells(result)), flush=True)
                    batch += 1
    finally:
        path = HERE / "results" / f"{stamp}-multiworker.json"
        # Paths inside the repository (load records, tracebacks in log tails) as relative ones.
        text = json.dumps(data, indent=1, default=str).replace(f"{REPO}{os.sep}", "")
        path.write_text(text + "\n")
        print(f"wrote {path.relative_to(REPO)}", flush=True)
    print(_summary(data["runs"]), flush=True)
    return 1 if any(run["problems"] for run in data["runs"]) else 0


def _summary(runs: list[dict[str, Any]]) -> str:
    """Req/s of each worker count beside workers=1's, per mode and client count."""
    lines = ["", "req/s (complete responses within the load) by workers, vs workers=1:"]
    groups: dict[tuple[str, str, int], dict[int, float]] = {}
    for run in runs:
        if "req_s" in run:
            key = (run["app"], run["mode"], run["connections"])
            groups.setdefault(key, {})[run["workers"]] = run["req_s"]
    for (app, mode, connections), figures in groups.items():
        single = figures.get(1)
        cells = [
            f"w={w}: {r:.0f}" + (f" ({r / single:.2f}x)" if single else "")
            for w, r in sorted(figures.items())
        ]
        lines.append(f"  {app} {mode} {connections} conns: " + ", ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
