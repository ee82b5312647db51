"""Benchmark maths on known inputs: percentiles, completed-only throughput, engine tok/s, TPOT/ITL, the failure
threshold, sweep ordering, workloads, and the estimator (fits, makespan, parallelism, interpolation, intervals)."""

from __future__ import annotations

import math
import time

import pytest

from obatch import errors
from obatch.bench.estimate.fit import ConfigFit, context_slope, fit_config, least_squares, mean_context
from obatch.bench.estimate.predict import estimate_from_fits
from obatch.bench.estimate.schedule import effective_parallelism, makespan, makespan_at, makespan_runs
from obatch.bench.estimate.shape import Line, Lines, Shape, TokenCalibration, cached_shares, common_prefix, shape_of
from obatch.bench.measure import PointKey, SweepSpec, plan, reloads
from obatch.bench.metrics import Sample, percentile, summarise
from obatch.bench.workloads import WORKLOADS, Lengths, parse_workload
from obatch.store.bench_tables import BenchPointRow, BenchSampleRow


def test_percentiles_interpolate_linearly_like_numpy() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 50) == 35.0
    assert percentile(values, 90) == pytest.approx(46.0)  # numpy.percentile(values, 90)
    assert percentile(values, 99) == pytest.approx(49.6)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summary_counts_completed_requests_only() -> None:
    ok = [Sample(ok=True, latency_ms=float(ms), prompt_tokens=10, completion_tokens=20, engine_prompt_tokens=10,
                 prompt_ms=5.0, decode_ms=100.0, ttft_ms=10.0, itl_ms=[4.0, 6.0]) for ms in (100, 200, 300, 400)]
    failed = [Sample(ok=False, latency_ms=1.0, error_code="server_busy"),
              Sample(ok=False, latency_ms=2.0, error_code="server_busy")]

    m = summarise(ok + failed, wall_seconds=2.0, max_failure_rate=0.5)

    assert (m["n_requests"], m["n_completed"], m["n_failed"]) == (6, 4, 2)
    assert m["req_per_s"] == 2.0  # 4 completed / 2 s: the 2 fast failures are not throughput
    assert m["success_rate"] == pytest.approx(4 / 6)
    assert m["latency_mean"] == 250.0 and m["latency_p50"] == 250.0  # failures' 1-2 ms are not latencies
    assert m["latency_p99"] == pytest.approx(397.0)
    assert m["output_tps"] == 40.0  # 80 completion tokens / 2 s
    assert m["errors"] == {"server_busy": 2}
    assert m["excluded"] is False


def test_engine_rates_come_from_engine_durations_token_weighted() -> None:
    samples = [Sample(ok=True, latency_ms=999.0, prompt_tokens=100, engine_prompt_tokens=100, prompt_ms=50.0,
                      completion_tokens=10, decode_ms=100.0),
               Sample(ok=True, latency_ms=999.0, prompt_tokens=300, engine_prompt_tokens=300, prompt_ms=250.0,
                      completion_tokens=30, decode_ms=500.0)]
    m = summarise(samples, wall_seconds=10.0, max_failure_rate=0.0)
    assert m["prompt_tps"] == pytest.approx(400 / 0.3)  # (100 + 300) tokens / 300 ms
    assert m["gen_tps"] == pytest.approx(40 / 0.6)  # not mean(100, 60) tok/s, and not from latency
    assert m["ttft_mean"] is None and m["tpot_mean"] is None  # nothing streamed, nothing invented


def test_tpot_and_itl_from_the_stream() -> None:
    s = Sample(ok=True, latency_ms=1100.0, completion_tokens=11, ttft_ms=100.0, itl_ms=[90.0, 110.0, 100.0])
    m = summarise([s], wall_seconds=1.1, max_failure_rate=0.0)
    assert s.tpot_ms == pytest.approx(100.0)  # (1100 - 100) / (11 - 1)
    assert m["tpot_p50"] == pytest.approx(100.0)
    assert m["itl_mean"] == pytest.approx(100.0) and m["itl_p50"] == pytest.approx(100.0)
    assert m["ttft_p99"] == 100.0


def test_a_point_over_the_failure_threshold_is_marked() -> None:
    samples = [Sample(ok=True, latency_ms=10.0)] * 9 + [Sample(ok=False, latency_ms=1.0)]
    assert summarise(samples, 1.0, max_failure_rate=0.05)["excluded"] is True
    assert summarise(samples, 1.0, max_failure_rate=0.10)["excluded"] is False
    nothing = summarise([], 1.0, max_failure_rate=0.05)
    assert nothing["excluded"] is True and nothing["req_per_s"] == 0.0


def test_sweep_order_reloads_each_configuration_once() -> None:
    points = plan(["a", "b"], [2048, 8192], [1, 2, 4], repeats=2)
    assert len(points) == 24
    assert points[:3] == [PointKey("a", 2048, 1, 0), PointKey("a", 2048, 1, 1), PointKey("a", 2048, 2, 0)]
    # Ollama reloads on model or num_ctx: the minimum is one load per (model, num_ctx)
    assert reloads(points, restart_on_concurrency=False) == 4
    # the embedded engine restarts on slot count too: one per (model, num_ctx, concurrency)
    assert reloads(points, restart_on_concurrency=True) == 12
    shuffled = sorted(points, key=lambda p: (p.repeat, p.concurrency, p.num_ctx, p.model))
    assert reloads(shuffled, restart_on_concurrency=False) > 4


def test_sweep_spec_normalises_and_signs_its_identity() -> None:
    spec = SweepSpec(models=["m"], num_ctx=[8192, 2048, 2048], concurrency=[4, 1], requests=8, workload="short")
    assert spec.num_ctx == [2048, 8192] and spec.concurrency == [1, 4]
    same = SweepSpec(models=["m"], num_ctx=[2048, 8192], concurrency=[1, 4], requests=8, workload="short",
                     name="another label")
    assert spec.signature("ollama") == same.signature("ollama") != spec.signature("local")
    assert spec.signature("ollama") != SweepSpec(models=["m"], num_ctx=[2048], concurrency=[1, 4], requests=8,
                                                 workload="short").signature("ollama")
    with pytest.raises(errors.ConfigError):
        SweepSpec(models=[], num_ctx=[2048], concurrency=[1])


def test_workloads_are_seeded_and_follow_their_lengths() -> None:
    chat = WORKLOADS["chat"]
    first, again = chat.requests("m", 50, seed=3), chat.requests("m", 50, seed=3)
    assert [r.body for r in first] == [r.body for r in again]
    assert [r.body for r in first] != [r.body for r in chat.requests("m", 50, seed=4)]
    assert all(32 <= r.max_tokens <= 192 for r in first if r.max_tokens is not None)
    assert all(r.body["ignore_eos"] and r.body["model"] == "m" and r.body["temperature"] == 0 for r in first)
    assert len({r.body["messages"][0]["content"] for r in first}) == 50
    lengths = [len(r.body["messages"][0]["content"]) for r in first]
    assert min(lengths) >= 32 * 4 and max(lengths) <= 512 * 4 + 200
    custom = parse_workload("prompt=100-100,output=7")
    assert custom.prompt == Lengths(100, 100) and custom.output == Lengths(7, 7)
    assert all(r.max_tokens == 7 for r in custom.requests("m", 5, seed=0))
    with pytest.raises(errors.ConfigError):
        parse_workload("no-such-workload")
    with pytest.raises(errors.ConfigError):
        parse_workload("prompt=9-3")


def test_least_squares_recovers_known_coefficients_and_stays_non_negative() -> None:
    xs = [(p, p * p) for p in (10.0, 50.0, 100.0, 400.0, 800.0)]
    y = [2.0 * a + 0.001 * b for a, b in xs]
    assert least_squares(xs, y) == pytest.approx([2.0, 0.001])
    # data that would need a negative quadratic term: the term is dropped, not fitted negative
    y_down = [2.0 * a - 0.001 * b for a, b in xs]
    coef = least_squares(xs, y_down)
    assert coef is not None and coef[1] == 0.0 and coef[0] > 0


def test_makespan_and_effective_parallelism() -> None:
    jobs = [100.0] * 8
    assert makespan(jobs, 1) == 800.0
    assert makespan(jobs, 4) == 200.0
    assert makespan([300.0, 100.0, 100.0, 100.0], 2) == 300.0  # one queue: the long job's worker takes no more
    assert makespan_at(jobs, 2.5) == pytest.approx((400.0 + makespan(jobs, 3)) / 2)
    assert effective_parallelism(jobs, 400.0, 4) == pytest.approx(2.0, abs=1e-6)  # an engine with 2 slots
    assert effective_parallelism(jobs, 150.0, 4) == 4.0  # faster than c workers: capped at c
    assert effective_parallelism(jobs, 900.0, 4) == 1.0


def _fake_fit(concurrency: int, num_ctx: int = 2048, *, per_token_ms: float = 10.0, load: float = 0.5,
              efficiency: tuple[float, ...] = (1.0,)) -> ConfigFit:
    return ConfigFit(backend="local", model="m", num_ctx=num_ctx, concurrency=concurrency, run_id="run",
                     point_ids=[concurrency], overhead_ms=0.0, p0=0.0, p1=0.0, decode_ms=per_token_ms,
                     decode_ctx=100.0, ctx_slope=0.0, prompt_stall=0.0, parallelism=float(concurrency),
                     efficiency=list(efficiency),
                     load_seconds=load,
                     prompt_range=(10, 500), output_range=(10, 200), rel_rmse=0.1, n_samples=32)


def test_estimate_is_token_aware_and_config_aware() -> None:
    fits = [_fake_fit(1, per_token_ms=10.0), _fake_fit(4, per_token_ms=20.0), _fake_fit(4, 8192, per_token_ms=21.0)]
    shape = Shape.uniform(100, prompt_tokens=50, output_tokens=100)

    best = estimate_from_fits(fits, shape)
    assert (best.num_ctx, best.concurrency) == (2048, 4)
    # 100 requests of 100 tokens × 20 ms on 4 workers = 25 waves × 2 s, plus the load
    assert best.seconds == pytest.approx(50.0 + 0.5)
    assert best.low < best.seconds < best.high
    assert {p["id"] for p in best.points} == {4}

    serial = estimate_from_fits(fits, shape, concurrency=1)
    assert serial.seconds == pytest.approx(100 * 1.0 + 0.5)
    longer = estimate_from_fits(fits, Shape.uniform(100, 50, 200), concurrency=1)
    assert longer.seconds - 0.5 == pytest.approx(2 * (serial.seconds - 0.5))  # twice the output, twice the time

    middle = estimate_from_fits(fits, shape, concurrency=2)  # between measured 1 and 4: throughput in log c
    assert 50.5 < middle.seconds < 100.5
    assert any("interpolated" in n for n in middle.notes)
    beyond = estimate_from_fits(fits, shape, concurrency=16)
    assert beyond.seconds == pytest.approx(best.seconds) and any("not measured" in n for n in beyond.notes)
    assert beyond.high - beyond.low > best.high - best.low


def test_estimate_prefers_a_num_ctx_that_holds_the_longest_request() -> None:
    fits = [_fake_fit(4, 2048, per_token_ms=10.0), _fake_fit(4, 8192, per_token_ms=30.0)]
    small = estimate_from_fits(fits, Shape.uniform(10, 100, 100))
    assert small.num_ctx == 2048
    big = estimate_from_fits(fits, Shape.uniform(10, 3000, 100))  # needs 3100 tokens: only 8192 holds it
    assert big.num_ctx == 8192 and big.best["num_ctx"] == 8192
    assert all(c["num_ctx"] == 8192 for c in big.candidates)
    assert any("outside the measured" in n for n in big.notes)


def test_finished_batches_correct_later_estimates() -> None:
    fits = [_fake_fit(1), _fake_fit(4)]
    shape = Shape.uniform(100, 50, 100)
    raw = estimate_from_fits(fits, shape, concurrency=4)
    learned = estimate_from_fits(fits, shape, concurrency=4, history=[(4, 0.8), (4, 0.9), (1, 2.0)])
    shrunk = ((0.8 * 0.9) ** 0.5) ** (2 / 3)  # their geometric median, two thirds of the way from 1 (n / (n + 1))
    assert learned.history_factor == pytest.approx(shrunk) and learned.history_batches == 2  # same concurrency
    assert learned.seconds - learned.load_seconds == pytest.approx(shrunk * (raw.seconds - raw.load_seconds))
    assert any("finished batch" in note for note in learned.notes)
    other = estimate_from_fits(fits, shape, concurrency=1, history=[(4, 0.8), (2, 0.9)])  # none at c=1: all
    assert other.history_factor == pytest.approx(shrunk)
    many = estimate_from_fits(fits, shape, concurrency=4, history=[(4, 0.8)] * 9)
    assert many.history_factor == pytest.approx(0.8 ** 0.9)  # nine batches agreeing: nine tenths of the way


def test_cached_prompts_stall_the_others_less() -> None:
    fit = _fake_fit(4, per_token_ms=40.0)
    fit.p0 = 5.0
    measured = [(200.0, 100.0, 0.0)] * 8
    fit.prompt_stall = fit.stall_of(measured)  # 3 others × 1000 ms of prompt / 100 tokens = 30 ms per token
    assert fit.prompt_stall == pytest.approx(30.0)
    cached = [(200.0, 100.0, 0.5)] * 8
    assert fit.stall_of(cached) == pytest.approx(15.0)
    fresh, reused = fit.services(measured), fit.services(cached)
    assert reused[-1] == pytest.approx(fresh[-1] - 500.0 - 100 * 15.0)  # its own prompt, and the others' stall


def test_interval_widens_with_spread_between_repeats() -> None:
    shape = Shape.uniform(100, 50, 100)
    steady = estimate_from_fits([_fake_fit(4, efficiency=(1.0, 1.0, 1.0))], shape)
    noisy = estimate_from_fits([_fake_fit(4, efficiency=(0.8, 1.0, 1.2))], shape)
    assert noisy.seconds == pytest.approx(steady.seconds)
    assert (noisy.high - noisy.low) > 3 * (steady.high - steady.low)


def test_fit_recovers_a_known_engine_and_calibrates_parallelism() -> None:
    """Synthetic points of an engine with 2 slots measured at concurrency 4: prompt 0.5 ms/token, decode 10 ms per
    token at the point's mean context, +0.01 ms per token of context per sequence in flight, 5 ms overhead; the first
    wave's prompts are processed as one batch."""
    shapes = [(float(p), float(o), 0.0) for p in (20, 100, 300, 600) for o in (16, 64, 128, 256)]
    truth = _fake_fit(4)
    truth.p0, truth.overhead_ms, truth.parallelism = 0.5, 5.0, 2.0
    truth.decode_ms, truth.decode_ctx, truth.ctx_slope = 10.0, mean_context(shapes), 0.01
    truth.prompt_stall = truth.stall_of(shapes)  # measured decode times include the others' prompts
    services = truth.services(shapes)
    wave = sum(0.5 * p for p, _, _ in shapes[:4])
    samples = [BenchSampleRow(point_id=1, idx=i, ok=True, prompt_tokens=int(p), completion_tokens=int(o),
                              prompt_ms=wave if i < 4 else 0.5 * p,
                              decode_ms=o * truth.per_token_ms(p + o / 2, truth.decode_ctx),
                              latency_ms=services[i], prompt_estimate=int(p))
               for i, (p, o, _) in enumerate(shapes)]
    wall = makespan(services, 2) / 1000  # 2 slots really, whatever the client's concurrency
    point = BenchPointRow(id=1, run_id="r", backend="ollama", model="m", num_ctx=2048, concurrency=4, workload="w",
                          created_at=0.0, n_requests=16, n_completed=16, n_failed=0, success_rate=1.0,
                          wall_seconds=wall, req_per_s=16 / wall, output_tps=1.0, load_seconds=1.5)

    slope = context_slope([samples])
    fit = fit_config([point], samples, ctx_slope=slope)

    assert slope == pytest.approx(0.01, rel=1e-6)  # each request's own context: its per-token time
    assert fit is not None
    assert (fit.p0, fit.p1, fit.decode_ms) == pytest.approx((0.5, 0.0, 10.0), rel=1e-6, abs=1e-9)
    assert fit.decode_ctx == pytest.approx(truth.decode_ctx)
    assert fit.overhead_ms == pytest.approx(5.0)
    assert fit.parallelism == pytest.approx(2.0, abs=0.01)
    assert fit.k == pytest.approx(1.0, abs=0.01)
    assert fit.rel_rmse == pytest.approx(0.0, abs=1e-9)
    same = Shape([p for p, _, _ in shapes], [o for _, o, _ in shapes])
    assert fit.run_seconds(same) == pytest.approx(wall, rel=0.01)
    # a workload attending to 300 more tokens on average: 4 in flight × 0.01 ms × 300 = +12 ms per output token
    longer = Shape([p + 300 for p in same.prompt_tokens], same.output_tokens)
    assert fit.per_token_ms(truth.decode_ctx + 300, truth.decode_ctx + 300) == pytest.approx(22.0)
    assert fit.run_seconds(longer) == pytest.approx(truth.run_seconds(longer), rel=0.01)
    assert fit.run_seconds(longer) > 1.5 * fit.run_seconds(same)


def test_shapes_from_files_use_the_calibration() -> None:
    calibration = TokenCalibration(slope=0.8, intercept=10.0, output_fill=0.5, unbounded_output=300)
    shape = shape_of(Lines.of([Line(100, 64), Line(200, None)]), calibration)
    assert shape.prompt_tokens == [90.0, 170.0]
    assert shape.output_tokens == [32.0, 300.0]
    assert shape.cached == [0.0, 0.0]
    assert shape.need == 470 and shape.n == 2
    assert any("without max_tokens" in note for note in shape.notes)
    with pytest.raises(errors.NotFoundError):
        estimate_from_fits([], shape)


def test_shared_prompt_prefixes_are_not_charged_twice() -> None:
    assert common_prefix("abcdef", "abcxyz") == 3 and common_prefix("", "abc") == 0
    assert common_prefix("same", "same") == 4 and common_prefix("ab", "abc") == 2
    system = "S" * 80
    texts = [system + "q1-xxxxxxxxxxxxxxxxxx", system + "q2-yyyyyyyyyyyyyyyyyy", "other" * 20]
    shares = cached_shares(texts, window=1)
    assert shares[0] == 0.0  # nothing before it
    assert shares[1] == pytest.approx(81 / 101)  # the system prompt and "q" are cached
    assert shares[2] == 0.0
    assert cached_shares(texts, window=2)[2] == 0.0
    # the cached share is not processed again: a shared 80% prefix cuts the prompt cost by 80%
    fit = _fake_fit(1)
    fit.p0, fit.decode_ms = 10.0, 0.0
    assert fit.service_ms(100, 0, cached=0.8) == pytest.approx(0.2 * fit.service_ms(100, 0))
    texts = [system + f"question {i}" for i in range(10)]
    shape = shape_of(Lines.of([Line(100, 10)] * 20, texts), TokenCalibration())
    assert shape.cached is not None and shape.cached[10:] == [pytest.approx(sum(shape.cached[:10]) / 10)] * 10
    assert any("prefix cache" in note for note in shape.notes)


def test_estimate_serialises_to_json_types() -> None:
    made = estimate_from_fits([_fake_fit(2)], Shape.uniform(10, 10, 10)).as_dict()
    assert {"seconds", "low", "high", "num_ctx", "concurrency", "best", "candidates", "points", "notes"} <= set(made)
    assert all(not isinstance(v, float) or math.isfinite(v) for v in made.values())


@pytest.mark.parametrize("n", [1, 3, 4, 7, 50, 1001])
@pytest.mark.parametrize(("concurrency", "parallelism"), [(1, 1.0), (4, 4.0), (4, 2.5), (8, 3.0), (16, 16.0)])
def test_a_uniform_workload_is_estimated_without_listing_its_requests(n: int, concurrency: int,
                                                                      parallelism: float) -> None:
    """``Shape.uniform`` holds one request and a count; its running time must be exactly that of the n requests
    listed one by one (first wave included), however many there are."""
    fit = _fake_fit(concurrency, per_token_ms=12.0)
    fit.p0, fit.p1, fit.overhead_ms, fit.parallelism, fit.ctx_slope = 0.8, 0.001, 7.0, parallelism, 0.002
    listed = Shape([300.0] * n, [40.0] * n)
    uniform = Shape.uniform(n, 300, 40)
    assert uniform.n == n and len(uniform.prompt_tokens) == 1
    assert fit.run_seconds(uniform) == pytest.approx(fit.run_seconds(listed), rel=1e-9)
    assert (uniform.mean_prompt, uniform.mean_output, uniform.need) == (listed.mean_prompt, listed.mean_output,
                                                                        listed.need)


def test_makespan_of_runs_matches_the_listed_jobs() -> None:
    runs = [(500.0, 3), (90.0, 40), (130.0, 5), (20.0, 97)]
    listed = [s for s, count in runs for _ in range(count)]
    for workers in (1, 2, 3, 4, 7, 200):
        assert makespan_runs(runs, workers) == pytest.approx(makespan(listed, workers), rel=1e-12)


def test_a_huge_uniform_workload_costs_no_more_than_a_small_one() -> None:
    fits = [_fake_fit(1), _fake_fit(4), _fake_fit(8)]
    started = time.perf_counter()
    small = estimate_from_fits(fits, Shape.uniform(1000, 50, 100))
    small_s = time.perf_counter() - started
    started = time.perf_counter()
    huge = estimate_from_fits(fits, Shape.uniform(10**12, 50, 100))
    assert time.perf_counter() - started < max(1.0, 50 * small_s)  # 10^12 listed requests would never finish
    assert huge.seconds - huge.load_seconds == pytest.approx((small.seconds - small.load_seconds) * 10**9, rel=1e-3)


def test_the_low_end_of_the_interval_is_never_negative() -> None:
    wild = _fake_fit(4, efficiency=(0.1, 1.0, 3.0))  # repeats that disagree wildly: a margin over 100%
    made = estimate_from_fits([wild], Shape.uniform(1, 50, 100), concurrency=64)
    assert made.high > 2 * (made.seconds - made.load_seconds)
    # errors of a duration are multiplicative: the low end divides by what the high end multiplies by
    assert made.load_seconds < made.low < made.seconds
    assert (made.seconds - made.load_seconds) / (made.low - made.load_seconds) == pytest.approx(
        (made.high - made.load_seconds) / (made.seconds - made.load_seconds))
