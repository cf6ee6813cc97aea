"""The docs' "Retrying a request that lost a race" example, run as written through uvicorn."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy.orm import Session

from sessionscope import Database

from ._uvicorn import serve
from .conftest import assert_no_leaks

pytestmark = pytest.mark.anyio

REQUESTS = 8


def _readme_block(heading: str) -> str:
    """The first Python block of docs/configuration.md's section ``heading``."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    section = readme.split(f"\n{heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_readme_retry_example_stores_every_reservation_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Concurrent reservations race on the SQLite file (its reads run in parallel): some
    lose and run again, and every one of them is stored exactly once."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="sessionscope")
    namespace: dict[str, Any] = {}
    exec(
        compile(
            _readme_block("## Retrying a request that lost a race"),
            "docs/configuration.md",
            "exec",
        ),
        namespace,
    )
    db: Database[Session] = namespace["db"]
    answers: list[httpx.Response] = []
    async with serve(namespace["app"]) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:

            async def reserve() -> None:
                answers.append(await client.post("/reserve"))

            async with anyio.create_task_group() as group:
                for _ in range(REQUESTS):
                    group.start_soon(reserve)
        assert not served.errors(), served.log()
    assert sorted(answer.status_code for answer in answers) == [201] * REQUESTS
    lefts = sorted(answer.json()["left"] for answer in answers)
    # Each reservation saw the stock the previous one left: none was applied twice or lost.
    assert lefts == list(range(100 - REQUESTS, 100))
    retried = [m for m in caplog.messages if "lost a race" in m and "POST /reserve" in m]
    attempts = [answer.json()["attempt"] for answer in answers]
    # The races are real: some request ran again, and its answer says which attempt won.
    assert max(attempts) > 1, attempts
    assert len(retried) == sum(attempt - 1 for attempt in attempts)
    assert_no_leaks(db)
    db.dispose()
    with sqlite3.connect(tmp_path / "stock.sqlite3") as connection:
        assert connection.execute("SELECT n FROM stock").fetchall() == [(100 - REQUESTS,)]
    connection.close()
