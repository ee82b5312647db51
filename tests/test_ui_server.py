"""What the UI's Models page and sidebar read from the server, in process (Litestar's test client): a model's
trained context in ``/v1/models`` though the API process never ran it, and engine hosts that ``/health`` reports
down while no host answers (whatever the batches saw last)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from obatch.config import Settings
from obatch.server import create_app
from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from obatch.testing.server import free_port


def settings(tmp_path: Path, url: str) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", rate_limit_per_minute=0,  # type: ignore[call-arg]
                    backend="ollama", ollama_url=url, batch_worker="thread")


async def answering(client: AsyncTestClient[Any]) -> None:
    """Until the server's probe has found the engine (its first probe may outlast the grace /health waits)."""
    for _ in range(100):
        if (await client.get("/health")).json()["backend"]["reachable"]:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the engine never answered the server's probe")


async def test_models_carry_the_trained_context_the_engine_reports(tmp_path: Path) -> None:
    """Ollama's /api/tags has no context length; /api/show has it. /v1/models answered null for every model."""
    sim = OllamaSim(SimConfig())
    url, stop = run_in_thread(sim=sim)  # its own loop: the test client's requests block this one
    try:
        trained = {m.name: m.context_length for m in sim.config.models}
        async with AsyncTestClient(create_app(settings(tmp_path, url))) as client:
            await answering(client)
            listed = (await client.get("/v1/models")).json()["data"]
            again = (await client.get("/v1/models")).json()["data"]
    finally:
        stop()
    assert {m["id"].removesuffix(":latest"): m["context_length"] for m in listed} == trained  # as Ollama names them
    assert len(set(trained.values())) > 1 and all(trained.values())  # the sim's models differ: no constant passes
    assert again == listed
    assert sim.stats.requests["/api/show"] == len(trained)  # asked once per model, then the backend's cache


async def test_hosts_are_down_while_no_host_answers(tmp_path: Path) -> None:
    refused = f"http://127.0.0.1:{free_port()}"
    async with AsyncTestClient(create_app(settings(tmp_path, refused))) as client:
        report = (await client.get("/health")).json()
    backend = report["backend"]
    assert backend["reachable"] is False and backend["error"] == f"connection refused at {refused}"
    assert [(h["url"], h["state"], h["error"]) for h in backend["hosts"]] == [(refused, "down", backend["error"])]
