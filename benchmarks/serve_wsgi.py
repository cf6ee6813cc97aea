"""Run one WSGI variant's app under gunicorn: ``python -m benchmarks.serve_wsgi VARIANT URL PORT``.

The harness starts this in the right virtual environment (the project's, or the peers'),
pinned to one core, and stops it by pid. This process becomes gunicorn's master (the
arbiter); it forks one ``gthread`` worker that builds the app (no ``preload_app``, so the
engine and its pool are created in the process that uses them) and serves it with
``--threads`` threads. The worker inherits the core pinning. Because the requests are
served by the worker, the harness reads CPU time over the whole process tree and memory
from the worker (see ``benchmarks.servers``).

SIGTERM stops gunicorn gracefully (in-flight requests finish, at most ``graceful_timeout``
seconds), SIGINT quickly.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from gunicorn.app.base import BaseApplication

from .servers import GUNICORN_THREADS
from .variants import VARIANTS

__all__ = ["GRACEFUL_TIMEOUT", "main"]

GRACEFUL_TIMEOUT = 5
"""Seconds gunicorn gives the worker to finish after SIGTERM before it kills it."""


class _Server(BaseApplication):  # type: ignore[misc]
    """gunicorn run programmatically: options from a dict, the app from the variant."""

    def __init__(self, variant: str, url: str, options: dict[str, Any]) -> None:
        self._variant = VARIANTS[variant]
        self._url = url
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        """Apply the options (gunicorn calls this from its constructor)."""
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """Build the variant's WSGI app; gunicorn calls this in the worker."""
        module_name, _, function = self._variant.factory.partition(":")
        build = getattr(importlib.import_module(module_name), function)
        return build(self._url, self._variant.mode)


def options(port: int, threads: int, log_level: str) -> dict[str, Any]:
    """The gunicorn settings every WSGI variant runs with."""
    return {
        "bind": f"127.0.0.1:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        "preload_app": False,
        # The pure-Python HTTP parser whatever is installed, so that the project's venv and
        # the peers' cannot differ in it.
        "http_parser": "python",
        "graceful_timeout": GRACEFUL_TIMEOUT,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": log_level,
        # No control socket: one fixed path per user, which parallel servers would share.
        "control_socket_disable": True,
    }


def main() -> None:
    """Build the variant's app in gunicorn's worker and serve it on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "variant", choices=sorted(name for name, v in VARIANTS.items() if v.server == "gunicorn")
    )
    parser.add_argument("url")
    parser.add_argument("port", type=int)
    parser.add_argument("--threads", type=int, default=GUNICORN_THREADS)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    _Server(args.variant, args.url, options(args.port, args.threads, args.log_level)).run()


if __name__ == "__main__":
    main()
