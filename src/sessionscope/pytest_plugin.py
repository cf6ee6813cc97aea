"""sessionscope's pytest plugin: every test in its own transaction, rolled back.

pytest loads it from the ``pytest11`` entry point once sessionscope is installed (or list it
in ``pytest_plugins = ["sessionscope.pytest_plugin"]``). It only adds fixtures, a marker and
an ini option: nothing is isolated until a test uses ``isolated_db`` or
``async_isolated_db``, and ``-p no:sessionscope`` leaves it out altogether.

- ``isolated_db``: the test runs inside ``with isolated(db):`` (a synchronous driver).
- ``async_isolated_db``: inside ``async with isolated(db):`` (an async driver), on the
  test's event loop as run by anyio's pytest plugin (``@pytest.mark.anyio``).
- The database is ``sessionscope.db`` unless the ini option ``sessionscope_database``
  names another (``"myapp.models:db"``), or a ``sessionscope_database`` fixture of the
  project's returns it.
- ``@pytest.mark.sessionscope_commits`` runs a test without isolation: its units commit
  for real (tests of ``db.after_commit`` with a real COMMIT, say); the fixtures then give
  ``None``.

```python
# conftest.py
import pytest

@pytest.fixture(autouse=True)
def _each_test_rolled_back(isolated_db):
    yield
```
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ._core import Database
from .testing import Isolation, isolated

__all__ = ["async_isolated_db", "isolated_db", "sessionscope_database"]

MARKER = "sessionscope_commits"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "sessionscope_database",
        "'module:attribute' naming the Database that 'isolated_db' isolates"
        " (default: sessionscope.db)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: run the test without sessionscope's isolation; its units commit for real",
    )


@pytest.fixture
def sessionscope_database(request: pytest.FixtureRequest) -> Database[Any]:
    """The ``Database`` the isolation fixtures apply to (see the ini option)."""
    spec = str(request.config.getini("sessionscope_database") or "")
    if not spec:
        import sessionscope

        return sessionscope.db
    module_name, _, path = spec.partition(":")
    if not module_name or not path:
        raise pytest.UsageError(
            f"The ini option 'sessionscope_database' is {spec!r}; give it as"
            " 'module:attribute', for example 'myapp.models:db'."
        )
    found: Any = importlib.import_module(module_name)
    for name in path.split("."):
        found = getattr(found, name)
    if not isinstance(found, Database):
        raise pytest.UsageError(
            f"The ini option 'sessionscope_database' names {spec!r}, which is a"
            f" {type(found).__name__}, not a sessionscope Database."
        )
    return found


def _opted_out(request: pytest.FixtureRequest) -> bool:
    return request.node.get_closest_marker(MARKER) is not None


@pytest.fixture
def isolated_db(
    request: pytest.FixtureRequest, sessionscope_database: Database[Any]
) -> Iterator[Isolation | None]:
    """Run the test inside ``with isolated(db):``; ``None`` for a test marked
    ``sessionscope_commits``."""
    if _opted_out(request):
        yield None
        return
    if sessionscope_database.is_async:
        raise pytest.UsageError(
            f"{sessionscope_database!r} uses an async driver: use the 'async_isolated_db'"
            " fixture in an async test ('@pytest.mark.anyio'), with a client on the test's"
            " event loop ('httpx.AsyncClient(transport=httpx.ASGITransport(app))')."
        )
    with isolated(sessionscope_database) as isolation:
        yield isolation


@pytest.fixture
async def async_isolated_db(
    request: pytest.FixtureRequest, sessionscope_database: Database[Any], anyio_backend: Any
) -> AsyncIterator[Isolation | None]:
    """Run the test inside ``async with isolated(db):``; ``None`` for a test marked
    ``sessionscope_commits``."""
    if _opted_out(request):
        yield None
        return
    if not sessionscope_database.is_async:
        raise pytest.UsageError(
            f"{sessionscope_database!r} uses a synchronous driver: use the 'isolated_db' fixture."
        )
    async with isolated(sessionscope_database) as isolation:
        yield isolation
