"""Shared fixtures: a simulated Ollama on loopback, settings in a temporary data dir, batch-file writers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from obatch.config import Settings
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from obatch.testing.postgres import PostgresServer, postgres_server
from tests.browser import browser, stack  # noqa: F401  (module fixtures of the browser tests)
from tests.serverkit import obatch_server, obatch_server_pg, obatch_sim  # noqa: F401  (session fixtures of the server tests)

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (each test that uses it gets its own database)."""
    yield from postgres_server()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """The store a test runs on: None (the default SQLite file in the data dir) or a fresh PostgreSQL database.
    Tests that touch the store ask for it (or ``pytest.mark.usefixtures("db_url")``); ``make_settings`` follows it."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def make_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Settings]:
    database_url = request.getfixturevalue("db_url") if "db_url" in request.fixturenames else None

    def build(url: str | None = None, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data", "backend": "ollama", "retry_initial_wait": 0.01,
            "retry_max_wait": 0.05, "commit_interval": 0.05, "database_url": database_url,
        }
        if url:
            values["ollama_url"] = url
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


@pytest.fixture
async def sim() -> AsyncIterator[OllamaSim]:
    async with OllamaSim(SimConfig(num_parallel=4)) as server:
        yield server
