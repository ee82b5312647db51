"""Finished lines moved out of ``requests`` (``obatch.store.finished``): every reader gives what it gave before they
moved, the batch's counts hold, the response cache answers from them only for the same API key and model weights,
and a crash in the middle of moving them loses and doubles nothing."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import polars as pl
import pytest

from obatch.api import results_frame, retry, run_batch_file
from obatch.backends.ollama import OllamaBackend
from obatch.batches import compact
from obatch.bench.pilot_run import run_pilot
from obatch.config import Settings
from obatch.store import bench_repo, finished, repo
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from tests.helpers import chat_line, write_jsonl
from tests.test_cache import MODEL, by_id, greedy, read_lines, run_as, sent
from tests.test_compact import _equal, _lines, _readers, compact_twice, crash_mid_compaction, run_whole

pytestmark = pytest.mark.usefixtures("db_url")

COUNTS = ("total", "completed", "failed", "input_tokens", "output_tokens", "reasoning_tokens", "cached")


async def _moved(settings: Settings, batch_id: str) -> tuple[int, dict[str, int]]:
    """(the batch's moved lines, its counts as finalisation recounts them from its rows)."""
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            moved = (await finished.counts(session, batch_id))[0]
            batch = await repo.get_batch(session, batch_id)
            await repo.recount(session, batch)
            return moved, {name: getattr(batch, name) for name in COUNTS}
    finally:
        await engine.dispose()


async def test_moved_lines_read_as_before(tmp_path: Path, make_settings: Callable[..., Settings],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _lines(60)
    lines += [chat_line(f"again{i}", f"question {i}", max_tokens=6, temperature=0)  # reuse inside the batch
              for i in range(8)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    monkeypatch.setattr(compact, "KEEP_BODIES", 5)
    async with OllamaSim(SimConfig(num_parallel=4, error_rate=0.3, seed=3)) as sim:
        settings = make_settings(sim.url, max_attempts=1)
        report = await run_whole(monkeypatch, path, settings)
        before = await _readers(settings, report.batch.id)
        moved, counts = await _moved(settings, report.batch.id)
        assert moved == 0 and counts == {name: getattr(report.batch, name) for name in COUNTS}
        await compact_twice(settings, report)
        moved, after_counts = await _moved(settings, report.batch.id)
        frame: pl.DataFrame = before["frame"]
        succeeded = frame.filter(pl.col("status") == "succeeded")
        assert moved == succeeded.filter(pl.col("line") > 5).height > 30  # every succeeded line past the 5 kept
        assert after_counts == counts and counts["cached"] > 0
        _equal(before, await _readers(settings, report.batch.id))  # /results, merged, both frames: as before
        # a rerun takes every succeeded answer from the moved lines and the rows kept, as from whole rows
        served = sim.stats.served
        again = await run_batch_file(path, settings=settings, concurrency=4, progress=False, fresh=True)
        rerun = await results_frame(settings, again.batch.id)
    first, second = by_id(report.output, report.errors), by_id(again.output, again.errors)
    reused = [c for c, line in second.items() if line["obatch"]["cached_from"]]
    assert set(succeeded["custom_id"]) <= set(reused)
    for custom_id in succeeded["custom_id"]:
        assert second[custom_id]["response"]["body"] == first[custom_id]["response"]["body"]
        assert second[custom_id]["obatch"]["cached_from"]["batch_id"] == report.batch.id
    assert sim.stats.served - served <= len(lines) - succeeded.height  # only lines that had failed ran again
    columns = ("custom_id", "content", "finish_reason", "prompt_tokens", "completion_tokens", "num_ctx", "truncated")
    assert (rerun.filter(pl.col("custom_id").is_in(succeeded["custom_id"].to_list())).select(columns)
            .equals(succeeded.select(columns)))


async def test_moved_lines_answer_only_their_api_key_and_model(tmp_path: Path, make_settings: Callable[..., Settings],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compact, "KEEP_BODIES", 2)
    path = write_jsonl(tmp_path / "in.jsonl", [greedy(f"r{i}", f"q{i}") for i in range(12)])
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        alice, _ = await run_as(settings, "alice", path)
        assert (await _moved(settings, alice.id))[0] == 10
        _, bobs = await run_as(settings, "bob", path)
        assert sent(sim) == 24  # never another tenant's answers, moved or not
        assert all(line["obatch"]["cached_from"] is None for line in bobs)
        _, again = await run_as(settings, "alice", path)
        assert sent(sim) == 24 and len(again) == 12
        assert {line["obatch"]["cached_from"]["batch_id"] for line in again} == {alice.id}
        sim.config.models = tuple(dataclasses.replace(m, revision="2") if m.key == MODEL else m
                                  for m in sim.config.models)  # the same name pulled again: other weights
        _, repulled = await run_as(settings, "alice", path)
        assert sent(sim) == 36
        assert all(line["obatch"]["cached_from"] is None for line in repulled)
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:  # the server's line counts (/metrics) count moved lines too
            assert await repo.line_state_counts(session, "alice") == {"succeeded": 36}
            assert await repo.line_state_counts(session) == {"succeeded": 48}
    finally:
        await engine.dispose()


async def test_a_crash_while_lines_move_loses_and_doubles_nothing(
        tmp_path: Path, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [greedy(f"r{i}", f"q{i}") for i in range(50)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    monkeypatch.setattr(compact, "KEEP_BODIES", 4)
    async with OllamaSim(SimConfig(num_parallel=4)) as sim:
        settings = make_settings(sim.url)
        await crash_mid_compaction(monkeypatch, path, settings)  # two pages of 8 moved, then the process dies
        engine, sessions = await open_store(settings.db_url)
        async with sessions() as session:
            batch_id = (await repo.list_batches(session))[0][0].id
            assert (await finished.counts(session, batch_id))[0] == 16 - 4  # two pages, less the lines kept whole
        await engine.dispose()
        served = sim.stats.served
        report = await run_batch_file(path, settings=settings, progress=False)  # resumes: finalises again
        assert sim.stats.served == served  # nothing ran twice
    assert report.batch.status == "completed" and report.batch.completed == 50
    out = read_lines(report.output)
    assert Counter(line["custom_id"] for line in out) == Counter(line["custom_id"] for line in lines)
    assert (await _moved(settings, report.batch.id))[0] == 46
    after = await _readers(settings, report.batch.id)
    assert [orjson.loads(line) for line in after["pages"]] == out
    assert after["frame"]["custom_id"].to_list() == [line["custom_id"] for line in lines]


async def test_a_deleted_batch_takes_its_moved_lines(tmp_path: Path, make_settings: Callable[..., Settings],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compact, "KEEP_BODIES", 1)
    path = write_jsonl(tmp_path / "in.jsonl", [greedy(f"r{i}", f"q{i}") for i in range(6)])
    async with OllamaSim(SimConfig(num_parallel=2)) as sim:
        settings = make_settings(sim.url)
        kept = await run_batch_file(path, settings=settings, progress=False)
        gone = await run_batch_file(path, settings=settings, progress=False, fresh=True)
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            assert (await finished.counts(session, gone.batch.id))[0] == 5
            await finished.forget(session, gone.batch.id)
            await session.commit()
        async with sessions() as session:
            assert (await finished.counts(session, gone.batch.id))[0] == 0
            assert (await finished.counts(session, kept.batch.id))[0] == 5  # another batch's stay
            # the estimates' history counts the lines a batch ran, moved ones included (their bodies: the kept)
            count, bodies = await bench_repo.run_lines(session, kept.batch.id, MODEL, 100)
            assert count == 6 and len(bodies) == 1
    finally:
        await engine.dispose()


async def test_a_retry_chain_over_moved_lines_reads_as_one(tmp_path: Path, make_settings: Callable[..., Settings],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compact, "KEEP_BODIES", 3)
    lines = [greedy(f"r{i}", f"q{i}") for i in range(40)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4, error_rate=0.3, seed=7)) as sim:
        settings = make_settings(sim.url, max_attempts=1)
        first = await run_batch_file(path, settings=settings, concurrency=4, progress=False)
        assert 0 < first.batch.failed < 40 and (await _moved(settings, first.batch.id))[0] > 20
        sim.config.error_rate = 0.0
        merged = await retry(first.batch.id, settings=settings, progress=False)
    retried = merged.filter(pl.col("batch_id") != first.batch.id)
    assert retried.height == first.batch.failed
    assert merged["custom_id"].to_list() == [line["custom_id"] for line in lines]  # each line once, in order
    assert set(merged["status"]) == {"succeeded"}
    original = by_id(first.output)
    for row in merged.filter(pl.col("batch_id") == first.batch.id).iter_rows(named=True):
        assert row["content"] == original[row["custom_id"]]["response"]["body"]["choices"][0]["message"]["content"]


async def test_the_history_counts_moved_lines_a_batch_ran_itself(tmp_path: Path,
                                                                 make_settings: Callable[..., Settings],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compact, "KEEP_BODIES", 2)
    path = write_jsonl(tmp_path / "in.jsonl", [greedy(f"r{i}", f"q{i}") for i in range(24)])
    async with OllamaSim(SimConfig(num_parallel=2)) as sim:
        settings = make_settings(sim.url)
        engine, sessions = await open_store(settings.db_url)
        backend = OllamaBackend(sim.url)
        try:
            await run_pilot(sessions, backend, settings, path, size=6, concurrency=2, model=MODEL)
            report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
            assert report.batch.completed == 24 and (await _moved(settings, report.batch.id))[0] == 22
            async with sessions() as session:
                count, rows = await bench_repo.run_lines(session, report.batch.id, MODEL, 100)
        finally:
            await backend.aclose()
            await engine.dispose()
    assert count == 18  # the 6 pilot lines ran before the batch, moved or kept
    assert len(rows) <= 2
