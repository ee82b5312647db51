"""The batch lifecycle end to end against the simulator: faults, context fitting, grouping, cancel, expiry."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select
from sqlmodel import col

from obatch import batches, errors
from obatch.api import results_frame, run_batch_file
from obatch.backends.ollama import OllamaBackend
from obatch.config import Settings
from obatch.protocol import LineStats, OutputLine, ResponseBody
from obatch.store import repo
from obatch.store.db import open_store
from obatch.store.tables import RequestRow
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel
from tests.helpers import chat_line, write_jsonl

pytestmark = pytest.mark.usefixtures("db_url")  # every test here runs on SQLite and on PostgreSQL


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def assert_exactly_once(expected: list[str], output: Path, errors_file: Path) -> tuple[list[dict[str, Any]], ...]:
    out, err = read_lines(output), read_lines(errors_file)
    ids = Counter(line["custom_id"] for line in out + err)
    assert sorted(ids) == sorted(expected)
    assert set(ids.values()) == {1}
    return out, err


async def test_transient_faults_lose_and_double_nothing(tmp_path: Path, make_settings: Callable[..., Settings]
                                                        ) -> None:
    config = SimConfig(num_parallel=4, error_rate=0.15, reset_rate=0.15, seed=3)
    lines = [chat_line(f"r{i}", f"question {i}", max_tokens=4) for i in range(500)]
    lines += [chat_line(f"bad{i}", model="no-such-model") for i in range(5)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(config) as sim:
        report = await run_batch_file(path, settings=make_settings(sim.url, max_attempts=12), concurrency=8,
                                      progress=False)
        injected = sim.stats.errors_injected + sim.stats.resets_injected
    out, err = assert_exactly_once([line["custom_id"] for line in lines], report.output, report.errors)
    assert injected > 100  # the faults really happened
    assert len(out) == 500 and {line["custom_id"] for line in err} == {f"bad{i}" for i in range(5)}
    assert all(line["error"]["code"] == "model_not_found" for line in err)
    assert all(line["response"]["status_code"] == 200 for line in out)
    assert all(line["obatch"]["latency_ms"] > 0 and line["obatch"]["attempts"] >= 1 for line in out)
    assert report.batch.status == "completed" and report.batch.completed == 500 and report.batch.failed == 5
    frame = await results_frame(make_settings(), report.batch.id)
    assert frame.filter(frame["status"] == "failed")["attempts"].to_list() == [0] * 5  # 4xx: never sent again
    assert frame["attempts"].max() > 1


async def test_one_num_ctx_per_model_and_too_long_prompts_refused(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    models = (SimModel("small", context_length=4096), SimModel("big", context_length=32768))
    long_prompt = "word " * 3000  # ~5000 estimated tokens
    lines = [chat_line("s1", "short", model="small", max_tokens=16), chat_line("s2", long_prompt, model="small"),
             chat_line("s3", "short", model="small", max_tokens=5000),
             chat_line("b1", long_prompt, model="big", max_tokens=100), chat_line("b2", "hi", model="big"),
             chat_line("b3", "hi", model="big", options={"num_ctx": 64}), chat_line("s4", "x", model="small")]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(models=models, num_parallel=2)) as sim:
        report = await run_batch_file(path, settings=make_settings(sim.url), concurrency=2, progress=False)
        seen = dict(sim.stats.num_ctx_seen)
        loads = sim.stats.loads
    _out, err = assert_exactly_once([line["custom_id"] for line in lines], report.output, report.errors)
    failed = {line["custom_id"]: line["error"]["code"] for line in err}
    assert failed == {"s2": "context_length_exceeded", "s3": "context_length_exceeded"}
    # "big": b1 needs ~5012 + 100 → 5120; "small": short prompts + the default budget → 2048; b3 keeps its 64.
    assert seen == {2048: 2, 5120: 2, 64: 1}
    assert loads == 3
    frame = await results_frame(make_settings(), report.batch.id)
    truncated = dict(zip(frame["custom_id"], frame["truncated"], strict=True))
    assert truncated["b3"] is False  # a short prompt in a small window is not flagged
    assert not any(truncated[k] for k in ("s1", "b1", "b2", "s4"))


async def test_silent_truncation_is_flagged(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line("t", "word " * 400, options={"num_ctx": 128})])
    async with OllamaSim() as sim:
        report = await run_batch_file(path, settings=make_settings(sim.url), progress=False)
    frame = await results_frame(make_settings(), report.batch.id)
    assert frame["truncated"].to_list() == [True] and frame["prompt_tokens"].to_list() == [128]


async def test_models_are_grouped_to_minimise_swaps(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"r{i}", model=("llama3.2:1b", "qwen2.5:0.5b")[i % 2], max_tokens=2) for i in range(40)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, max_loaded_models=1)) as sim:
        await run_batch_file(path, settings=make_settings(sim.url), concurrency=2, progress=False)
        assert sim.stats.loads == 2


async def _start(sim: OllamaSim, settings: Settings, path: Path, **create: Any) -> tuple[batches.Services, str, Any]:
    engine, sessions = await open_store(settings.db_url)
    svc = batches.Services(settings, sessions, OllamaBackend(sim.url))
    stored = await batches.store_file(svc, batches.read_chunks(path), filename=path.name, purpose="batch")
    batch = await batches.create_batch(svc, input_file_id=stored.id, endpoint="/v1/chat/completions", **create)
    return svc, batch.id, engine


async def test_cancel_keeps_finished_lines(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"r{i}", max_tokens=20) for i in range(60)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=400)) as sim:
        svc, batch_id, engine = await _start(sim, make_settings(sim.url, concurrency=2), path)
        task = asyncio.create_task(batches.process(svc, batch_id))
        while (await batches.reload(svc, batch_id)).completed < 4:  # noqa: ASYNC110 (polling the store)
            await asyncio.sleep(0.02)
        await batches.request_cancel(svc, batch_id)
        done = await asyncio.wait_for(task, 5)
        assert (await batches.request_cancel(svc, batch_id)).status == "cancelled"  # asking again changes nothing
        await svc.backend.aclose()
        await engine.dispose()
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    assert 4 <= done.completed < 60 and done.completed + done.failed == 60
    out = read_lines(batches.file_path(svc.settings, done.output_file_id or ""))
    err = read_lines(batches.file_path(svc.settings, done.error_file_id or ""))
    assert len(out) == done.completed
    assert {line["error"]["code"] for line in err} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in out + err) == sorted(line["custom_id"] for line in lines)


async def test_expired_window_fails_unfinished_lines(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}") for i in range(5)])
    async with OllamaSim() as sim:
        svc, batch_id, engine = await _start(sim, make_settings(sim.url, concurrency=2), path, completion_window="1m")
        svc.clock = lambda: 10**10  # far past the window
        done = await batches.process(svc, batch_id)
        with pytest.raises(errors.ConflictError):
            await batches.request_cancel(svc, batch_id)
        await svc.backend.aclose()
        await engine.dispose()
        assert sim.stats.served == 0
    assert done.status == "expired" and done.expired_at and done.output_file_id is None
    err = read_lines(batches.file_path(svc.settings, done.error_file_id or ""))
    assert [line["error"]["code"] for line in err] == ["batch_expired"] * 5
    assert done.failed == 5 and done.completed == 0


async def test_invalid_file_fails_the_batch_with_line_numbers(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = tmp_path / "bad.jsonl"
    good = [orjson.dumps(chat_line(f"ok{i}")) + b"\n" for i in range(2500)]  # more than one import chunk
    path.write_bytes(orjson.dumps(chat_line("a")) + b"\n{oops\n" + orjson.dumps(chat_line("a")) + b"\n"
                     + b"".join(good))
    async with OllamaSim() as sim:
        svc, batch_id, engine = await _start(sim, make_settings(sim.url, concurrency=2), path)
        done = await batches.process(svc, batch_id)
        obj = batches.batch_object(done)
        async with svc.sessions() as session:  # checked and imported in one pass: a refused file leaves no rows
            rows = (await session.execute(select(func.count()).select_from(RequestRow)
                                          .where(col(RequestRow.batch_id) == batch_id))).scalar()
        await svc.backend.aclose()
        await engine.dispose()
        assert sim.stats.served == 0
    assert done.status == "failed" and obj.errors is not None and rows == 0
    assert [(e.line, e.code) for e in obj.errors.data] == [(2, "invalid_json_line"), (3, "duplicate_custom_id")]


async def test_output_lines_keep_the_wire_shape(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """Success lines are written straight from the rows: byte for byte what ``OutputLine`` writes."""
    path = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"r{i}", max_tokens=4) for i in range(20)])
    async with OllamaSim() as sim:
        report = await run_batch_file(path, settings=make_settings(sim.url), concurrency=4, progress=False)
    lines = report.output.read_bytes().splitlines(keepends=True)
    assert len(lines) == 20
    for raw in lines:
        parsed = orjson.loads(raw)
        again = OutputLine(id=parsed["id"], custom_id=parsed["custom_id"],
                           response=ResponseBody(**{**parsed["response"],
                                                    "body": orjson.Fragment(orjson.dumps(parsed["response"]["body"]))}),
                           obatch=LineStats(**parsed["obatch"])).to_jsonl()
        assert raw == again
        assert parsed["id"] == parsed["response"]["request_id"] and parsed["id"].startswith("batch_req_")
        assert len(parsed["id"]) == len("batch_req_") + 32


@pytest.mark.parametrize(("window", "seconds"), [("24h", 86_400), ("1h", 3_600), ("30m", 1_800), ("7d", 604_800),
                                                 ("90s", 90), ("1m", 60)])
def test_completion_windows(window: str, seconds: int) -> None:
    assert batches.window_seconds(window) == seconds


@pytest.mark.parametrize("window", ["", "24", "10s", "8d", "1y"])
def test_bad_completion_windows(window: str) -> None:
    with pytest.raises(errors.ConfigError):
        batches.window_seconds(window)


async def test_results_commit_in_the_background_with_back_pressure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full buffer is committed while the next one fills; only a second full buffer waits for the store; every
    result is committed once, in order; a failed commit fails the run."""
    from types import SimpleNamespace

    from obatch.backends.base import Result
    from obatch.runner import Job, Outcome

    release = asyncio.Event()
    committed: list[list[int]] = []
    fail = False

    async def finish_requests(_session: Any, _batch_id: str, rows: list[tuple[Any, ...]]) -> None:
        await release.wait()
        if fail:
            raise RuntimeError("disk full")
        committed.append([row[-1] for row in rows])

    class Session:
        async def __aenter__(self) -> Session:
            return self

        async def __aexit__(self, *_: object) -> None:
            return None

        async def commit(self) -> None:
            return None

    monkeypatch.setattr(repo, "finish_requests", finish_requests)
    svc: Any = SimpleNamespace(settings=SimpleNamespace(commit_every=4), sessions=Session)
    writer = batches.ResultWriter(svc, "batch-1")

    def outcome(line: int) -> Outcome:
        return Outcome(Job(line, f"r{line}", "/v1/chat/completions", {}), Result({"choices": []}), None, 1.0, 1, 0.0)

    for line in range(11):  # the first four go to the store; the next seven wait in the second buffer
        await asyncio.wait_for(writer.add(outcome(line)), 1)
    assert len(writer.buffer) == 7 and committed == []
    blocked = asyncio.create_task(writer.add(outcome(11)))  # two buffers full: waits for the store
    await asyncio.sleep(0.05)
    assert not blocked.done()
    release.set()
    await asyncio.wait_for(blocked, 1)
    await writer.flush()
    assert committed == [[0, 1, 2, 3], list(range(4, 12))] and writer.buffer == []

    fail = True
    for line in range(12, 16):  # the fourth starts a commit, which fails
        await writer.add(outcome(line))
    await asyncio.sleep(0.05)
    with pytest.raises(RuntimeError, match="disk full"):  # the next full buffer: the run fails (its rows stay pending)
        for line in range(16, 20):
            await writer.add(outcome(line))
    with pytest.raises(RuntimeError, match="disk full"):
        await writer.flush()
