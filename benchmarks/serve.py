"""Run one variant's app under uvicorn: ``python -m benchmarks.serve VARIANT URL PORT``.

The harness starts this in the right virtual environment (the project's, or the peers'),
pinned to one core, one worker, and stops it by pid. Uvicorn runs in this very process, so
``/proc/<pid>`` of the process the harness started is the server's.
"""

from __future__ import annotations

import argparse
import importlib
import logging

import uvicorn

from .variants import FAULT_VARIANTS, VARIANTS

__all__ = ["main"]


def main() -> None:
    """Build the variant's app and serve it on 127.0.0.1 until interrupted."""
    known = {**VARIANTS, **FAULT_VARIANTS}
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", choices=sorted(known))
    parser.add_argument("url")
    parser.add_argument("port", type=int)
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--http", default="httptools")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    variant = known[args.variant]
    module_name, _, function = variant.factory.partition(":")
    build = getattr(importlib.import_module(module_name), function)
    app = build(args.url, variant.mode)
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop=args.loop,
        http=args.http,
        workers=1,
        access_log=False,
        log_level=args.log_level,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
