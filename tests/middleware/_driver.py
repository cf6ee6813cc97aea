"""A raw ASGI driver: hand-made scope, receive and send, for timing the tests control."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from sessionscope._types import ASGIApp, Message


@dataclass
class Exchange:
    """What the app sent, and a switch that makes ``receive`` report a disconnect."""

    sent: list[Message] = field(default_factory=list)
    disconnect: anyio.Event = field(default_factory=anyio.Event)

    @property
    def status(self) -> int | None:
        for message in self.sent:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    @property
    def complete(self) -> bool:
        """Whether a final body message (``more_body`` false) was sent."""
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent
        )


def http_scope(method: str, target: str, **extra: Any) -> dict[str, Any]:
    path, _, query = target.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "extensions": {},
        **extra,
    }


async def call(
    app: ASGIApp,
    method: str,
    target: str,
    exchange: Exchange | None = None,
    on_send: Callable[[Message], Awaitable[None]] | None = None,
    **scope_extra: Any,
) -> Exchange:
    """Call ``app`` once; ``receive`` gives the (empty) body, then waits for a disconnect."""
    exchange = exchange if exchange is not None else Exchange()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await exchange.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        exchange.sent.append(message)
        if on_send is not None:
            await on_send(message)

    await app(http_scope(method, target, **scope_extra), receive, send)
    return exchange
