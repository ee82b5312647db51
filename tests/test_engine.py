"""The embedded llama.cpp engine (xllamacpp): lifecycle, reloads, and real answers from a tiny model and SmolLM2."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from obatch.engine import (
    DEFAULT_ALIAS,
    EngineConfig,
    EngineStartError,
    EngineUnavailable,
    LocalEngine,
    default_model_path,
    gguf_context_length,
    running_engines,
)
from obatch.testing.tiny_gguf import TINY_CONTEXT_LENGTH, write_tiny_model

pytestmark = pytest.mark.engine

TINY_ALIAS = "tiny:test"
TIMINGS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
           "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[LocalEngine]:
    # One thread: the model is tiny, and a single thread does not collapse when other processes hold a core.
    eng = LocalEngine(tiny_model, alias=TINY_ALIAS, threads=1)
    try:
        yield eng
    finally:
        await eng.aclose()


def port_open(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError:
        return False
    return True


async def chat(url: str, content: str = "Hello", max_tokens: int = 16, **extra: object) -> dict[str, object]:
    body = {"model": TINY_ALIAS, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


def test_tiny_model_is_small_and_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    again = write_tiny_model(tmp_path / "sub" / "again.gguf")
    assert again.read_bytes() == tiny_model.read_bytes()
    assert 200_000 < tiny_model.stat().st_size < 1_000_000
    assert gguf_context_length(tiny_model) == TINY_CONTEXT_LENGTH


async def test_tiny_chat_completion(engine: LocalEngine) -> None:
    url = await engine.ensure(n_ctx=512, n_parallel=2)
    assert url.startswith("http://127.0.0.1:") and url == engine.base_url
    assert engine.loads == 1 and engine.last_load_seconds > 0
    assert engine.config == EngineConfig(engine.model_path.resolve(), TINY_ALIAS, 512, 2, threads=1)
    assert engine.pid is not None and engine.alive

    answer = await chat(url, max_tokens=16)
    usage = answer["usage"]
    assert isinstance(usage, dict)
    # The tiny model never emits </s>: every answer runs to max_tokens.
    assert usage["completion_tokens"] == 16 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    timings = answer["timings"]
    assert isinstance(timings, dict) and timings.keys() >= TIMINGS
    assert timings["predicted_n"] == 16
    choices = answer["choices"]
    assert isinstance(choices, list)
    assert choices[0]["finish_reason"] == "length"
    text = choices[0]["message"]["content"]
    assert len(text) == 16 and text.isascii() and text.isprintable()
    assert answer["model"] == TINY_ALIAS
    assert (await chat(url, max_tokens=16))["choices"] == choices  # temperature 0 is deterministic

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        models = (await client.get("/v1/models")).json()
        health = await client.get("/health")
    assert [m["id"] for m in models["data"]] == [TINY_ALIAS]
    assert models["data"][0]["meta"]["n_ctx_train"] == TINY_CONTEXT_LENGTH
    assert health.json() == {"status": "ok"}


async def test_ensure_reuses_and_restarts(engine: LocalEngine) -> None:
    first = await engine.ensure(n_ctx=512, n_parallel=2)
    assert await engine.ensure(n_ctx=512, n_parallel=2) == first
    assert engine.loads == 1

    second = await engine.ensure(n_ctx=1024, n_parallel=2)  # new context window: reload
    assert engine.loads == 2 and second != first and not port_open(first)
    third = await engine.ensure(n_ctx=1024, n_parallel=4)  # new slot count: reload
    assert engine.loads == 3 and not port_open(second)
    async with httpx.AsyncClient(base_url=third, timeout=30) as client:
        props = (await client.get("/props")).json()
    assert props["default_generation_settings"]["n_ctx"] == 256  # per slot: 1024 / 4
    assert props["total_slots"] == 4
    assert props["model_alias"] == TINY_ALIAS
    assert engine.config is not None and engine.config.n_ctx_per_slot == 256

    await engine.aclose()
    assert not port_open(third)
    assert engine.config is None and engine.base_url is None and not engine.alive
    await engine.aclose()  # idempotent
    assert port_open(await engine.ensure(n_ctx=512, n_parallel=1))  # usable again after aclose
    assert engine.loads == 4


async def test_stop_right_after_start_does_not_hang(engine: LocalEngine) -> None:
    # xllamacpp loses a stop that arrives before its task loop runs (the destructor then waits forever);
    # the engine waits for the loop at start. A lost stop would show here as a 10 s stop (then SIGTERM).
    for n_ctx in (256, 512, 256, 512, 256):
        await engine.ensure(n_ctx=n_ctx, n_parallel=1)
        started = time.perf_counter()
        await engine.aclose()
        assert time.perf_counter() - started < 5


async def test_concurrent_ensure_loads_once(engine: LocalEngine) -> None:
    urls = await asyncio.gather(*(engine.ensure(n_ctx=512, n_parallel=2) for _ in range(3)))
    assert len(set(urls)) == 1 and engine.loads == 1


async def test_restarts_a_dead_engine_process(engine: LocalEngine) -> None:
    first = await engine.ensure(n_ctx=512, n_parallel=1)
    pid = engine.pid
    assert pid is not None
    engine._server.proc.kill()  # type: ignore[union-attr]
    engine._server.proc.wait()  # type: ignore[union-attr]
    assert not engine.alive
    second = await engine.ensure(n_ctx=512, n_parallel=1)
    assert engine.loads == 2 and engine.pid != pid and second != first
    await chat(second, max_tokens=2)


async def test_a_second_engine_that_oversubscribes_the_cores_is_named_in_a_warning(
        engine: LocalEngine, tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    await engine.ensure(n_ctx=512, n_parallel=1)
    assert engine.pid is not None and running_engines()[engine.pid] == 1  # its thread count, from its command line
    assert engine.pid not in running_engines(not_of=os.getpid())  # our own children left out
    cores = os.cpu_count() or 1
    greedy = LocalEngine(tiny_model, alias=TINY_ALIAS, threads=cores)
    try:
        with caplog.at_level(logging.WARNING, logger="obatch.engine"):
            await greedy.ensure(n_ctx=512, n_parallel=1)
        assert any(str(engine.pid) in r.getMessage() and "OBATCH_LOCAL_THREADS" in r.getMessage()
                   for r in caplog.records), caplog.text
        second = greedy.pid
        assert second is not None and {engine.pid, second} <= set(running_engines())
    finally:
        await greedy.aclose()
    assert second not in running_engines()  # stopped engines are not counted


async def test_embeddings_switch(engine: LocalEngine) -> None:
    url = await engine.ensure(n_ctx=512, n_parallel=2)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert (await client.post("/v1/embeddings", json={"input": "hi"})).status_code == 501
    url = await engine.ensure(n_ctx=512, n_parallel=2, embeddings=True)
    assert engine.loads == 2 and engine.config is not None and engine.config.embeddings
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.post("/v1/embeddings", json={"model": TINY_ALIAS, "input": ["hello", "world"]})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 64  # the tiny model's width
    assert abs(sum(v * v for v in data[0]["embedding"]) - 1) < 1e-4  # L2-normalised
    assert (await chat(url, max_tokens=4))["usage"]["completion_tokens"] == 4  # type: ignore[index]


async def test_thread_isolation(tiny_model: Path) -> None:
    eng = LocalEngine(tiny_model, alias=TINY_ALIAS, threads=1, isolation="thread")
    try:
        url = await eng.ensure(n_ctx=512, n_parallel=2)
        assert eng.pid is None
        assert (await chat(url, max_tokens=4))["usage"]["completion_tokens"] == 4  # type: ignore[index]
        url2 = await eng.ensure(n_ctx=256, n_parallel=1)
        assert eng.loads == 2 and not port_open(url)
    finally:
        await eng.aclose()
    assert not port_open(url2)


@pytest.fixture
def broken(tmp_path: Path, tiny_model: Path) -> Path:
    path = tmp_path / "broken.gguf"
    path.write_bytes(tiny_model.read_bytes()[:1000])
    return path


async def test_start_failures(tmp_path: Path, broken: Path) -> None:
    eng = LocalEngine(broken, threads=1)
    with pytest.raises(EngineStartError, match="failed to start") as failure:
        await eng.ensure(n_ctx=512, n_parallel=1)
    assert "failed to load model" in str(failure.value)  # the captured llama.cpp error log
    assert eng.config is None and eng.loads == 0
    with pytest.raises(EngineUnavailable, match="not found"):
        await eng.ensure(n_ctx=512, n_parallel=1, model_path=tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="n_parallel"):
        await eng.ensure(n_ctx=512, n_parallel=0)
    await eng.aclose()


def test_default_model_path() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert LocalEngine().context_length() == 8192


async def test_smollm2_answers() -> None:
    eng = LocalEngine(threads=1)
    try:
        url = await eng.ensure(n_ctx=1024, n_parallel=1)
        body = {"model": DEFAULT_ALIAS, "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8, "temperature": 0}
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["message"]["content"].strip()
        assert 0 < answer["usage"]["completion_tokens"] <= 8
        assert answer["model"] == DEFAULT_ALIAS
    finally:
        await eng.aclose()
