"""Auto concurrency starts where an earlier run found the engine's slots (``obatch.batches.slots``), on both stores.

Each run here goes through ``run_batch_file`` (what ``obatch run`` and the notebook run) against the Ollama
simulator, which tells no slot count but reports its durations, as Ollama does; the response cache is off so a
second run of the same file asks the engine again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from obatch.api import run_batch_file
from obatch.config import Settings
from obatch.store import engine_slots
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from tests.helpers import chat_line, write_jsonl

pytestmark = pytest.mark.usefixtures("db_url")

MODEL = "llama3.2:1b"


async def _stored(settings: Settings, host: str, model: str = MODEL) -> int | None:
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            found = await engine_slots.remembered_slots(session, [host], model)
    finally:
        await engine.dispose()
    return found[host][0] if host in found else None


async def _keep(settings: Settings, host: str, slots: int, model: str = MODEL) -> None:
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            await engine_slots.remember_slots(session, host, model, slots, time.time())
            await session.commit()
    finally:
        await engine.dispose()


async def _run(path: Path, settings: Settings, **kwargs: Any) -> list[dict[str, Any]]:
    """Run the file with the cache off; the history of its one host."""
    report = await run_batch_file(path, settings=settings, progress=False, fresh=True, cache="off", **kwargs)
    assert report.batch.completed == report.batch.total and report.batch.failed == 0
    story = orjson.loads(report.batch.concurrency_json or "{}")
    history: list[dict[str, Any]] = story["hosts"][0]["history"]
    return history


async def test_the_slots_a_run_reads_are_where_the_next_run_starts(tmp_path: Path,
                                                                  make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=16) for i in range(96)])
    async with OllamaSim(SimConfig(num_parallel=4, decode_tps=200)) as sim:
        settings = make_settings(sim.url)
        first = await _run(path, settings)
        assert first[0]["reason"].startswith(f"start: {first[0]['level']}, counted: {sim.url} ran "), first
        read = await _stored(settings, sim.url)
        assert read is not None and 2 <= read <= 8, first  # 4 slots, read on a loaded machine
        assert await _stored(settings, sim.url, "qwen2.5:0.5b") is None  # kept for the model that ran only
        again = await _run(path, settings)
    start = again[0]
    assert start["level"] == read, again
    assert start["reason"].startswith(f"start: {read}, remembered from an earlier run on {sim.url} at "), again
    assert not any(c["level"] == 1 or "jumped" in c["reason"] for c in again), again  # no request at 1, no burst


async def test_remembered_slots_above_the_engines_are_lowered_and_kept_lower(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    # the engine restarted with 2 slots since a run that read 8 on it, and loads the model again first
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=16) for i in range(64)])
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=200, load_seconds=0.5)) as sim:
        settings = make_settings(sim.url)
        await _keep(settings, sim.url, 8)
        history = await _run(path, settings)
        assert history[0]["level"] == 8 and "remembered" in history[0]["reason"], history
        lowered = [c for c in history if c["reason"].startswith("lowered the ceiling to")]
        assert lowered and lowered[-1]["level"] == 2, history
        assert lowered[0]["at"] - history[0]["at"] < 2.0, history  # within the first rounds after the load
        assert await _stored(settings, sim.url) == 2


async def test_remembered_slots_below_the_engines_are_raised_by_the_check(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=8) for i in range(200)])
    async with OllamaSim(SimConfig(num_parallel=4, decode_tps=200)) as sim:
        settings = make_settings(sim.url)
        await _keep(settings, sim.url, 1)
        history = await _run(path, settings)
        assert history[0]["level"] == 1 and "remembered" in history[0]["reason"], history
        raised = [c for c in history if c["reason"].startswith("raised the ceiling to")]
        assert raised, history
        assert (await _stored(settings, sim.url) or 0) == raised[-1]["level"] > 1


async def test_a_fixed_level_neither_starts_from_nor_overwrites_the_remembered_one(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=8) for i in range(24)])
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as sim:
        settings = make_settings(sim.url)
        await _keep(settings, sim.url, 8)
        history = await _run(path, settings, concurrency=3)
        assert [c["reason"] for c in history] == ["fixed at 3"]
        assert await _stored(settings, sim.url) == 8


async def test_slots_are_kept_per_host_and_model(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            for host, model, slots in [("http://a:11434", "m1", 4), ("http://b:11434", "m1", 2),
                                       ("http://a:11434", "m2", 8), ("http://a:11434", "m1", 6)]:
                await engine_slots.remember_slots(session, host, model, slots, 1000.0 + slots)
            await session.commit()
        async with sessions() as session:
            found = await engine_slots.remembered_slots(session, ["http://a:11434", "http://b:11434", "http://c"],
                                                        "m1")
            other = await engine_slots.remembered_slots(session, ["http://a:11434", "http://b:11434"], "m2")
    finally:
        await engine.dispose()
    assert found == {"http://a:11434": (6, 1006.0), "http://b:11434": (2, 1002.0)}  # the later write replaced 4
    assert other == {"http://a:11434": (8, 1008.0)}

