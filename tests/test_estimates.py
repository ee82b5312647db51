"""Estimates of natural files (answers with no max_tokens, mixed caps) on the simulator: answer lengths learnt from
finished batches or a pilot, intervals that hold the estimate and stay above zero, pilot lines never run twice, one
figure for one file whichever way it is asked, and the live remaining time of a running batch."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from obatch import context
from obatch.api import run_batch_file
from obatch.backends.base import Capabilities, capabilities_of
from obatch.backends.ollama import OllamaBackend
from obatch.backends.openai import OpenAIBackend
from obatch.backends.pool import Pool
from obatch.bench import cli as bench_cli
from obatch.bench.answers import AnswerLengths, Observation, observe, survival, t_quantile
from obatch.bench.estimate import shape as shape_module
from obatch.bench.estimate.calibrate import cache_kept, pilot_cache_kept
from obatch.bench.estimate.fit import _fit_configs, in_flight, position_fit
from obatch.bench.estimate.predict import estimate_from_fits
from obatch.bench.estimate.request import EstimateRequest, estimate_groups
from obatch.bench.estimate.schedule import makespan, speedups
from obatch.bench.estimate.shape import (
    SAMPLE,
    Line,
    Lines,
    Shape,
    TokenCalibration,
    cached_shares,
    prompt_text,
    shape_of,
)
from obatch.bench.measure import SweepSpec, run_sweep
from obatch.bench.pilot_run import (
    AUTO_WITHIN,
    allocate,
    auto_sizes,
    file_sha256,
    pilot_size,
    run_pilot,
    sample_file,
    stratum,
)
from obatch.bench.schemas import EstimateRecord
from obatch.bench.service import answers_margin, combined
from obatch.cli import _parser
from obatch.config import Settings
from obatch.progress import LiveEta
from obatch.protocol import Batch, BatchEta, DurationEstimate
from obatch.store import bench_repo
from obatch.store.bench_tables import BenchPointRow, BenchSampleRow
from obatch.store.db import open_store
from obatch.store.tables import PilotRow
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel
from obatch.ui import views
from tests.helpers import chat_line, write_jsonl
from tests.serverkit import settled
from tests.ui_fake import FakeServer

CHAT = "llama3.2:1b"
# Natural answers: the simulator ends each answer after 8-80 words drawn from the prompt (when nothing cuts it).
SIM = SimConfig(models=(SimModel(CHAT),), num_parallel=2, prompt_tps=20_000, decode_tps=2000,
                default_output_tokens=40)


def natural_file(path: Path, n: int, *, seed: int, caps: tuple[int | None, ...] = (None,)) -> Path:
    rng = random.Random(seed)
    topics = ("rivers", "bread", "owls", "glass", "maps", "tea", "snow", "clocks")
    lines = []
    for i in range(n):
        cap = rng.choice(caps)
        extra = {"max_tokens": cap} if cap is not None else {}
        text = f"Tell me about {rng.choice(topics)} number {seed}-{i}. " + "Some context. " * rng.randint(0, 6)
        lines.append(chat_line(f"line-{i}", text, model=CHAT, **extra))
    return write_jsonl(path, lines)


# ------------------------------------------------------------------------------------------ answer lengths


def test_answer_lengths_take_cut_answers_as_lower_bounds() -> None:
    ended = [Observation(float(t), True) for t in (10, 20, 30, 40)]
    curve = survival(ended)
    assert curve == [(10, 0.75), (20, 0.5), (30, 0.25), (40, 0.0)]
    lengths = AnswerLengths.learn(ended * 2, "batches")
    assert lengths.known and lengths.expected(None) == pytest.approx(25.0)
    assert lengths.expected(20) == pytest.approx(10 + 0.75 * 10)  # min(X, 20): a cap is a hard bound
    assert lengths.expected(5) == 5.0
    assert lengths.draw(None, 0.1) == 10 and lengths.draw(None, 0.99) == 40 and lengths.draw(15, 0.99) == 15
    # answers cut at their cap of 25 only say "at least 25": the mean of what ran without a cap rises
    cut = [observe(25, 25, "length"), observe(25, 25, None), observe(12, 25, "stop")]
    assert [o.ended for o in cut if o] == [False, False, True]
    cut_at_25 = [Observation(25.0, False)] * 6
    censored = AnswerLengths.learn(ended * 2 + cut_at_25, "batches")
    naive = AnswerLengths.learn(ended * 2 + [Observation(25.0, True)] * 6, "batches")
    assert censored.expected(None) > naive.expected(None) + 3  # the cut ones went on past 25 (to 30 or 40 here)
    assert censored.expected(25) == pytest.approx(naive.expected(25))  # under the cap they agree
    # nothing known: the cap, or the assumed default for an uncapped request, and a note offering a pilot
    unknown = AnswerLengths()
    assert not unknown.known and unknown.expected(64) == 64
    assert any("pilot" in n for n in unknown.notes(capped=0, uncapped=3))


def test_answers_the_context_cut_run_to_the_context_left_at_the_next_batch() -> None:
    """A small model loops on a quarter of its answers until the context is full: at num_ctx 2,048 such an answer
    is cut at 2,048 − prompt. That length belongs to that run: at num_ctx 512 the same answer runs to 512 − prompt,
    and with a cap to the cap. The share that runs on is what is learnt, not 2,018 tokens as a natural length."""
    runaway = observe(2018, None, "length", "b1")
    assert runaway is not None and runaway.runaway and not runaway.ended
    at_cap = observe(64, 64, "length", "b1")
    assert at_cap is not None and not at_cap.runaway  # its cap cut it: it says "at least 64", nothing more
    below_cap = observe(400, 1024, "length", "b1")  # the context ended it before its cap
    assert below_cap is not None and below_cap.runaway
    stopped = [Observation(float(t), True, "b1") for t in (8, 12, 16, 20) * 6]  # 24 answers, mean 14
    lengths = AnswerLengths.learn(stopped + [runaway] * 8, "batches")
    assert lengths.runaways == 8 and lengths.runaway_share == pytest.approx(0.25)
    assert lengths.expected(None, room=482) == pytest.approx(0.75 * 14 + 0.25 * 482)
    assert lengths.expected(None, room=4000) == pytest.approx(0.75 * 14 + 0.25 * 4000)
    assert lengths.expected(100, room=482) == pytest.approx(0.75 * 14 + 0.25 * 100)  # the cap comes first
    assert lengths.draw(None, 0.9, room=482) == 482 and lengths.draw(64, 0.9, room=482) == 64
    assert lengths.draw(None, 0.5, room=482) == 16
    assert any("context window" in n for n in lengths.notes(capped=0, uncapped=10))
    # answers cut only at their caps (none by the context): the open tail still stops at the longest seen
    capped = AnswerLengths.learn(stopped + [Observation(64.0, False, "b1")] * 8, "batches")
    assert capped.runaways == 0 and capped.expected(None, room=4000) == pytest.approx(0.75 * 14 + 0.25 * 64)


def test_an_estimate_ends_runaway_answers_at_its_own_num_ctx() -> None:
    """History at num_ctx 2,048 (a quarter of the answers cut there), the next batch at 512: its uncapped lines
    are expected to run a quarter of the time to 512 − prompt, not to the 2,018 tokens seen at 2,048."""
    from tests.test_bench_metrics import _fake_fit

    stopped = [Observation(float(t), True, "b1") for t in (8, 12, 16, 20) * 6]
    answers = AnswerLengths.learn(stopped + [Observation(2018.0, False, "b1", runaway=True)] * 8, "batches")
    lines = Lines.of([Line(30, None)] * 40)
    calibration = TokenCalibration(answers=answers)
    small = shape_of(lines, calibration, num_ctx=512)
    assert small.mean_output == pytest.approx(0.75 * 14 + 0.25 * (512 - 30))
    fit = _fake_fit(4, 512, per_token_ms=20.0)
    made = estimate_from_fits([fit], small, concurrency=4, include_load=False)
    assert made.output_tokens_mean == pytest.approx(0.75 * 14 + 0.25 * 482)
    assert made.seconds < 0.5 * estimate_from_fits([fit], shape_of(lines, calibration, num_ctx=2048),
                                                   concurrency=4, include_load=False).seconds


def test_a_long_answer_left_alone_at_the_end_runs_at_the_speed_of_one() -> None:
    """On a CPU, four sequences decoding side by side take 24 ms per token each, one alone 8 ms: the run's last
    long answer, once the others are done, goes three times as fast as its service time at full load says. The
    makespan of a small file with one runaway answer is that answer's own time alone, not at full load."""
    assert speedups({1: 8.0, 2: 16.0, 4: 24.0}, 4) == pytest.approx((3.0, 1.5, 1.2))
    assert speedups({4: 24.0}, 4) == () and speedups({2: 8.0, 4: 24.0}, 4) == ()  # nothing below tells
    assert speedups({1: 30.0, 4: 24.0}, 4) == pytest.approx((1.0, 1.0, 1.0))  # never slower alone
    assert speedups({1: 1.0, 4: 24.0}, 4) == pytest.approx((4.0, 2.0, 4 / 3))  # nor more throughput than at 4
    # three short jobs and a long one, four at a time: all at full load until 1,000 ms, then the long one alone
    assert makespan([1000.0] * 3 + [10000.0], 4, (3.0, 1.5, 1.2)) == pytest.approx(1000 + 9000 / 3)
    assert makespan([1000.0] * 3 + [10000.0], 4) == 10000.0  # as before: every job at its full-load time
    assert makespan([1000.0] * 8, 4, (3.0, 1.5, 1.2)) == makespan([1000.0] * 8, 4)  # equal jobs end together
    # through an estimate: a file of 11 short answers and one that runs to the context, four at a time
    from tests.test_bench_metrics import _fake_fit

    fit = _fake_fit(4, 512, per_token_ms=24.0)
    fit.speed = speedups({1: 8.0, 2: 16.0, 4: 24.0}, 4)
    shape = Shape([30.0] * 12, [10.0] * 11 + [480.0])
    # two waves of short ones (0.48 s), then the long one beside the last three for their 10 tokens, then alone
    assert fit.run_seconds(shape) == pytest.approx(0.48 + 10 * 0.024 + 470 * 0.008, rel=0.01)
    assert fit.run_seconds(shape) < 0.4 * 480 * 24.0 / 1000


async def test_an_estimate_ends_answers_at_the_context_it_is_made_for(swept: tuple[Settings, OllamaSim],
                                                                       tmp_path: Path) -> None:
    """A batch run at num_ctx 160 (a model of that context): its uncapped answers can take at most the context
    left after each prompt, and the estimate made for that num_ctx says so."""
    settings, _sim = swept
    path = natural_file(tmp_path / "narrow.jsonl", 12, seed=5)
    wide = await _file_estimate(settings, path)
    narrow = await _file_estimate(settings, path, num_ctx=160)
    assert wide.output_tokens_mean == pytest.approx(256)  # nothing known: 256 tokens assumed per answer
    # ended by the context left after each prompt
    assert narrow.output_tokens_mean is not None and narrow.output_tokens_mean < 160 - 20
    assert narrow.seconds < wide.seconds


def test_under_auto_the_estimate_runs_at_the_level_auto_settles_on() -> None:
    """Auto concurrency keeps a probe only when it gains 5%: on a curve where 2 gains 2% over 1 and 4 doubles it,
    auto stays at 1 (and the estimate with it, not at the fastest level the sweep measured); an engine that reports
    4 slots starts auto at 4, where a quarter more gains nothing. A curve still rising at the highest measured level
    may take auto past it: the interval's lower end widens as for a level not measured, and, where a doubling still
    doubled the throughput, by one more step of that gain."""
    from tests.test_bench_metrics import _fake_fit

    fits = [_fake_fit(1, per_token_ms=10.0), _fake_fit(2, per_token_ms=19.6), _fake_fit(4, per_token_ms=20.0),
            _fake_fit(8, per_token_ms=40.0)]
    shape = Shape.uniform(200, prompt_tokens=50, output_tokens=100)
    alone = estimate_from_fits(fits, shape, num_ctx=2048)
    assert alone.concurrency == 1 and alone.best is not None and alone.best["concurrency"] == 4
    assert any("settle at 1" in note for note in alone.notes)
    assert alone.seconds == pytest.approx(estimate_from_fits(fits, shape, concurrency=1).seconds)
    assert estimate_from_fits(fits, shape, num_ctx=2048, slots=4).concurrency == 4
    rising = [_fake_fit(1, per_token_ms=10.0), _fake_fit(2, per_token_ms=10.0)]
    open_ended = estimate_from_fits(rising, shape)
    pinned = estimate_from_fits(rising, shape, concurrency=2)
    assert open_ended.concurrency == 2 and any("may go past 2" in note for note in open_ended.notes)
    assert open_ended.low < pinned.low / 1.9 and open_ended.high == pytest.approx(pinned.high)


def test_a_pilot_interval_is_the_t_interval_of_its_sample() -> None:
    assert t_quantile(0.975, 15) == pytest.approx(2.131, abs=0.01)
    assert t_quantile(0.975, 5) == pytest.approx(2.571, abs=0.03)
    values = [10.0, 30.0, 50.0, 70.0] * 4
    pilot = AnswerLengths.learn([Observation(v, True, "pilot") for v in values], "pilot", population=1000)
    half = 2.131 * 22.9 / 4 * math.sqrt(1 - 16 / 1000)  # t · s / √n, finite-population corrected
    assert pilot.mean_cv * 1.96 * 40 == pytest.approx(half, rel=0.02)
    whole = AnswerLengths.learn([Observation(v, True, "pilot") for v in values], "pilot", population=16)
    assert whole.mean_cv == 0.0  # the pilot was the whole file


def test_intervals_never_go_below_zero_and_hold_the_estimate() -> None:
    from tests.test_bench_metrics import _fake_fit

    unknown = AnswerLengths()
    for efficiency in ((1.0,), (0.1, 1.0, 3.0), (0.01, 5.0)):
        fit = _fake_fit(4, efficiency=efficiency)
        for caps in ([None] * 20, [16, None, 400] * 7, [8] * 3):
            shape = Shape([50.0] * len(caps), [unknown.expected(c) for c in caps], caps=list(caps), answers=unknown)
            made = estimate_from_fits([fit], shape)
            assert 0 <= made.low <= made.seconds <= made.high
            DurationEstimate.model_validate(made.as_dict())  # the wire model refuses anything else
    with pytest.raises(ValueError, match="interval"):
        DurationEstimate(model="m", num_requests=1, seconds=10, low=-1, high=20)


# ------------------------------------------------------------------------------ decoding slows as context grows

# A synthetic engine: a token decoded at context position x takes 5 + 0.002·x + 4e-6·x² ms (attention over a
# longer context; at 1,900 tokens more than three times the time near the start), prompts 0.5 ms per token.
SLOPE, CURVE, BASE = 0.002, 4e-6, 5.0


def _decode_ms(prompt: float, output: float, offset: float = 0.0) -> float:
    """The exact sum over the answer's tokens at positions prompt … prompt + output."""
    return sum(BASE + offset + SLOPE * x + CURVE * x * x for x in
               (prompt + i + 0.5 for i in range(int(output))))


def _short_sweep() -> tuple[BenchPointRow, list[BenchSampleRow]]:
    """A sweep point at concurrency 1 whose requests all sit near the start of the context (forced answers of a
    few dozen tokens), as a sweep's do: it cannot see how decoding slows further on."""
    shapes = [(100.0, 64.0)] * 16
    samples = [BenchSampleRow(point_id=1, idx=i, ok=True, prompt_tokens=int(p), completion_tokens=int(o),
                              prompt_ms=0.5 * p, decode_ms=_decode_ms(p, o), latency_ms=0.5 * p + _decode_ms(p, o),
                              prompt_estimate=int(p)) for i, (p, o) in enumerate(shapes)]
    wall = sum(s.latency_ms for s in samples) / 1000
    point = BenchPointRow(id=1, run_id="r", backend="local", model="m", num_ctx=2048, concurrency=1, workload="w",
                          created_at=0.0, n_requests=16, n_completed=16, n_failed=0, success_rate=1.0,
                          wall_seconds=wall, req_per_s=16 / wall, output_tps=1.0, load_seconds=0.0)
    return point, samples


def _long_answers(offset: float) -> list[tuple[float, float, float]]:
    """Timed natural answers of a finished batch (or a pilot): some stop early, some run on to the window."""
    return [(p, o, _decode_ms(p, o, offset)) for p in (20.0, 60.0) for o in (12.0, 150.0, 700.0, 1300.0, 1900.0)]


def test_the_decode_model_learns_how_decoding_slows_at_long_contexts() -> None:
    # each group (a batch, a pilot) runs at its own speed: only the growth within a group is pooled
    groups = [_long_answers(0.0), _long_answers(3.0)]
    slope, curve = position_fit(groups)
    assert slope == pytest.approx(SLOPE, rel=0.02) and curve == pytest.approx(CURVE, rel=0.02)
    line, none = position_fit(groups, curve=False)
    assert line > SLOPE and none == 0.0  # a straight line through the same timings
    assert position_fit([_long_answers(0.0)[:2]]) == (0.0, 0.0)  # too few to tell anything

    point, samples = _short_sweep()
    flat = _fit_configs([point], samples)[0]  # the sweep alone: every request at the same short context
    learnt = _fit_configs([point], samples, groups)[0]
    assert (learnt.ctx_slope, learnt.ctx_curve) == pytest.approx((SLOPE, CURVE), rel=0.02)
    assert learnt.k == pytest.approx(1.0, abs=0.01)  # the sweep's own requests are still what it measured
    for prompt, output in ((30.0, 1900.0), (200.0, 800.0), (100.0, 64.0)):
        truth = (0.5 * prompt + _decode_ms(prompt, output)) / 1000
        shape = Shape([prompt], [output])
        assert learnt.run_seconds(shape) == pytest.approx(truth, rel=0.03)
    long_truth = (15 + _decode_ms(30.0, 1900.0)) / 1000
    assert flat.run_seconds(Shape([30.0], [1900.0])) < 0.5 * long_truth  # what the sweep alone would say
    # the squared term is what holds at the end of the window: without it the same fit falls well short
    straight = dataclasses.replace(learnt, ctx_curve=0.0)
    assert straight.run_seconds(Shape([30.0], [1900.0])) < 0.8 * long_truth


def test_a_short_answer_beside_long_ones_is_slow_for_their_sake() -> None:
    """A decode step attends to every sequence in flight: short answers that ran beside long ones late in their
    lives were slow per token, short answers alone fast. With what was in flight (start and end times), the slope
    comes back exactly, and a
    request a busy machine stalled twenty-fold does not move it. Regressed on each answer's own context, the slope
    comes out wrong (the long answers' time per token is as much the others' doing as their own)."""
    slope = 0.004
    layout = [(30.0, 1900.0, 0.0, 100.0), (30.0, 1900.0, 0.0, 100.0), (30.0, 1900.0, 0.0, 100.0)]
    layout += [(30.0, 40.0, 10.0 * k, 10.0 * k + 3) for k in range(9)]  # beside the long ones, ever later
    layout += [(30.0, 40.0, 100.0 + 4 * k, 103.0 + 4 * k) for k in range(5)]  # alone, after them
    shape = [(p, o, 0.0, start, end) for p, o, start, end in layout]
    loads = in_flight(shape)
    group = [(p, o, o * (20.0 + slope * s1), start, end) for (p, o, _, start, end), (_, s1, _) in zip(shape, loads,
                                                                                                    strict=True)]
    assert loads[-1][0] == pytest.approx(1.0) and loads[3][0] == pytest.approx(4.0)  # alone; three beside it
    assert loads[8][1] > loads[3][1] + 3 * 900  # later beside them: the long ones attend to more by then
    assert position_fit([group], curve=False) == pytest.approx((slope, 0.0), rel=1e-6)
    own_only = [t[:3] for t in group]
    assert abs(position_fit([own_only], curve=False)[0] / slope - 1) > 0.3  # on its own context alone: wrong
    stalled = [*group[:5], (group[5][0], group[5][1], group[5][2] * 20, *group[5][3:]), *group[6:]]
    assert position_fit([stalled], curve=False)[0] == pytest.approx(slope, rel=0.05)


def test_a_long_tailed_answer_length_is_integrated_not_taken_at_its_mean() -> None:
    """Half the answers stop after 20 tokens, half run to 1,900: a run of them takes the mean of their times,
    which (decoding slowing as the context grows) is far more than the time of answers of the mean length."""
    point, samples = _short_sweep()
    fit = _fit_configs([point], samples, [_long_answers(0.0)])[0]
    lengths = AnswerLengths.learn([Observation(t, True, "b") for t in [20.0, 1900.0] * 20], "batches")
    n = 40
    at_mean = Shape([30.0] * n, [lengths.expected(None)] * n)
    drawn = Shape([30.0] * n, [lengths.expected(None)] * n, caps=[None] * n, answers=lengths)
    made = estimate_from_fits([fit], drawn, include_load=False)
    exact = n * (15 + (_decode_ms(30.0, 20.0) + _decode_ms(30.0, 1900.0)) / 2) / 1000
    assert made.seconds == pytest.approx(exact, rel=0.1)
    assert made.seconds > 1.2 * fit.run_seconds(at_mean)
    assert made.low <= exact <= made.high


def test_a_big_file_is_estimated_on_a_bounded_sample() -> None:
    """Beyond ``SAMPLE`` lines an estimate reads a uniform random sample (memory does not grow with the file) and
    scales the running time by N/n, not the load; up to ``SAMPLE`` lines it reads them all, as before."""
    from tests.test_bench_metrics import _fake_fit

    rng = random.Random(3)
    rows = [Line(rng.randint(20, 900), rng.choice((None, 16, 64, 400))) for _ in range(5 * SAMPLE)]
    answers = AnswerLengths.learn([Observation(float(rng.randint(5, 300)), True, "b") for _ in range(200)],
                                  "batches")
    calibration = TokenCalibration(answers=answers)
    fit = _fake_fit(4, 8192, per_token_ms=12.0, load=30.0)
    fit.p0, fit.p1, fit.overhead_ms = 0.3, 0.0002, 5.0

    def made(lines: Lines) -> Any:
        return estimate_from_fits([fit], shape_of(lines, calibration), concurrency=4)

    whole, sampled = Lines.of(rows, limit=len(rows)), Lines.of(rows)
    assert sampled.count == whole.count == len(rows) and len(sampled.kept) == SAMPLE and sampled.sampled
    assert sampled.need == whole.need and sampled.uncapped == whole.uncapped
    full, quick = made(whole), made(sampled)
    assert quick.num_requests == full.num_requests == len(rows)
    assert quick.load_seconds == full.load_seconds == 30.0  # the one-off load is not multiplied by N/n
    assert quick.seconds - 30 == pytest.approx(full.seconds - 30, rel=0.03)
    assert any("sample of 4000 of the 20000" in n for n in quick.notes)
    few = rows[:SAMPLE]  # a file within the sample size: every line, the same figures as before
    assert made(Lines.of(few)).seconds == made(Lines.of(few, limit=10 * SAMPLE)).seconds
    assert Lines.of(rows).sample() == sampled.sample()  # seeded: one file, one sample


async def test_a_sampled_file_gets_one_figure_before_and_at_its_start(swept: tuple[Settings, OllamaSim],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _sim = swept
    path = natural_file(tmp_path / "big.jsonl", 90, seed=4, caps=(None, 8, 60))
    whole = await _file_estimate(settings, path)
    monkeypatch.setattr(shape_module, "SAMPLE", 30)
    sampled = await _file_estimate(settings, path)
    assert sampled.num_requests == whole.num_requests == 90
    assert any("sample of 30 of the 90" in n for n in sampled.notes)
    load = sampled.load_seconds or 0.0
    assert sampled.seconds - load == pytest.approx(whole.seconds - load, rel=0.15)
    report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
    stored = orjson.loads(report.batch.estimate_json or "{}")  # the store gives the same sample of the same lines
    assert stored["seconds"] == pytest.approx(sampled.seconds, rel=1e-9)


def test_the_prefix_cache_counts_as_far_as_finished_batches_show_it_worked() -> None:
    """A prompt that repeats what recent requests sent is charged only its new part, as llama.cpp and Ollama
    process it; an engine without a prefix cache (the simulator) processes it again, and its timings say so."""
    from tests.test_bench_metrics import _fake_fit

    fit = _fake_fit(1)
    fit.p0 = 1.0  # ms per prompt token
    passage = "A long shared passage of context. " * 20
    texts = [passage + f"Question {i}?" for i in range(30)]
    bodies = [orjson.dumps({"model": CHAT, "messages": [{"role": "user", "content": t}]}).decode() for t in texts]
    shares = cached_shares([prompt_text("/v1/chat/completions", orjson.loads(b))
                                            for b in bodies], 4)

    def timed(skipped: float) -> list[tuple[str, int, str, str, int, float]]:
        return [("b", i, "/v1/chat/completions", body, 200, 200 * (1 - skipped * share))
                for i, (body, share) in enumerate(zip(bodies, shares, strict=True))]

    def kept(skipped: float) -> float:
        return cache_kept(timed(skipped), fit, float, window=4)

    assert kept(1.0) == pytest.approx(1.0) and kept(0.0) == pytest.approx(0.0)
    assert kept(0.5) == pytest.approx(0.5, abs=0.01)
    assert cache_kept(timed(0.0)[:6], fit, float, window=4) == 1.0  # too little to tell
    lines = Lines.of([Line(200, 32)] * 30, [prompt_text("/v1/chat/completions", orjson.loads(b))
                                            for b in bodies])
    cached = shape_of(lines, TokenCalibration()).cached
    uncached = shape_of(lines, TokenCalibration(cache_kept=0.0))
    assert cached is not None and sum(cached) > 20 and uncached.cached == [0.0] * 30
    assert any("processed again" in note for note in uncached.notes)


def test_a_pilot_tells_whether_the_prefix_cache_worked_before_any_batch_did() -> None:
    """Sixteen random lines of a file whose prompts repeat 60% of each other on average: an engine that skips
    the repeated part answers them in 40% of the full prompt time, one that processes them again in all of it."""
    from tests.test_bench_metrics import _fake_fit

    fit = _fake_fit(4)
    fit.p0 = 1.0

    def pilot(skipped: float, n: int = 16) -> list[PilotRow]:
        rows = []
        for i in range(n):
            ms = 300.0 * (3.0 if i < 4 else 1 - skipped * 0.6)  # the first wave: its prompts in one batch
            done = {"prompt_tokens": 300, "engine_prompt_ms": ms, "finished_at": 100.0 + i}
            rows.append(PilotRow(file_sha256="f", custom_id=f"l{i}", body_sha256="b", model=CHAT, url="/v1/chat",
                                 latency_ms=1000.0, concurrency=4, result_json=orjson.dumps(done).decode(),
                                 created_at=0.0))
        return rows

    assert pilot_cache_kept(pilot(1.0), fit, 0.6) == pytest.approx(1.0)
    assert pilot_cache_kept(pilot(0.0), fit, 0.6) == pytest.approx(0.0)
    assert pilot_cache_kept(pilot(0.5), fit, 0.6) == pytest.approx(0.5)
    assert pilot_cache_kept(pilot(0.0, 10), fit, 0.6) is None  # 6 after the first wave: too few
    assert pilot_cache_kept(pilot(0.0), fit, 0.01) is None  # nothing repeated: nothing to tell
    timed = [("b", i, "/v1/chat/completions", "{}", 200, 200.0) for i in range(3)]
    assert cache_kept(timed, fit, float, window=4, default=0.3) == 0.3  # batches too few: the pilot


@pytest.mark.usefixtures("db_url")
async def test_history_corrects_the_cost_model_not_the_answer_lengths_again(
        make_settings: Callable[..., Settings]) -> None:
    """A batch whose answers ran twice as long as expected took about twice as long: its answers are learnt
    already, so the next file's estimate is not scaled for them a second time; a batch that was slower at the
    answer lengths expected is."""
    from obatch.bench.estimate.history import history_ratios
    from obatch.store.tables import BatchRow

    def finished(batch_id: str, seq: int, output_tokens: int, run_seconds: float) -> BatchRow:
        group = {"model": CHAT, "seconds": 12.0, "load_seconds": 2.0, "concurrency": 4, "output_tokens_mean": 50.0,
                 "output_share": 0.9}
        return BatchRow(id=batch_id, endpoint="/v1/chat/completions", input_file_id="file-1", created_at=1, seq=seq,
                        status="completed", backend="ollama", completed=10, output_tokens=output_tokens,
                        run_seconds=run_seconds, estimate_json=orjson.dumps({"groups": [group]}).decode())

    engine, sessions = await open_store(make_settings().db_url)
    try:
        async with sessions() as session:
            session.add(finished("batch-long", 1, 1000, 2 + 10 * 2 ** 0.9))  # answers of 100 tokens, not 50
            session.add(finished("batch-slow", 2, 500, 2 + 10 * 1.3))  # answers as expected, 30% slower
            await session.commit()
            ratios = await history_ratios(session, CHAT, "ollama")
    finally:
        await engine.dispose()
    assert sorted(ratios) == [(4, pytest.approx(1.0)), (4, pytest.approx(1.3))]


# ---------------------------------------------------------------------------------------- on the simulator


@pytest.fixture
async def swept(make_settings: Callable[..., Settings], db_url: str | None) -> AsyncIterator[tuple[Settings,
                                                                                                  OllamaSim]]:
    """The simulator with natural answer lengths, and a store holding a small sweep of it (forced lengths)."""
    async with OllamaSim(SIM) as sim:
        settings = make_settings(sim.url, concurrency=2)
        spec = SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[1, 2], requests=6, workload="short", seed=1)
        await run_sweep(spec, settings=settings, progress=False)
        yield settings, sim


async def _file_estimate(settings: Settings, path: Path, **kwargs: Any) -> DurationEstimate:
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            sha = await asyncio.to_thread(file_sha256, path)
            return combined(await estimate_groups(session, EstimateRequest(backend="ollama", file=path,
                                                                           file_sha256=sha,
                                                                           **({"concurrency": 2} | kwargs))))
    finally:
        await engine.dispose()


async def test_history_replays_the_cost_model_on_the_lines_a_batch_really_ran(swept: tuple[Settings, OllamaSim],
                                                                             tmp_path: Path) -> None:
    """What a finished batch says of the cost model does not hang on what its start estimate expected of its
    answers: the model is replayed on the batch's own lines at the lengths they had (the pilot's lines, run before
    the batch, are not part of its running time)."""
    from sqlalchemy import update

    from obatch.bench.estimate.calibrate import calibration_for
    from obatch.bench.estimate.fit import fits_for
    from obatch.bench.estimate.history import history_ratios
    from obatch.store.tables import BatchRow

    settings, sim = swept
    path = natural_file(tmp_path / "natural.jsonl", 24, seed=31)
    engine, sessions = await open_store(settings.db_url)
    backend = OllamaBackend(sim.url)
    try:
        await run_pilot(sessions, backend, settings, path, size=6, concurrency=2)
        report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
        assert report.batch.completed == 24

        async def ratios() -> list[tuple[int, float]]:
            async with sessions() as session:
                fits = await fits_for(session, CHAT, "ollama")
                return await history_ratios(session, CHAT, "ollama", fits=fits,
                                            calibration=await calibration_for(session, CHAT, fits))

        [(level, first)] = await ratios()
        assert level == 2 and 0.5 < first < 2.0  # the simulator runs as its sweep measured, within its noise
        async with sessions() as session:
            count, rows = await bench_repo.run_lines(session, report.batch.id, CHAT, 100)
            assert count == len(rows) == 18  # the 6 pilot lines ran before the batch
            made = orjson.loads(report.batch.estimate_json or "{}")
            made["groups"][0] |= {"output_tokens_mean": 5.0, "seconds": 1000.0}  # a start estimate far off
            await session.execute(update(BatchRow).where(BatchRow.id == report.batch.id)  # type: ignore[arg-type]
                                  .values(estimate_json=orjson.dumps(made).decode()))
            await session.commit()
        assert await ratios() == [(2, pytest.approx(first, rel=1e-9))]
    finally:
        await backend.aclose()
        await engine.dispose()


async def test_a_batch_is_estimated_at_the_context_its_model_really_has(make_settings: Callable[..., Settings],
                                                                      tmp_path: Path) -> None:
    """A model whose context is below obatch's pick (256 tokens here) runs its batch at that context, where an
    answer ends at the context left: the batch's start estimate knows it (the batch routes its model first), and so
    does an estimate made with an engine pool that routed the model before; without an engine, 256 is assumed."""
    small = SimConfig(models=(SimModel(CHAT, context_length=256),), num_parallel=2, prompt_tps=20_000,
                      decode_tps=2000, default_output_tokens=40)
    async with OllamaSim(small) as sim:
        settings = make_settings(sim.url, concurrency=2)
        await run_sweep(SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[1, 2], requests=6, workload="short",
                                  seed=1), settings=settings, progress=False)
        path = natural_file(tmp_path / "natural.jsonl", 12, seed=41)
        blind = await _file_estimate(settings, path)
        assert blind.output_tokens_mean == pytest.approx(256.0)  # nothing known: the assumed answer, uncut
        pool = Pool([OllamaBackend(sim.url)])
        try:
            await pool.route(CHAT)
            routed = await _file_estimate(settings, path, engine=pool)
        finally:
            await pool.aclose()
        assert routed.output_tokens_mean is not None and routed.output_tokens_mean < 250  # 256 − each prompt
        report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
        stored = orjson.loads(report.batch.estimate_json or "{}")
        assert stored["seconds"] == pytest.approx(routed.seconds, rel=1e-9)
        assert stored["groups"][0]["output_tokens_mean"] == pytest.approx(routed.output_tokens_mean, rel=1e-9)


@pytest.mark.parametrize("answers", [6, 1100])
async def test_a_blind_interval_holds_answers_far_shorter_or_longer_than_its_guess(
        make_settings: Callable[..., Settings], tmp_path: Path, answers: int) -> None:
    """Nothing known of the answers (no pilot, no batch, no natural benchmark request): the estimate guesses 256
    tokens an answer, says it is a guess, offers a pilot first, and its interval holds a run whose answers are 20×
    shorter (6-12 tokens) or 4× longer (about 1,050, some running on to the context window) than the guess."""
    async with OllamaSim(dataclasses.replace(SIM, default_output_tokens=answers)) as sim:
        settings = make_settings(sim.url, concurrency=2)
        await run_sweep(SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[1, 2], requests=6, workload="short",
                                  seed=1), settings=settings, progress=False)
        path = natural_file(tmp_path / "natural.jsonl", 12, seed=5)
        blind = await _file_estimate(settings, path)
        assert blind.guess and blind.output_tokens_mean == pytest.approx(256.0)
        assert blind.answers is not None and not blind.answers.known and views.offers_pilot(blind)
        assert "a guess" in blind.notes[0] and "pilot" in blind.notes[0]
        said = bench_cli.describe(blind)
        assert "guess" in said[0] and "pilot" in said[0]
        report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
        taken = report.batch.output_tokens / report.batch.completed
        assert (taken < 256 / 20) if answers < 40 else (taken > 256 * 4)
        assert blind.low <= report.batch.run_seconds <= blind.high
        stored = orjson.loads(report.batch.estimate_json or "{}")
        assert stored["low"] <= report.batch.run_seconds <= stored["high"] and stored["groups"][0]["guess"]


async def test_an_uncapped_file_learns_its_answer_lengths_from_history(swept: tuple[Settings, OllamaSim],
                                                                      tmp_path: Path) -> None:
    settings, _sim = swept
    first = natural_file(tmp_path / "first.jsonl", 24, seed=1)
    before = await _file_estimate(settings, first)
    assert before.answers is not None and before.answers.source == "none" and not before.answers.known
    assert any("pilot" in note for note in before.notes) and views.offers_pilot(before)
    await run_batch_file(first, settings=settings, concurrency=2, progress=False)
    # a new file of the same kind: its answers are now expected to be as long as the first batch's were
    second = natural_file(tmp_path / "second.jsonl", 24, seed=2)
    after = await _file_estimate(settings, second)
    assert after.answers is not None and after.answers.source == "batches" and after.answers.known
    assert after.answers.samples == 24 and 8 <= (after.answers.mean or 0) <= 90
    assert after.output_tokens_mean == pytest.approx(after.answers.mean, rel=0.01)
    assert 0 < after.low < after.seconds < after.high and not views.offers_pilot(after)
    # a mixed file: capped lines expect min(answer, cap), never more than their cap
    mixed = natural_file(tmp_path / "mixed.jsonl", 24, seed=3, caps=(None, 8, 200))
    capped = await _file_estimate(settings, mixed)
    assert capped.output_tokens_mean is not None and capped.output_tokens_mean < after.output_tokens_mean


def test_a_pilot_samples_each_kind_of_cap_in_its_share_of_the_file(tmp_path: Path) -> None:
    caps = [None] * 30 + [64] * 20 + [256] * 10
    random.Random(5).shuffle(caps)
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        chat_line(f"line-{i}", f"Question {i}?" + " context" * (i % 7), model=CHAT,
                  **({"max_tokens": cap} if cap is not None else {})) for i, cap in enumerate(caps)])
    chosen, need, total = sample_file(path, None, 12, "seed")
    assert total == 60 and need == {CHAT: max(context.need_of(context.estimate_prompt_tokens(
        "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Question {i}?" + " context" * (i % 7)}]}),
        cap) for i, cap in enumerate(caps))}
    kinds = [r.body.get("max_tokens") for r in chosen]
    assert (kinds.count(None), kinds.count(64), kinds.count(256)) == (6, 4, 2)  # the file's 50/33/17%
    smaller, _, _ = sample_file(path, None, 6, "seed")
    assert {r.custom_id for r in smaller} < {r.custom_id for r in chosen}  # a larger pilot extends a smaller one
    assert [r.custom_id for r in sample_file(path, None, 12, "seed")[0]] == [r.custom_id for r in chosen]
    assert {r.custom_id for r in sample_file(path, None, 12, "other")[0]} != {r.custom_id for r in chosen}
    assert allocate({-1: 3, 6: 1}, 16) == {-1: 3, 6: 1} and sum(allocate({-1: 7, 5: 7, 8: 7}, 10).values()) == 10
    assert stratum(None) == -1 and stratum(64) == stratum(33) == 6 and stratum(65) == 7


async def test_a_pilot_estimates_the_file_and_its_lines_are_not_run_twice(swept: tuple[Settings, OllamaSim],
                                                                         tmp_path: Path) -> None:
    settings, sim = swept
    path = natural_file(tmp_path / "natural.jsonl", 24, seed=5)
    engine, sessions = await open_store(settings.db_url)
    backend = OllamaBackend(sim.url)
    try:
        ran = await run_pilot(sessions, backend, settings, path, size=8, concurrency=2)
        assert (ran["requests"], ran["ran"], ran["reused"], ran["failed"]) == (8, 8, 0, 0)
        again = await run_pilot(sessions, backend, settings, path, size=8, concurrency=2)
        assert (again["ran"], again["reused"]) == (0, 8)  # a second pilot of the same file runs nothing again
    finally:
        await backend.aclose()
        await engine.dispose()
    made = await _file_estimate(settings, path)
    assert made.answers is not None and made.answers.source == "pilot" and made.answers.samples == 8
    assert made.num_requests == 16 and made.done_requests == 8
    assert 0 < made.low < made.seconds < made.high
    # the command line gives the same figures for the same file and settings
    args = _parser().parse_args([
        "estimate", "--file", str(path), "--backend", "ollama", "-c", "2", "--data-dir", str(settings.data_dir)])
    printed = await bench_cli.estimate_answer(args, settings)
    assert printed.seconds == pytest.approx(made.seconds, rel=1e-9)
    assert (printed.low, printed.high) == pytest.approx((made.low, made.high), rel=1e-9)
    served = sim.stats.served
    report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
    assert sim.stats.served - served == 16  # the 8 pilot lines were taken as finished
    lines = [orjson.loads(x) for x in report.output.read_bytes().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"line-{i}" for i in range(24))
    assert report.batch.completed == 24 and report.batch.failed == 0
    # the estimate stored at the batch's start is the one the file got before it ran
    stored = orjson.loads(report.batch.estimate_json or "{}")
    assert stored["seconds"] == pytest.approx(made.seconds, rel=1e-9)
    assert (stored["low"], stored["high"]) == pytest.approx((made.low, made.high), rel=1e-9)
    engine, sessions = await open_store(settings.db_url)
    try:
        async with sessions() as session:
            from sqlalchemy import select

            pilots = (await session.execute(select(PilotRow))).scalars().all()
        assert {p.used_by for p in pilots} == {report.batch.id}
    finally:
        await engine.dispose()
    # run again: the pilot lines were taken once, so every line runs in the new batch
    served = sim.stats.served
    await run_batch_file(path, settings=settings, concurrency=2, progress=False, fresh=True)
    assert sim.stats.served - served == 24


def test_an_automatic_pilot_doubles_up_to_a_quarter_of_the_file() -> None:
    assert auto_sizes(40) == [10] and auto_sizes(100) == [16, 25] and auto_sizes(400) == [16, 32, 64, 100]
    assert auto_sizes(5) == [2]  # what a t-interval needs
    assert auto_sizes(10_000) == [16, 32, 64, 128, 256]  # never more than MAX_PILOT
    assert pilot_size("auto") == "auto" and pilot_size("24") == 24 and pilot_size(None) is None
    for bad in ("0", "257", "many", -3):
        with pytest.raises(Exception, match="pilot must be between 1 and 256 lines, or 'auto'"):
            pilot_size(bad)


async def test_an_automatic_pilot_grows_while_its_answers_leave_the_estimate_unsure(
        swept: tuple[Settings, OllamaSim], tmp_path: Path) -> None:
    settings, sim = swept

    async def pilot_of(path: Path) -> DurationEstimate:
        args = _parser().parse_args(["estimate", "--file", str(path), "--pilot", "auto", "--backend", "ollama",
                                     "-c", "2", "--data-dir", str(settings.data_dir)])
        made: DurationEstimate = await bench_cli.estimate_answer(args, settings)
        return made

    # the simulator's natural answers take 1-80 words: 16 of them leave the mean of 200 unsure by about ±25%
    served = sim.stats.served
    varied = await pilot_of(natural_file(tmp_path / "varied.jsonl", 200, seed=21))
    assert varied.pilot is not None and varied.pilot.auto and varied.pilot.lines == 200
    assert 16 < varied.pilot.requests <= 50 and varied.done_requests == varied.pilot.requests
    assert sim.stats.served - served == varied.pilot.requests  # each round ran only the lines new to it
    assert varied.answers is not None and varied.answers.samples == varied.pilot.requests
    assert answers_margin(varied) <= AUTO_WITHIN or varied.pilot.requests == 50
    # every answer cut at its cap of 2 tokens: nothing is unsure after the first 16
    same = await pilot_of(natural_file(tmp_path / "same.jsonl", 200, seed=22, caps=(2,)))
    assert same.pilot is not None and same.pilot.requests == 16 and answers_margin(same) < 0.01
    assert any("pilot (automatic): 16 lines of 200" in line for line in bench_cli.describe(same))


async def _pilot(settings: Settings, sim: OllamaSim, path: Path, size: int) -> None:
    """A pilot of ``size`` lines of the file, two at a time, on the simulator."""
    engine, sessions = await open_store(settings.db_url)
    backend = OllamaBackend(sim.url)
    try:
        await run_pilot(sessions, backend, settings, path, size=size, concurrency=2)
    finally:
        await backend.aclose()
        await engine.dispose()


async def test_a_pilot_corrects_the_sweep_by_the_engine_speed_of_today(swept: tuple[Settings, OllamaSim],
                                                                       tmp_path: Path) -> None:
    """The engine runs at half the speed it was swept at: a pilot's lines take twice what the sweep's model gives
    them, and the estimate of the rest follows today's speed, not the sweep's."""
    settings, sim = swept
    # half the speed; answers that take the engine's time, not the client's
    sim.config = dataclasses.replace(sim.config, decode_tps=1000, prompt_tps=10_000, default_output_tokens=120)
    path = natural_file(tmp_path / "natural.jsonl", 64, seed=61)
    await _pilot(settings, sim, path, 16)
    made = await _file_estimate(settings, path)
    assert any("today's engine speed" in note for note in made.notes)
    report = await run_batch_file(path, settings=settings, concurrency=2, progress=False)
    actual = report.batch.run_seconds
    assert made.low <= actual <= made.high and abs(made.seconds / actual - 1) < 0.35  # without it: about -50%
    stored = orjson.loads(report.batch.estimate_json or "{}")  # the batch's start estimate knows it too
    assert stored["seconds"] == pytest.approx(made.seconds, rel=1e-6)


async def test_without_benchmarks_a_pilot_extrapolates_its_own_latencies(make_settings: Callable[..., Settings],
                                                                        tmp_path: Path) -> None:
    async with OllamaSim(SIM) as sim:
        settings = make_settings(sim.url)
        path = natural_file(tmp_path / "natural.jsonl", 40, seed=9)
        with pytest.raises(Exception, match="pilot"):
            await _file_estimate(settings, path)
        await _pilot(settings, sim, path, 10)
        made = await _file_estimate(settings, path)
        assert made.num_requests == 30 and made.done_requests == 10 and made.concurrency == 2
        assert 0 < made.low < made.seconds < made.high and not made.points
        assert any("extrapolated from 10 pilot lines" in n for n in made.notes)
        other = await _file_estimate(settings, path, concurrency=4)  # the batch at another level than the pilot's
        assert other.concurrency == 2 and any("the pilot ran 2" in n for n in other.notes)


# ------------------------------------------------------------------------------------------- live ETA


def test_the_live_eta_counts_the_tokens_left() -> None:
    eta = LiveEta({None: 10, 100: 10}, prior_seconds=100.0, prior_output=50.0, started=0.0)
    assert eta.seconds_left(now=0.0) == pytest.approx(100.0)  # nothing done: the start estimate
    assert eta.tokens_left() == pytest.approx(10 * 50 + 10 * 50)
    for _ in range(10):  # the uncapped lines answer 150 tokens, three times what was expected
        eta.observe(None, 150, prompt_ms=10, decode_ms=990)
    assert eta.tokens_left() == pytest.approx(10 * 100 * (4 * 0.5 * 100) / (4 * 100))  # capped: no news yet
    left = eta.seconds_left(now=30.0)
    assert left is not None
    # 1500 tokens in 30 s; 500 tokens left by the capped lines' prior → about 10 s by tokens, 30 s by lines;
    # decoding is 99% of the engine's time, so tokens decide, and the start estimate still counts a little
    assert 8 < left < 30
    for _ in range(10):
        eta.observe(100, 100)
    assert eta.seconds_left(now=40.0) == 0.0
    assert eta.as_dict()["lines_left"] == 0
    carried = BatchEta.model_validate(eta.as_dict())  # what the batch object carries, field for field
    assert not carried.model_extra and carried.lines_done == 20


def test_the_batch_object_and_the_ui_carry_the_live_eta() -> None:
    from tests.test_ui_views import batch

    running = batch(in_progress_at=1000, request_counts={"total": 100, "completed": 10, "failed": 0},
                    obatch={"eta": {"seconds_left": 30.0, "at": 1015.0},
                            "estimate": DurationEstimate(model=CHAT, num_requests=100, seconds=80.0, low=60.0,
                                                         high=100.0).model_dump(mode="json")})
    progress = views.batch_progress(running, now=1020)
    assert progress.eta_s == pytest.approx(25.0) and progress.expected_s == 80.0


# ---------------------------------------------------------------------------------------- capabilities


def test_backends_say_what_they_can_do() -> None:
    ollama, openai = OllamaBackend("http://127.0.0.1:9"), OpenAIBackend("http://127.0.0.1:9/v1")
    assert capabilities_of(ollama).sets_num_ctx and capabilities_of(ollama).reloads_on_num_ctx
    assert not capabilities_of(openai).sets_num_ctx
    assert not Pool([openai]).sets_num_ctx and Pool([openai, ollama]).sets_num_ctx
    assert capabilities_of(object()) == Capabilities()  # type: ignore[arg-type]
    assert context.fit_num_ctx(300, None).num_ctx >= 300


# ---------------------------------------------------------------------------------------------- the server


@pytest.mark.timeout(180)
async def test_the_estimate_endpoint_runs_a_pilot_of_an_uploaded_file(make_settings: Callable[..., Settings],
                                                                     tmp_path: Path) -> None:
    from litestar.testing import AsyncTestClient

    from obatch.server import create_app
    from obatch.testing.ollama_sim import run_in_thread

    sim = OllamaSim(SIM)
    url, stop = run_in_thread(sim=sim)  # its own loop: the test client runs the app on another thread
    try:
        settings = make_settings(url, concurrency=2, worker_thread=False, worker_poll_interval=0.05)
        await run_sweep(SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[1, 2], requests=6, workload="short",
                                  seed=1), settings=settings, progress=False)
        await _endpoint_pilot(settings, sim, tmp_path, create_app, AsyncTestClient)
    finally:
        stop()


async def _endpoint_pilot(settings: Settings, sim: OllamaSim, tmp_path: Path, create_app: Any,
                          client: Any) -> None:
    path = natural_file(tmp_path / "natural.jsonl", 20, seed=11)
    async with client(app=create_app(settings)) as api:
        uploaded = (await api.post("/v1/files", files={"file": ("n.jsonl", path.read_bytes())},
                                   data={"purpose": "batch"})).json()
        blind = DurationEstimate.model_validate((await api.get("/v1/benchmarks/estimate", params={
            "input_file_id": uploaded["id"], "concurrency": 2})).json())
        assert blind.answers is not None and not blind.answers.known and blind.low >= 0
        for bad in (0, "some"):
            refused = await api.get("/v1/benchmarks/estimate", params={"input_file_id": uploaded["id"], "pilot": bad})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "pilot"
        response = await api.get("/v1/benchmarks/estimate", params={"input_file_id": uploaded["id"], "pilot": 5,
                                                                    "concurrency": 2})
        assert response.status_code == 200, response.text
        made = DurationEstimate.model_validate(response.json())
        assert made.pilot is not None and made.pilot.ran == 5 and made.done_requests == 5
        assert made.answers is not None and made.answers.source == "pilot" and made.num_requests == 15
        served = sim.stats.served
        batch = (await api.post("/v1/batches", json={"input_file_id": uploaded["id"], "completion_window": "24h",
                                                     "endpoint": "/v1/chat/completions"})).json()
        batch = await settled(api, batch["id"], within=20)
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 20
        assert sim.stats.served - served == 15
        assert batch["obatch"]["estimate"]["seconds"] == pytest.approx(made.seconds, rel=1e-9)
        # what the server sends is what the client and the UI parse: a field either side does not know fails here
        parsed = Batch.model_validate(batch)
        assert parsed.obatch is not None and parsed.obatch.estimate is not None
        assert not parsed.obatch.model_extra and not parsed.obatch.estimate.model_extra
        assert parsed.obatch.estimate.made_at and parsed.obatch.estimate.answers is not None
        assert views.describe_estimate(parsed.obatch.estimate) == views.describe_estimate(made)
        [sent] = (await api.get("/v1/benchmarks/estimates")).json()["data"]
        record = EstimateRecord.model_validate(sent)
        assert not record.model_extra and record.batch_id == batch["id"] and record.estimated_seconds > 0
        assert views.estimate_record_frame([record])["batch_id"].to_list() == [batch["id"]]
    fake = FakeServer()  # the UI tests' fake emits the same models
    api = fake.client()
    made_by_fake = api.create_batch(api.upload_file(path.read_bytes(), "n.jsonl").id, endpoint="/v1/chat/completions")
    assert made_by_fake.obatch is not None and made_by_fake.obatch.estimate is not None
    assert not made_by_fake.obatch.model_extra and not made_by_fake.obatch.estimate.model_extra
