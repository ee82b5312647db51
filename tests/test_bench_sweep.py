"""Sweeps on the Ollama simulator: 2 num_ctx × 3 concurrency points stored with every metric, resumed after a
crash, estimates recorded at batch start and compared with the realised duration, the CLI, the charts."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from obatch import bench
from obatch.api import run_batch_file
from obatch.backends.ollama import OllamaBackend
from obatch.bench import charts
from obatch.bench.measure import SweepSpec, run_sweep, sweep_with
from obatch.cli import main
from obatch.config import Settings
from obatch.store import bench_repo
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel
from tests.helpers import chat_line, write_jsonl

CHAT = "llama3.2:1b"


@pytest.fixture
async def fast_sim() -> AsyncIterator[OllamaSim]:
    """Two slots per model (throughput saturates at concurrency 2); requests take ~0.1 s, long enough that the
    client's own gaps between them do not blur the saturation."""
    config = SimConfig(models=(SimModel(CHAT),), num_parallel=2, prompt_tps=20_000, decode_tps=400,
                       default_output_tokens=4096, load_seconds=0.05)
    async with OllamaSim(config) as sim:
        yield sim


def spec(**overrides: object) -> SweepSpec:
    values: dict[str, object] = {"models": [CHAT], "num_ctx": [2048, 4096], "concurrency": [1, 2, 4],
                                 "requests": 12, "workload": "short", "warmup": 1, "seed": 1}
    values.update(overrides)
    return SweepSpec(**values)  # type: ignore[arg-type]


async def test_sweep_stores_2_num_ctx_by_3_concurrency_points(fast_sim: OllamaSim,
                                                             make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(fast_sim.url)

    report = await run_sweep(spec(), settings=settings, progress=False)

    assert len(report.measured) == 6 and not report.skipped
    assert fast_sim.stats.loads == 2  # Ollama reloads for a new num_ctx only: the order made it twice
    frames = await bench.load_report(settings=settings)
    points = frames.points
    assert points.height == 6 and set(points["run_id"]) == {report.run_id}
    assert sorted(zip(points["num_ctx"], points["concurrency"], strict=True)) == [
        (n, c) for n in (2048, 4096) for c in (1, 2, 4)]
    assert (points["n_completed"] == 12).all() and (points["success_rate"] == 1.0).all()
    assert not points["excluded"].any()
    assert points["gen_tps"].to_list() == pytest.approx([400.0] * 6)  # the engine's own decode durations
    assert points["prompt_tps"].to_list() == pytest.approx([20_000.0] * 6)
    for column in ("ttft_p50", "itl_p50", "tpot_p50", "latency_p99", "output_tps"):
        assert points[column].null_count() == 0 and (points[column] > 0).all(), column
    assert (points["engine_version"] == "0.12.6").all()
    assert (points["load_seconds"] >= 0.05).any()  # the first request after a reload reported the load
    assert all(orjson.loads(s) for s in points["samples_json"])  # sample responses kept
    run = frames.runs.row(0, named=True)
    assert run["status"] == "completed" and run["hostname"] and run["backend"] == "ollama"
    saturation = frames.saturation.sort("num_ctx")
    assert saturation["saturates_at"].to_list() == [2, 2]  # two slots: concurrency 4 adds nothing
    rps = frames.summary.filter(frames.summary["num_ctx"] == 2048)["req_per_s"].to_list()
    assert rps[1] > 1.6 * rps[0] and rps[2] < 1.25 * rps[1]
    # the report's charts build from these frames
    for chart in (charts.throughput_vs_num_ctx(frames.summary), charts.latency_vs_num_ctx(frames.summary),
                  charts.throughput_vs_concurrency(frames.summary, frames.saturation),
                  charts.estimate_vs_actual(frames.estimates)):
        assert chart.to_dict()


class _PowerCut(Exception):
    pass


class CrashingBackend(OllamaBackend):
    """Dies when it is asked to prepare the ``crash_at``-th point."""

    def __init__(self, url: str, crash_at: int) -> None:
        super().__init__(url)
        self.prepared = 0
        self.crash_at = crash_at

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int) -> float:
        self.prepared += 1
        if self.prepared == self.crash_at:
            raise _PowerCut
        return await super().prepare(model, num_ctx=num_ctx, parallel=parallel)


async def test_an_interrupted_sweep_resumes_where_it_stopped(fast_sim: OllamaSim,
                                                            make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(fast_sim.url)
    engine, sessions = await open_store(settings.db_url)
    backend = CrashingBackend(fast_sim.url, crash_at=4)
    try:
        with pytest.raises(_PowerCut):
            await sweep_with(sessions, backend, spec(), settings=settings, progress=False)
        async with sessions() as session:
            [run] = await bench_repo.list_runs(session)
            assert run.status == "running"
            assert len(await bench_repo.done_points(session, run.id)) == 3
    finally:
        await backend.aclose()
        await engine.dispose()

    resumed = await run_sweep(spec(), settings=settings, progress=False)

    assert resumed.run_id == run.id
    assert [(p.num_ctx, p.concurrency) for p in resumed.skipped] == [(2048, 1), (2048, 2), (2048, 4)]
    assert [(p.num_ctx, p.concurrency) for p in resumed.measured] == [(4096, 1), (4096, 2), (4096, 4)]
    frames = await bench.load_report(settings=settings)
    assert frames.points.height == 6 and frames.runs["status"].to_list() == ["completed"]
    again = await run_sweep(spec(), settings=settings, progress=False)  # a finished run is not resumed
    assert again.run_id != run.id and len(again.measured) == 6


def held_out(path: Path, n: int, seed: int = 11) -> Path:
    rng = random.Random(seed)
    return write_jsonl(path, [chat_line(f"h{i}", " ".join(["word"] * rng.randint(10, 300)),
                                        max_tokens=rng.randint(10, 120)) for i in range(n)])


async def test_batches_record_their_estimate_and_it_comes_true(fast_sim: OllamaSim,
                                                              make_settings: Callable[..., Settings],
                                                              tmp_path: Path) -> None:
    settings = make_settings(fast_sim.url)
    held = held_out(tmp_path / "held.jsonl", 60)
    no_data = await run_batch_file(held, settings=settings, concurrency=2, progress=False)
    assert no_data.batch.estimate_json is None  # nothing measured yet: no estimate, and the batch runs anyway

    await run_sweep(spec(workload="chat", concurrency=[1, 2, 4], num_ctx=[2048]), settings=settings,
                    progress=False)
    guess = await bench.estimate_workload(CHAT, settings=settings, file=held, concurrency=4)
    done = await run_batch_file(held, settings=settings, concurrency=4, progress=False, fresh=True)

    stored = orjson.loads(done.batch.estimate_json or "null")
    assert stored is not None and stored["concurrency"] == 4
    assert "estimate:" in done.summary and "estimate:" not in no_data.summary  # `obatch run` prints both
    assert stored["seconds"] == pytest.approx(guess.seconds)  # the same estimate, made when the batch started
    [group] = stored["groups"]
    assert group["model"] == CHAT and group["num_ctx"] == 2048 and group["points"]
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            [record] = await bench.estimates_vs_actuals(session)
    finally:
        await engine.dispose()
    assert record["batch_id"] == done.batch.id and record["actual_seconds"] == pytest.approx(done.batch.run_seconds)
    assert abs(record["error_pct"]) < 20, record  # the simulator's latency model is deterministic
    learned = await bench.estimate_workload(CHAT, settings=settings, file=held, concurrency=4)
    assert learned.history_batches == 1 and learned.history_factor != 1  # the finished batch now corrects it
    assert learned.seconds == pytest.approx(done.batch.run_seconds, rel=0.1)


def test_cli_bench_and_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    assert main(["bench", "--backend", "sim", "-m", CHAT, "--num-ctx", "2048", "-c", "1,2", "-n", "4",
                 "-w", "tiny", "--data-dir", data, "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 points measured" in out and ("saturates at" in out or "still growing at" in out)
    assert main(["estimate", "--backend", "sim", "-m", CHAT, "-n", "100", "--prompt-tokens", "20",
                 "--output-tokens", "10", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "best config: num_ctx 2048" in out and "rests on points" in out
    assert main(["estimate", "-m", "unknown-model", "-n", "1", "--prompt-tokens", "1", "--output-tokens", "1",
                 "--data-dir", data]) == 1
    assert "No benchmark points" in capsys.readouterr().err
    assert main(["estimate", "--history", "--data-dir", data]) == 0
