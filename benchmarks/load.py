"""The load generator: ``wrk`` pinned to its own core, driven by ``lua/bench.lua``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["ensure_command", "ensure_wrk", "run_wrk"]

SCRIPT = Path(__file__).resolve().parent / "lua" / "bench.lua"


def ensure_wrk() -> str:
    """The path of ``wrk``, installed from Debian's packages if it is missing."""
    return ensure_command("wrk", "wrk")


def ensure_command(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` if it is missing."""
    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(
            f"'{command}' is not installed and this is not root, so it cannot be installed"
            f" here. Run 'sudo apt-get install -y {package}' (Debian/Ubuntu) and start again."
        )
    print(
        f"Installing {command} from Debian's packages (apt-get install -y {package})...", flush=True
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
    found = shutil.which(command)
    if not found:
        raise RuntimeError(
            f"'apt-get install {package}' finished but '{command}' is still not on PATH."
        )
    return found


def run_wrk(
    port: int,
    workload: str,
    connections: int,
    duration: float,
    *,
    core: int,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Run one bounded load against ``127.0.0.1:port`` and return wrk's figures.

    wrk always runs for the whole ``duration`` (whole seconds). Raises ``RuntimeError``
    with wrk's output if it printed no result.
    """
    command = [
        "taskset",
        "-c",
        str(core),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout:g}s",
        "-s",
        str(SCRIPT),
        f"http://127.0.0.1:{port}/",
        "--",
        workload,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 120, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCHJSON "))
            return result
    raise RuntimeError(
        f"wrk printed no result (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}"
    )
