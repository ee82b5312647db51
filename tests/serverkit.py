"""Server test kit: a simulated Ollama in a thread, real ``obatch serve`` subprocesses (obatch/testing/server.py),
batch-file helpers.

The session fixtures ``obatch_sim``, ``obatch_server`` and ``obatch_server_pg`` are imported by ``tests/conftest.py``,
so one sim and one server per database (API keys set, small limits, a 1 s minimum completion window) serve every
server test file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from obatch.testing.server import ServerProcess, serve_env, serving
from obatch.testing.server import free_port as free_port  # the browser tests take theirs from here

CHAT = "llama3.2:1b"
EMBED = "nomic-embed-text"
KEYS = {name: f"sk-test-{name}-0123456789abcdef" for name in ("alice", "bob", "carol", "dave")}
ADMIN_KEY = "sk-test-admin-0123456789abcdef"  # OBATCH_ADMIN_KEYS of the shared server
FINAL = ("completed", "failed", "expired", "cancelled")
MAX_FILE_BYTES = 200_000
MAX_LINES = 500
DECODE_TPS = 200.0  # sim decode speed: max_tokens=4 takes 20 ms, max_tokens=240 about 1.2 s (answers are long)


def server_env(data_dir: Path, sim_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a test server's child: the simulator as its backend, fast retries and commits."""
    values: dict[str, Any] = {
        "backend": "ollama", "ollama_url": sim_url, "concurrency": 4,
        "commit_interval": 0.1, "retry_initial_wait": 0.01, "retry_max_wait": 0.05, "max_attempts": 2,
        "worker_poll_interval": 0.25, "log_level": "INFO",
        "lease_ttl": 3.0, "lease_heartbeat": 0.5,  # a killed server's batches are taken over after 3 s
    }
    return serve_env(data_dir, **(values | settings))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def obatch_sim() -> Iterator[OllamaSim]:
    sim = OllamaSim(SimConfig(num_parallel=4, decode_tps=DECODE_TPS, default_output_tokens=2000))
    _, stop = run_in_thread(sim=sim)
    try:
        yield sim
    finally:
        stop()


def _shared_server(sim: OllamaSim, data_dir: Path, database_url: str | None = None) -> Iterator[ServerProcess]:
    env = server_env(data_dir, sim.url, api_keys=",".join(KEYS.values()), admin_keys=ADMIN_KEY,
                     max_file_bytes=MAX_FILE_BYTES, max_lines=MAX_LINES, min_completion_window=1,
                     rate_limit_per_minute=100_000, address_rate_limit_per_minute=100_000,
                     auth_failures_per_minute=100_000, min_file_expiry=1, file_sweep_interval=0.5,
                     database_url=database_url)
    with serving(data_dir, env) as server:
        yield server


@pytest.fixture(scope="session")
def obatch_server(obatch_sim: OllamaSim, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _shared_server(obatch_sim, tmp_path_factory.mktemp("server") / "data")


@pytest.fixture(scope="session")
def obatch_server_pg(obatch_sim: OllamaSim, tmp_path_factory: pytest.TempPathFactory, postgres: Any
                     ) -> Iterator[ServerProcess]:
    """The same server with its store on PostgreSQL (``postgres``: the session's server, testing/postgres.py)."""
    yield from _shared_server(obatch_sim, tmp_path_factory.mktemp("server-pg") / "data", postgres.create_database())


# --------------------------------------------------------------------------------------- batch files


def chat_line(custom_id: str, *, max_tokens: int = 4, model: str = CHAT, content: str | None = None
              ) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content or f"Say {custom_id}."}],
                     "max_tokens": max_tokens}}


def embed_line(custom_id: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": EMBED, "input": f"text {custom_id}"}}


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def assert_exactly_once(expected: Iterable[str], output: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
    """Every input custom_id in exactly one line of the two files; successes in one, failures in the other."""
    seen = [line["custom_id"] for line in output + errors]
    assert sorted(seen) == sorted(expected), "a custom_id is missing or doubled"
    assert all(line["response"] and line["response"]["status_code"] == 200 and line["error"] is None
               for line in output)
    assert all(line["error"] and line["error"]["code"] for line in errors)


async def settled(api: Any, batch_id: str, *, headers: dict[str, str] | None = None, within: float = 30.0,
                  pause: float = 0.05) -> dict[str, Any]:
    """Poll an in-process server (a test client) until the batch reaches a final status; returns the batch object."""
    deadline = time.monotonic() + within
    while True:
        batch: dict[str, Any] = (await api.get(f"/v1/batches/{batch_id}", headers=headers)).json()
        if batch["status"] in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch['status']}"
        await asyncio.sleep(pause)


def assert_openai_error(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    """A 4xx answered in OpenAI's error shape; returns the ``error`` object."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    return dict(error)
