"""Request-rate (open-loop) load: arrival schedules, requests sent on schedule whatever the engine does, rate points
stored beside concurrency points, kept out of the best configuration and the estimator, capacity over rates."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from obatch import bench, errors
from obatch.backends.base import Backend, BackendWrapper
from obatch.backends.ollama import OllamaBackend
from obatch.bench import frames as bench_frames
from obatch.bench.estimate.fit import fits_for
from obatch.bench.load import achieved_rate, arrival_offsets
from obatch.bench.measure import PointKey, SweepSpec, measure_point, plan, run_sweep
from obatch.bench.schemas import SweepParams
from obatch.bench.slo import capacities, with_goodput
from obatch.bench.workloads import parse_workload
from obatch.cli import main
from obatch.config import Settings
from obatch.runner import RetryPolicy
from obatch.store.db import open_store
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel

CHAT = "llama3.2:1b"


# ------------------------------------------------------------------------------------------- schedules


def test_poisson_gaps_have_the_rates_mean_and_spread_and_repeat_with_their_seed() -> None:
    rate = 4.0
    offsets = arrival_offsets("poisson", rate, 4001, seed=7)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=1e-9)  # the schedule's rate is the rate asked
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.08)  # exponential: CV 1
    short = [b - a for a, b in itertools.pairwise(arrival_offsets("poisson", rate, 96, seed=0))]
    assert statistics.fmean(short) == pytest.approx(1 / rate) and statistics.stdev(short) > 0.5 / rate
    # independent (memoryless) arrivals: a gap says nothing about the next one
    assert abs(statistics.correlation(gaps[:-1], gaps[1:])) < 0.05
    assert sum(g < 0.1 / rate for g in gaps) / len(gaps) == pytest.approx(1 - math.exp(-0.1), abs=0.02)
    assert arrival_offsets("poisson", rate, 4001, seed=7) == offsets
    assert arrival_offsets("poisson", rate, 4001, seed=8) != offsets
    constant = arrival_offsets("constant", rate, 5)
    assert constant == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert achieved_rate(constant) == pytest.approx(4.0) and achieved_rate([1.0]) is None
    for kind, bad in (("bursty", 1.0), ("poisson", 0.0), ("constant", -2.0)):
        with pytest.raises(ValueError, match=r"arrival|rate"):
            arrival_offsets(kind, bad, 3)


def test_plans_and_specs_put_rates_beside_concurrency() -> None:
    points = plan(["m"], [2048], [1, 2], rates=[4.0, 2.0], arrival="constant", max_concurrency=8)
    assert [(p.concurrency, p.rate, p.arrival) for p in points] == [
        (1, None, None), (2, None, None), (8, 4.0, "constant"), (8, 2.0, "constant")]
    assert len({p.config for p in points}) == 4
    assert PointKey("m", 2048, 0, rate=2.0, arrival="poisson").load == "rate 2/s poisson"
    spec = SweepSpec(models=["m"], num_ctx=[2048], concurrency=[], rates=[8, 2, 2])
    assert spec.rates == [2.0, 8.0] and [p.rate for p in spec.points()] == [2.0, 8.0]
    plain = SweepSpec(models=["m"], num_ctx=[2048], concurrency=[1])
    assert plain.signature("x") != SweepSpec(models=["m"], num_ctx=[2048], concurrency=[1], rates=[2]).signature("x")
    for bad in ({"concurrency": [], "rates": []}, {"rates": [0]}, {"arrival": "bursty", "rates": [1]}):
        with pytest.raises(errors.ConfigError):
            SweepSpec(**{"models": ["m"], "num_ctx": [2048], "concurrency": [1], **bad})  # type: ignore[arg-type]
    # the server's sweep parameters: rates alone measure only the rates; each point counts
    alone = SweepParams(models=["m"], rates=[2, 4])
    assert alone.concurrency == [] and alone.points == 2 and alone.problem() is None
    assert SweepParams(models=["m"], concurrency=[1], rates=[2], arrival="constant").points == 2
    assert SweepParams(models=["m"], concurrency=[]).problem() is not None


# ------------------------------------------------------------------------------------ open loop on the sim


class SendLog(BackendWrapper):
    """Notes when each request is sent to the engine and when its answer is back (perf-counter seconds)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.sent: list[float] = []
        self.answered: list[float] = []
        self.inflight = self.most_inflight = 0

    async def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        self.sent.append(time.perf_counter())
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            async for chunk in self.inner.stream_chat(body, num_ctx=num_ctx):
                yield chunk
        finally:
            self.inflight -= 1
            self.answered.append(time.perf_counter())


@pytest.fixture
async def slow_sim() -> AsyncIterator[OllamaSim]:
    """One slot, ~0.6 s a request (24 tokens at 40 tokens/s): far slower than the rates sent to it."""
    config = SimConfig(models=(SimModel(CHAT),), num_parallel=1, decode_tps=40, default_output_tokens=24)
    async with OllamaSim(config) as sim:
        yield sim


async def _measure(sim: OllamaSim, key: PointKey, n: int) -> tuple[SendLog, Any]:
    backend = SendLog(OllamaBackend(sim.url))
    requests = parse_workload("tiny").requests(CHAT, n, seed=3)
    try:
        point = await measure_point(backend, key, requests, warmup=0, policy=RetryPolicy(max_attempts=1),
                                    max_failure_rate=0.05, seed=5)
    finally:
        await backend.aclose()
    return backend, point


async def test_requests_go_out_on_schedule_whatever_the_engine_answers(slow_sim: OllamaSim) -> None:
    """A closed loop would wait for answers; the open loop sends all 10 requests (20/s, ~0.45 s) while the one
    slot has answered at most a few of them, and the engine's queue holds the rest."""
    log, point = await _measure(slow_sim, PointKey(CHAT, 2048, 0, rate=20.0, arrival="constant"), 10)
    assert len(log.sent) == 10 and len(log.answered) == 10
    answered_by_last_send = sum(1 for t in log.answered if t <= max(log.sent))
    assert answered_by_last_send <= 3, answered_by_last_send  # the schedule did not wait for them
    assert log.most_inflight >= 7  # requests piled up in the engine instead of in the client
    assert point.achieved_rate == pytest.approx(20.0, rel=0.5)  # a loaded machine may be late; never waiting
    assert point.metrics["n_completed"] == 10
    assert point.metrics["latency_p99"] > 3 * min(s.latency_ms for s in point.samples)  # queueing grows latency


async def test_a_cap_holds_requests_in_flight_and_the_achieved_rate_shows_it(slow_sim: OllamaSim) -> None:
    log, point = await _measure(slow_sim, PointKey(CHAT, 2048, 2, rate=20.0, arrival="poisson"), 6)
    assert log.most_inflight == 2  # vLLM's --max-concurrency: the rest wait for a slot
    assert point.achieved_rate is not None and point.achieved_rate < 5.0  # far below the 20/s offered
    assert point.metrics["n_completed"] == 6


# ------------------------------------------------------------------------------- stored, and kept apart


@pytest.fixture
async def sim4() -> AsyncIterator[OllamaSim]:
    config = SimConfig(models=(SimModel(CHAT),), num_parallel=4, prompt_tps=20_000, decode_tps=400,
                       default_output_tokens=4096)
    async with OllamaSim(config) as sim:
        yield sim


@pytest.mark.usefixtures("db_url")
async def test_a_rate_sweep_is_stored_beside_concurrency_and_kept_out_of_best_and_estimates(
        sim4: OllamaSim, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sim4.url)
    spec = SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[1], rates=[2.0, 40.0], arrival="poisson",
                     requests=12, workload="short", seed=1)
    report = await run_sweep(spec, settings=settings, progress=False)
    assert len(report.measured) == 3
    frames = await bench.load_report(settings=settings)
    points = frames.points.sort("rate", nulls_last=False)
    assert points.select("concurrency", "rate", "arrival").rows() == [(1, None, None), (0, 2.0, "poisson"),
                                                                      (0, 40.0, "poisson")]
    assert points["achieved_rate"][0] is None and points["achieved_rate"][2] > points["achieved_rate"][1] > 0
    fast = points.filter(pl.col("rate") == 40.0).row(0, named=True)
    slow = points.filter(pl.col("rate").is_null()).row(0, named=True)
    assert fast["output_tps"] > 1.2 * slow["output_tps"]  # the rate point is the fastest measured ...
    assert frames.best.select("concurrency", "rate").rows() == [(1, None)]  # ... and still not the best
    assert frames.summary.height == 3 and frames.saturation["saturates_at"].to_list() == [1]
    assert frames.runs.select("concurrency", "rates").row(0) == ("[1]", "[2.0,40.0] poisson")
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            fits = await fits_for(session, CHAT)
            assert [(f.concurrency, len(f.point_ids)) for f in fits] == [(1, 1)]  # no fit on a rate point
            loose = capacities(await with_goodput(session, await bench_frames.points(session), {"latency": 600_000.0}),
                               {"latency": 600_000.0})
    finally:
        await engine.dispose()
    by_load = {c.load: c for c in loose}
    assert by_load["concurrency"].concurrency == 1
    rated = by_load["rate"]
    assert rated.rate == 40.0 and rated.arrival == "poisson" and rated.met and rated.concurrency is None
    assert [lv["rate"] for lv in rated.levels] == [2.0, 40.0]
    assert all(lv["achieved_rate"] > 0 for lv in rated.levels)
    # the same sweep again resumes nothing (it finished) and measures afresh; an identical unfinished one would
    again = await run_sweep(spec, settings=settings, progress=False)
    assert again.run_id != report.run_id and len(again.measured) == 3


def test_cli_rate_sweep_with_an_slo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    assert main(["bench", "--backend", "sim", "-m", CHAT, "--num-ctx", "2048", "--rate", "5,10", "--arrival",
                 "constant", "-n", "6", "-w", "tiny", "--data-dir", data, "-q", "--slo", "latency=60s"]) == 0
    out = capsys.readouterr().out
    assert "2 points measured" in out and "5/s→" in out and "10/s→" in out and "constant" in out
    assert "capacity at latency ≤ 60000 ms: 10 req/s offered (constant)" in out
    assert " c=" not in out  # --rate alone: no concurrency levels
    with pytest.raises(SystemExit) as refused:
        main(["bench", "--backend", "sim", "-m", CHAT, "--rate", "0", "--data-dir", data])
    assert refused.value.code == 2 and "request rates are positive" in capsys.readouterr().err


class _PowerCut(Exception):
    pass


class CrashOnPrepare(OllamaBackend):
    def __init__(self, url: str, crash_at: int) -> None:
        super().__init__(url)
        self.prepared, self.crash_at = 0, crash_at

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None) -> float:
        self.prepared += 1
        if self.prepared == self.crash_at:
            raise _PowerCut
        return await super().prepare(model, num_ctx=num_ctx, parallel=parallel)


async def test_an_interrupted_rate_sweep_measures_only_the_missing_rates(
        sim4: OllamaSim, make_settings: Callable[..., Settings]) -> None:
    from obatch.bench.measure import sweep_with
    from obatch.store import bench_repo

    settings = make_settings(sim4.url)
    spec = SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[2], rates=[5.0, 10.0], requests=4, workload="tiny")
    engine, sessions = await open_store(settings.db_url)
    backend = CrashOnPrepare(sim4.url, crash_at=3)
    try:
        with pytest.raises(_PowerCut):
            await sweep_with(sessions, backend, spec, settings=settings, progress=False)
        async with sessions() as session:
            [run] = await bench_repo.list_runs(session)
            assert await bench_repo.done_points(session, run.id) == {(CHAT, 2048, 2, 0, None, None),
                                                                    (CHAT, 2048, 0, 0, 5.0, "poisson")}
    finally:
        await backend.aclose()
        await engine.dispose()
    resumed = await run_sweep(spec, settings=settings, progress=False)
    assert resumed.run_id == run.id
    assert [(p.concurrency, p.rate) for p in resumed.measured] == [(0, 10.0)]
    assert len(resumed.skipped) == 2
