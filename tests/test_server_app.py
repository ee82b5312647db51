"""The app factory in process (Litestar's test client, an injected backend): what a subprocess cannot show cheaply —
an engine failing mid-stream, an unreachable engine, two apps side by side, an injected backend left open."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from litestar.testing import AsyncTestClient

from obatch import errors
from obatch.backends.base import ModelInfo, Result, chat_chunk
from obatch.backends.ollama import OllamaBackend
from obatch.config import Settings
from obatch.server import create_app
from obatch.testing.server import free_port


class FlakyBackend:
    """Streams one chunk and then fails; its version() fails when ``down``."""

    name = "fake"

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.closed = False

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        raise errors.ServerBusyError("busy")

    async def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        if body["model"] == "missing":
            raise errors.ModelNotFoundError("model 'missing' not found")
        yield chat_chunk("c1", body["model"], 0, {"role": "assistant", "content": "Hel"})
        raise errors.TransientError("The engine failed mid-stream: boom")

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="m")]

    async def show(self, model: str) -> ModelInfo:
        return ModelInfo(id=model)

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None) -> float:
        return 0.0

    async def slots(self) -> int | None:
        return None

    async def version(self) -> str | None:
        if self.down:
            raise errors.TransientError("Connection to the engine failed")
        return "1"

    async def aclose(self) -> None:
        self.closed = True


def settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", rate_limit_per_minute=0)  # type: ignore[call-arg]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_stream_error_after_the_first_chunk_is_an_sse_error_event(tmp_path: Path) -> None:
    backend = FlakyBackend()
    async with AsyncTestClient(create_app(settings(tmp_path), backend=backend)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
        assert orjson.loads(events[-1])["error"]["message"].endswith("boom")

        before = await client.post("/v1/chat/completions", json={**CHAT, "model": "missing"})
        assert before.status_code == 404 and before.json()["error"]["code"] == "model_not_found"
        busy = await client.post("/v1/chat/completions", json={**CHAT, "stream": False})
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_error"
    assert not backend.closed  # an injected backend belongs to the caller


@pytest.mark.parametrize("down", [False, True])
async def test_health_reports_the_backend(tmp_path: Path, down: bool) -> None:
    async with AsyncTestClient(create_app(settings(tmp_path), backend=FlakyBackend(down=down))) as client:
        report = (await client.get("/health")).json()
    assert report["db"] == "ok"
    assert report["status"] == ("degraded" if down else "ok")
    assert report["backend"]["reachable"] is not down


async def test_two_apps_keep_separate_metrics(tmp_path: Path) -> None:
    first, second = create_app(settings(tmp_path / "a"), backend=FlakyBackend()), \
        create_app(settings(tmp_path / "b"), backend=FlakyBackend())
    async with AsyncTestClient(first) as one, AsyncTestClient(second) as two:
        for _ in range(3):
            await one.get("/v1/models")
        text_one, text_two = (await one.get("/metrics")).text, (await two.get("/metrics")).text
    assert 'obatch_http_requests_total{method="GET",route="/v1/models",status="200"} 3.0' in text_one
    assert 'route="/v1/models"' not in text_two


@pytest.mark.parametrize("batch_worker", ["process", "thread"])
async def test_the_server_drives_a_pool_of_hosts_with_auto_concurrency(tmp_path: Path, batch_worker: str) -> None:
    """Two engine hosts in OBATCH_OLLAMA_URL: /health shows each with its level; a batch uses both (batches in a
    child process, or on a loop of their own)."""
    from obatch.testing.ollama_sim import OllamaSim, SimConfig
    from tests.helpers import chat_line, jsonl
    from tests.serverkit import settled

    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as one, \
            OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as two:
        config = Settings(_env_file=None, data_dir=tmp_path / "data", rate_limit_per_minute=0,  # type: ignore[call-arg]
                          backend="ollama", ollama_url=f"{one.url},{two.url}", worker_poll_interval=0.1,
                          batch_worker=batch_worker)
        async with AsyncTestClient(create_app(config)) as client:
            hosts = (await client.get("/health")).json()["backend"]["hosts"]
            assert [h["url"] for h in hosts] == [one.url, two.url]
            assert all(h["auto"] and h["state"] == "up" for h in hosts)
            upload = await client.post("/v1/files", data={"purpose": "batch"},
                                       files={"file": ("in.jsonl", jsonl(chat_line(f"r{i}", max_tokens=8)
                                                                         for i in range(80)))})
            batch = (await client.post("/v1/batches", json={
                "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"})).json()
            batch = await settled(client, batch["id"], pause=0.1)
            # /health shows the hosts as the batches saw them (the worker runs its own pool, in its process or thread)
            served = sum(h["served"] for h in (await client.get("/health")).json()["backend"]["hosts"])
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 80
    assert served == 80
    chat = [sim.stats.answered["/api/chat"] for sim in (one, two)]  # the lines; /api/generate counted the slots
    assert chat[0] > 0 and chat[1] > 0 and sum(chat) == 80
    story = batch["obatch"]["concurrency"]  # the levels chosen, and why, travel with the batch object
    assert story["mode"] == "auto" and [h["url"] for h in story["hosts"]] == [one.url, two.url]
    assert all(h["history"] and h["reason"] for h in story["hosts"])


async def test_health_says_what_happened_and_does_not_wait_on_a_hung_engine(tmp_path: Path) -> None:
    """A refused connection is named with its address; an engine that accepts and never answers costs /health
    at most the probe's grace each time (it used to wait 3 s on every call, so every UI page did)."""
    refused_url = f"http://127.0.0.1:{free_port()}"
    backend = OllamaBackend(refused_url)
    async with AsyncTestClient(create_app(settings(tmp_path / "a"), backend=backend)) as client:
        report = (await client.get("/health")).json()
    await backend.aclose()
    assert report["status"] == "degraded" and report["backend"]["reachable"] is False
    assert report["backend"]["error"] == f"connection refused at {refused_url}"
    assert report["backend"]["urls"] == [refused_url]

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel accepts connections; nothing ever answers
        hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        backend = OllamaBackend(hung_url)
        async with AsyncTestClient(create_app(settings(tmp_path / "b"), backend=backend)) as client:
            waits = []
            for _ in range(3):
                started = time.monotonic()
                report = (await client.get("/health")).json()
                waits.append(time.monotonic() - started)
            assert max(waits) < 1.5, waits  # generous on a loaded machine; the grace is 0.3 s
            assert report["backend"]["reachable"] is False
            assert report["backend"]["error"].startswith(f"no answer from {hung_url} yet")
            started = time.monotonic()
            models = await client.get("/v1/models")  # would wait on the engine client's timeout
            assert time.monotonic() - started < 1.5
            assert models.status_code == 502
            message = models.json()["error"]["message"]
            assert message.startswith(f"The backend does not answer: no answer from {hung_url}")
            await asyncio.sleep(3.5)  # the probe's own timeout has passed
            report = (await client.get("/health")).json()
            assert report["backend"]["error"] == f"no answer from {hung_url} within 3 s"
        await backend.aclose()
