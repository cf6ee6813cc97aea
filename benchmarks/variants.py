"""Which variants exist, which app builds each, and which Python environment runs it.

A variant is one way to get a request-scoped session: a hand-written baseline, the
baseline behind one empty middleware, sessionscope, or a peer library. Each has a mode
(``sync``: psycopg 3 / pysqlite, ``async``: asyncpg / aiosqlite) and a server: the ASGI
variants run under uvicorn, the WSGI ones (Flask) under gunicorn. Each is compared with the
baseline of the same server and mode (and so driver), measured in the same run:
``baseline-sync`` / ``baseline-async`` (bare Starlette) for the ASGI side,
``flask-baseline-sync`` (bare Flask) for the WSGI side.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BASELINE",
    "BASELINES",
    "FAULT_VARIANTS",
    "FLASK_BASELINE",
    "PEERS",
    "VARIANTS",
    "Peer",
    "Variant",
    "baseline_of",
]

BASELINE = "baseline"
"""The family of the ASGI baselines (bare Starlette, one per mode)."""
FLASK_BASELINE = "flask-baseline"
"""The family of the WSGI baseline (bare Flask, sync)."""
BASELINES = {"uvicorn": BASELINE, "gunicorn": FLASK_BASELINE}
"""The baseline family of each server's side."""


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
        Peer("flask-sqlalchemy", "flask-sqlalchemy", "flask_sqlalchemy"),
        Peer("flask-sqlalchemy-lite", "flask-sqlalchemy-lite", "flask_sqlalchemy_lite"),
    )
}


@dataclass(frozen=True)
class Variant:
    """One server configuration under test.

    :param name: unique label, e.g. ``sessionscope-async``.
    :param family: ``baseline``, ``layer``, ``sessionscope``, ``flask-baseline``,
        ``sessionscope-flask`` or the peer's name.
    :param mode: ``sync`` or ``async``.
    :param factory: ``module:function`` building the app from ``(url, mode)``.
    :param peer: the peer package it needs, if any (then it runs in the peers' venv).
    :param server: ``uvicorn`` (ASGI app) or ``gunicorn`` (WSGI app).
    :param quick: whether ``--quick`` runs it.
    """

    name: str
    family: str
    mode: str
    factory: str
    peer: str | None = None
    server: str = "uvicorn"
    quick: bool = True

    @property
    def side(self) -> str:
        """``asgi`` or ``wsgi``: the variants of one side are compared with each other."""
        return "wsgi" if self.server == "gunicorn" else "asgi"

    @property
    def is_baseline(self) -> bool:
        """Whether this is the baseline its side's and mode's ratios are computed against."""
        return self.family == BASELINES[self.server]


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
    # The WSGI side: Flask apps under gunicorn, sync drivers only. --quick leaves out
    # Flask-SQLAlchemy-Lite to stay within its time budget.
    wsgi: dict[str, tuple[str, str | None, bool]] = {
        FLASK_BASELINE: ("wsgi_baseline", None, True),
        "sessionscope-flask": ("wsgi_sessionscope", None, True),
        "flask-sqlalchemy": ("wsgi_peer_flask_sqlalchemy", "flask-sqlalchemy", True),
        "flask-sqlalchemy-lite": (
            "wsgi_peer_flask_sqlalchemy_lite",
            "flask-sqlalchemy-lite",
            False,
        ),
    }
    for family, (module, wsgi_peer, quick) in wsgi.items():
        found.append(
            Variant(
                f"{family}-sync",
                family,
                "sync",
                apps + module + ":build",
                peer=wsgi_peer,
                server="gunicorn",
                quick=quick,
            )
        )
    return found


VARIANTS: dict[str, Variant] = {variant.name: variant for variant in _variants()}


FAULT_VARIANTS: dict[str, Variant] = {
    f"faults-{mode}": Variant(f"faults-{mode}", "faults", mode, "benchmarks.apps.faults_app:build")
    for mode in ("sync", "async")
}
"""The fault soak's apps (``benchmarks.faults``): served by ``benchmarks.serve`` like the
variants, but never part of the comparison, so not in ``VARIANTS``."""


def baseline_of(variant: Variant) -> Variant:
    """The baseline a variant's ratios are computed against: same server, mode and driver."""
    return VARIANTS[f"{BASELINES[variant.server]}-{variant.mode}"]
