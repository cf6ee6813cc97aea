"""The benchmark databases: creating, seeding, resetting and inspecting them.

SQLite is a file in WAL mode under ``benchmarks/results/tmp``; PostgreSQL is the server on
127.0.0.1:5432 (user ``postgres``, trust auth) with a database of our own,
``sessionscope_bench`` (the fault soak's: ``sessionscope_faults``), created if missing. The
harness talks to both through SQLAlchemy's sync drivers; the servers under test use the
driver of their mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, delete, func, select, text
from sqlalchemy.orm import Session

from .apps.shared import FAIL_NAME, SEED_ROWS, Base, Item

__all__ = ["PG_DATABASE", "Backend", "backend"]

PG_DATABASE = "sessionscope_bench"
PG_SERVER = "postgres@127.0.0.1:5432"
LOAD_NAME = "load"


@dataclass(frozen=True)
class Backend:
    """One database backend: its URLs per mode and the harness's own engine on it."""

    name: str
    sync_url: str
    async_url: str
    database: str = PG_DATABASE

    def url(self, mode: str) -> str:
        """The URL the servers of ``mode`` use."""
        return self.sync_url if mode == "sync" else self.async_url

    def engine(self) -> Engine:
        """A small engine for the harness (seeding, counting, resetting)."""
        return create_engine(self.sync_url, pool_size=1, max_overflow=0)

    def prepare(self) -> None:
        """Create the database if needed and seed ``SEED_ROWS`` rows into a fresh table."""
        if self.name == "postgresql":
            admin = create_engine(
                f"postgresql+psycopg://{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT"
            )
            with admin.connect() as connection:
                exists = connection.scalar(
                    text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": self.database}
                )
                if not exists:
                    connection.execute(text(f'CREATE DATABASE "{self.database}"'))
            admin.dispose()
        engine = self.engine()
        try:
            if self.name == "sqlite":
                with engine.connect() as connection:
                    connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            Base.metadata.drop_all(engine)
            Base.metadata.create_all(engine)
            with Session(engine) as session, session.begin():
                session.add_all(Item(id=i, name=f"item-{i}") for i in range(1, SEED_ROWS + 1))
            if self.name == "postgresql":
                with engine.connect() as connection:
                    connection.execute(
                        text("SELECT setval(pg_get_serial_sequence('bench_item', 'id'), :n)"),
                        {"n": SEED_ROWS},
                    )
                    connection.commit()
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.exec_driver_sql("VACUUM ANALYZE bench_item")
        finally:
            engine.dispose()

    def written_ids(self, engine: Engine) -> set[int]:
        """Ids of the rows ``POST /items`` wrote since the last reset."""
        with engine.connect() as connection:
            rows = connection.scalars(
                select(Item.id).where(Item.id > SEED_ROWS, Item.name == LOAD_NAME)
            )
            return set(rows)

    def fail_rows(self, engine: Engine) -> int:
        """Rows ``GET /fail`` wrote that survived: must be 0."""
        with engine.connect() as connection:
            return int(
                connection.scalar(
                    select(func.count()).select_from(Item).where(Item.name == FAIL_NAME)
                )
                or 0
            )

    def idle_in_transaction(self, engine: Engine, client_ports: set[int] | None = None) -> int:
        """PostgreSQL backends of our database left ``idle in transaction`` (0 on SQLite).

        With ``client_ports``, only the backends serving connections from those local ports
        count: one server's, not those of another variant left running or wedged.
        """
        if self.name != "postgresql":
            return 0
        with engine.connect() as connection:
            found = connection.execute(
                text(
                    "SELECT client_port FROM pg_stat_activity WHERE datname = :name"
                    " AND state LIKE 'idle in transaction%'"
                ),
                {"name": self.database},
            )
            ports = [port for (port,) in found]
        if client_ports is not None:
            ports = [port for port in ports if port in client_ports]
        return len(ports)

    def reset(self, engine: Engine) -> None:
        """Delete what runs wrote, so every run starts from the seeded table."""
        with engine.connect() as connection:
            connection.execute(delete(Item).where(Item.id > SEED_ROWS))
            connection.commit()
            if self.name == "sqlite":
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def backend(name: str, scratch: Path, database: str = PG_DATABASE) -> Backend:
    """The backend called ``name`` (``sqlite`` or ``postgresql``).

    ``database`` names the PostgreSQL database; SQLite's file is ``bench.sqlite3`` in
    ``scratch``.
    """
    if name == "sqlite":
        path = (scratch / "bench.sqlite3").resolve()
        return Backend("sqlite", f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}")
    if name == "postgresql":
        tail = f"{PG_SERVER}/{database}"
        return Backend(
            "postgresql", f"postgresql+psycopg://{tail}", f"postgresql+asyncpg://{tail}", database
        )
    raise ValueError(f"Unknown backend {name!r}; use 'sqlite' or 'postgresql'.")
