"""Shared fixtures: a simulated Ollama on loopback, settings in a temporary data dir, batch-file writers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from obatch.config import Settings
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from tests.serverkit import obatch_server, obatch_sim  # noqa: F401  (session fixtures of the server tests)

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(url: str | None = None, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data", "backend": "ollama", "retry_initial_wait": 0.01,
            "retry_max_wait": 0.05, "commit_interval": 0.05,
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
