"""A real uvicorn server in a thread of its own, for the ASGI end-to-end tests.

The server runs its own event loop (uvicorn's default: uvloop and httptools when installed),
so an async database's connections belong to that loop: let the server's lifespan shutdown
dispose them (``SessionMiddleware`` does), and never touch an async ``db`` from the test's
loop while or after it serves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import uvicorn

from sessionscope._types import ASGIApp


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Served:
    """A running server: where it listens and what uvicorn logged so far."""

    port: int
    records: list[logging.LogRecord] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything uvicorn logged, tracebacks included."""
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        return "\n".join(formatter.format(record) for record in self.records)

    def errors(self) -> list[logging.LogRecord]:
        return [record for record in self.records if record.levelno >= logging.ERROR]


# What uvicorn logs when an app breaks the ASGI message order.
PROTOCOL_ERRORS = ("Unexpected ASGI message", "ASGI callable returned without")


@asynccontextmanager
async def serve(app: ASGIApp, **config: object) -> AsyncIterator[Served]:
    """Serve ``app`` with uvicorn on a free loopback port; stop it, lifespan included, at exit."""
    handler = _Records()
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(handler)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan="on",
            log_level="warning",
            log_config=None,
            timeout_graceful_shutdown=5,
            **config,  # type: ignore[arg-type]
        )
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # pragma: no cover - reported by the test below
            failure.append(exc)

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {failure!r}\n{handler.records!r}")
            await anyio.sleep(0.01)
        port = int(server.servers[0].sockets[0].getsockname()[1])
        yield Served(port, handler.records)
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join, 30)
        uvicorn_logger.removeHandler(handler)
        if thread.is_alive():  # pragma: no cover
            raise RuntimeError("uvicorn did not stop within 30 s")
    if failure:  # pragma: no cover
        raise failure[0]


async def wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition``: the server finishes a request after the client has its answer."""
    with anyio.fail_after(within):
        # Polled: the condition changes on the server's thread, which cannot set an Event here.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)
