"""Which variants exist, which app builds each, and which Python environment runs it.

A variant is one way to get a request-scoped session: the hand-written baseline, the
baseline behind one empty middleware, sessionscope, or a peer library. Each has a mode
(``sync``: psycopg 3 / pysqlite, ``async``: asyncpg / aiosqlite) and is compared with the
baseline of the same mode and driver, measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASELINE", "PEERS", "VARIANTS", "Peer", "Variant", "baseline_of"]

BASELINE = "baseline"


@dataclass(frozen=True)
class Peer:
    """A peer library installed from PyPI into the peers' own virtual environment."""

    name: str
    requirement: str
    import_name: str


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("fastapi-sqlalchemy", "fastapi-sqlalchemy", "fastapi_sqlalchemy"),
        Peer("fastapi-async-sqlalchemy", "fastapi-async-sqlalchemy", "fastapi_async_sqlalchemy"),
        Peer("fastapi-sqla", "fastapi-sqla", "fastapi_sqla"),
        Peer("advanced-alchemy", "advanced-alchemy", "advanced_alchemy"),
        Peer("asgi-sqlalchemy", "asgi-sqlalchemy", "asgi_sqlalchemy"),
    )
}


@dataclass(frozen=True)
class Variant:
    """One server configuration under test.

    :param name: unique label, e.g. ``sessionscope-async``.
    :param family: ``baseline``, ``layer``, ``sessionscope`` or the peer's name.
    :param mode: ``sync`` or ``async``.
    :param factory: ``module:function`` building the app from ``(url, mode)``.
    :param peer: the peer package it needs, if any (then it runs in the peers' venv).
    :param server: ``uvicorn`` (ASGI); ``gunicorn`` is reserved for the WSGI variants.
    """

    name: str
    family: str
    mode: str
    factory: str
    peer: str | None = None
    server: str = "uvicorn"

    @property
    def is_baseline(self) -> bool:
        """Whether this is the baseline its mode's ratios are computed against."""
        return self.family == BASELINE


def _variants() -> list[Variant]:
    apps = "benchmarks.apps."
    found: list[Variant] = []
    for mode in ("sync", "async"):
        found += [
            Variant(f"baseline-{mode}", BASELINE, mode, apps + "baseline:build"),
            Variant(f"empty-mw-{mode}", "layer", mode, apps + "baseline:build_layered"),
            Variant(f"sessionscope-{mode}", "sessionscope", mode, apps + "sessionscope_app:build"),
        ]
    peer_modes = {
        "fastapi-sqlalchemy": ("sync",),
        "fastapi-async-sqlalchemy": ("async",),
        "fastapi-sqla": ("sync", "async"),
        "advanced-alchemy": ("sync", "async"),
        "asgi-sqlalchemy": ("async",),
    }
    for peer, modes in peer_modes.items():
        module = apps + "peer_" + PEERS[peer].import_name
        for mode in modes:
            found.append(Variant(f"{peer}-{mode}", peer, mode, module + ":build", peer=peer))
    return found


VARIANTS: dict[str, Variant] = {variant.name: variant for variant in _variants()}


def baseline_of(variant: Variant) -> Variant:
    """The baseline a variant's ratios are computed against: same mode, same driver."""
    return VARIANTS[f"baseline-{variant.mode}"]
