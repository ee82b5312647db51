"""From a model's fitted configurations and a workload's shape to one ``Estimate``: which configuration, how long,
and how sure.

The configuration is the one asked for (num_ctx, concurrency) or the best one (``obatch.bench.best``); a concurrency
between measured levels is interpolated, one outside them takes the nearest (and widens the interval). Where answer
lengths are learnt, the run is replayed with lengths drawn from that distribution (a long answer late in the run
lengthens the makespan), and the interval widens by the draws' spread and by how far a new file's mean answer may
lie from the learnt one. Where nothing is known of the answers (no pilot, no finished batch, no natural benchmark
request), the estimate is *blind*: its point is a guess (``Estimate.guess``) and its interval spans what the model
could do, from the shortest answers to every answer running to its cap or the context window (``answer_bounds``).
Finished batches scale the running time (``obatch.bench.estimate.history``).

Intervals are multiplicative (``seconds / (1 + margin)`` to ``seconds · (1 + margin)``): durations err by factors,
and a lower bound never falls below zero. Without benchmark points, a pilot's own latencies are the measurement
(``pilot_extrapolation``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from obatch import errors
from obatch.bench.answers import t_quantile
from obatch.bench.best import best_config
from obatch.bench.estimate.fit import EXTRAPOLATION_PENALTY, MIN_MARGIN, ConfigFit, Z
from obatch.bench.estimate.schedule import makespan
from obatch.bench.estimate.shape import Shape
from obatch.store.tables import PilotRow

if TYPE_CHECKING:
    from obatch.bench.estimate.history import Speed

SCALING = 0.5  # a doubling that gained this much: the engine was far from full, the next may gain as much
GAIN = 0.05  # what a probe must gain for auto to keep it (``obatch.concurrency.AutoLimit``'s ``gain``)
DRAWS = 24  # answer-length draws per estimate (fewer for big files: DRAW_BUDGET requests in all)
DRAW_BUDGET = 200_000
SHORTEST_ANSWER = 1.0  # tokens: the least a model may answer (a blind interval's lower end)
PILOT_HINT = "`obatch estimate --file F --pilot auto`, pilot=auto on the endpoint, or the Batches page's button"


@dataclass
class Estimate:
    """Expected duration of a workload on one model, with its interval, the config it is for, the best config,
    and the stored points it rests on."""

    model: str
    backend: str
    num_requests: int
    prompt_tokens_mean: float
    output_tokens_mean: float
    seconds: float
    low: float
    high: float
    load_seconds: float
    num_ctx: int
    concurrency: int
    req_per_s: float
    best: dict[str, Any] | None
    candidates: list[dict[str, Any]]
    points: list[dict[str, Any]]
    method: str = "per-config token cost model; makespan at the calibrated parallelism; stored points"
    guess: bool = False  # answer lengths unknown: ``seconds`` is a guess, the interval what the model could do
    history_factor: float = 1.0  # the correction learned from finished batches (1: none yet)
    history_batches: int = 0
    notes: list[str] = field(default_factory=list)
    measured_req_per_s: float | None = None  # what the points the estimate rests on measured (their workload)
    answers: dict[str, Any] | None = None  # what the answer lengths were taken from (``AnswerLengths.summary``)
    pilot: dict[str, Any] | None = None  # the pilot run behind it, if any
    done_requests: int = 0  # lines a pilot already ran: the batch takes them as finished
    output_share: float | None = None  # how the running time scales with the answers' length (d log t / d log O)
    cached_prompt_tokens: float | None = None  # prompt tokens expected from the engine's prefix cache
    schedule: str | None = None  # the order the estimate replayed ("auto": obatch.schedule's; "file")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_num_ctx(fits: Sequence[ConfigFit], need: int, target: int | None) -> int:
    sizes = sorted({f.num_ctx for f in fits})
    if target is not None:
        at_least = [n for n in sizes if n >= target]
        return at_least[0] if at_least else sizes[-1]
    holding = [n for n in sizes if n >= need]
    return holding[0] if holding else sizes[-1]


def at_concurrency(fits: Sequence[ConfigFit], shape: Shape, concurrency: int) -> tuple[float, ConfigFit, str | None]:
    """Run seconds at ``concurrency`` from fits of one num_ctx: exact, interpolated in log c on throughput
    between the measured levels around it, or the nearest level (then flagged)."""
    by_c = {f.concurrency: f for f in fits}
    if concurrency in by_c:
        return by_c[concurrency].run_seconds(shape), by_c[concurrency], None
    below = [c for c in by_c if c < concurrency]
    above = [c for c in by_c if c > concurrency]
    if below and above:
        lo, hi = by_c[max(below)], by_c[min(above)]
        t_lo, t_hi = lo.run_seconds(shape), hi.run_seconds(shape)
        w = (math.log(concurrency) - math.log(lo.concurrency)) / (math.log(hi.concurrency) - math.log(lo.concurrency))
        seconds = 1 / ((1 - w) / t_lo + w / t_hi)
        return seconds, (lo if w < 0.5 else hi), f"concurrency {concurrency} interpolated between measured " \
                                                 f"{lo.concurrency} and {hi.concurrency}"
    nearest = by_c[max(below)] if below else by_c[min(above)]
    return nearest.run_seconds(shape), nearest, \
        f"concurrency {concurrency} was not measured; the nearest level ({nearest.concurrency}) is used"


def auto_level(fits: Sequence[ConfigFit], shape: Shape, slots: int | None = None) -> tuple[int, float, str]:
    """The level ``obatch.concurrency.AutoLimit`` is expected to settle on for this workload, walked on the sweep's
    curve (fits of one num_ctx, levels between the measured ones interpolated) by auto's own rule: start at the
    slots the engine reports (then probe a quarter higher), else at 1 (then double; the walk starts at the lowest
    level measured when that is higher); keep a probe that gains ``GAIN``, stop at the first that does not. Returns
    (level, the throughput gain of the last step kept when auto may go past the highest level measured — the curve
    still gained there — else 1, the note)."""
    top, lowest = max(f.concurrency for f in fits), min(f.concurrency for f in fits)
    level, doubling = (max(lowest, slots), False) if slots else (lowest, True)  # nothing tells below the lowest
    start = f"the engine reports {slots} slots" if slots else "the engine tells no slot count: auto starts at 1"
    def rate_at(c: int) -> float:
        return shape.n / max(at_concurrency(fits, shape, c)[0], 1e-9)

    rate, last = rate_at(level), 1.0
    while True:
        probe = level + (level if doubling else max(1, level // 4))
        if probe > top:
            beyond = level >= top and last >= 1 + GAIN
            note = (f"concurrency auto: expected to settle at {level} ({start}; the sweep's curve gains "
                    f"{GAIN:.0%} or more up to there)")
            if beyond:
                note += f"; auto may go past {top}, the highest level the sweep measured, and run faster"
            return level, (last if beyond else 1.0), note
        faster = rate_at(probe)
        if faster < rate * (1 + GAIN):
            return level, 1.0, (f"concurrency auto: expected to settle at {level} ({start}; {probe} gains "
                                f"{faster / rate - 1:.0%} on the sweep's curve, less than the {GAIN:.0%} auto asks)")
        level, rate, last = probe, faster, faster / rate


def estimate_from_fits(fits: Sequence[ConfigFit], shape: Shape, *, num_ctx: int | None = None,
                       concurrency: int | None = None, include_load: bool = True,
                       history: Sequence[tuple[int, float]] = (), speed: Speed | None = None,
                       slots: int | None = None) -> Estimate:
    """The estimate for one model's fits: for (num_ctx, concurrency) when given; num_ctx else the best config's,
    and concurrency else the level auto is expected to settle on (``auto_level``, from the engine's ``slots``).

    ``history`` holds (concurrency, actual / modelled running time) of finished batches (``history_ratios``): the
    median ratio of those at the chosen concurrency (of all when none is), shrunk toward 1 by ``n / (n + 1)``,
    scales the running time, and their spread widens the interval — the record of estimate vs actual corrects
    what the benchmark could not see. ``speed``: today's engine speed as a pilot of the file measured it
    (``obatch.bench.estimate.history.pilot_speed``), which replaces the history's correction."""
    if not fits or shape.n == 0:
        raise errors.NotFoundError("No benchmark points to estimate from.", param="model")
    notes = list(shape.notes)
    need = shape.need
    holding = [f for f in fits if f.num_ctx >= need]
    if not holding:
        notes.append(f"no measured num_ctx holds the longest request ({need} tokens): prompts may be truncated")
    pool = holding or list(fits)
    ranked = sorted((f.run_seconds(shape), f.num_ctx, f.concurrency) for f in pool)
    measured = {(f.num_ctx, f.concurrency): f for f in pool}
    candidates: list[dict[str, Any]] = [
        {"num_ctx": n, "concurrency": c, "seconds": t, "req_per_s": shape.n / t if t > 0 else None,
         "measured_req_per_s": measured[(n, c)].measured_req_per_s,
         "measured_output_tokens_per_s": measured[(n, c)].measured_output_tps}
        for t, n, c in ranked]
    best = best_config(candidates, speed="req_per_s") or candidates[0]  # obatch.bench.best: the one rule
    chosen_ctx = best["num_ctx"] if num_ctx is None and concurrency is None else pick_num_ctx(fits, need, num_ctx)
    same_ctx = [f for f in fits if f.num_ctx == chosen_ctx]
    ahead = 1.0
    if concurrency is None:
        chosen_c, ahead, auto = auto_level(same_ctx, shape, slots)
        notes.append(auto)
    else:
        chosen_c = concurrency
    run_seconds, basis, note = at_concurrency(same_ctx, shape, chosen_c)
    margin = basis.margin(shape)
    share = None
    blind = shape.answers is not None and shape.caps is not None and shape.count is None and not shape.answers.known
    if blind:
        short, longest = (at_concurrency(same_ctx, bound, chosen_c)[0] for bound in answer_bounds(shape, chosen_ctx))
        share = output_share(basis, shape)
    elif shape.answers is not None and shape.caps is not None and shape.count is None:
        drawn, draw_cv, mean_cv = answer_spread(basis, shape)
        run_seconds *= drawn
        margin = math.sqrt(margin ** 2 + (Z * draw_cv) ** 2 + (Z * mean_cv) ** 2)
        share = output_share(basis, shape)
    ratios = [] if speed is not None else [r for c, r in history if c == chosen_c] or [r for _, r in history]
    factor = math.exp(statistics.median(map(math.log, ratios)) * len(ratios) / (len(ratios) + 1)) if ratios else 1.0
    if speed is not None:
        factor = speed.factor
        run_seconds *= factor
        margin = math.sqrt(margin ** 2 + (Z * speed.uncertainty) ** 2)
        notes.append(speed.note())
    if ratios:
        run_seconds *= factor
        spread = statistics.median(abs(r - factor) / factor for r in ratios)
        margin = math.sqrt(margin ** 2 + (Z * spread) ** 2)
        notes.append(f"scaled ×{factor:.2f}: how this model's estimates compared with the actual duration of "
                     f"{len(ratios)} finished batch(es)")
    if note:
        notes.append(note)
        margin += EXTRAPOLATION_PENALTY if "not measured" in note else 0.0
    if not basis.covers(shape):
        notes.append(f"the workload's mean lengths ({shape.mean_prompt:.0f} prompt, {shape.mean_output:.0f} output "
                     f"tokens) lie outside the measured ones; the interval is widened")
    load = basis.load_seconds if include_load else 0.0
    seconds = run_seconds + load
    # auto may go past the highest level measured: the lower end widens as for a level not measured, and where the
    # curve still scaled near-linearly (a doubling gained half or more), by one more step of the same gain
    stretch = (ahead if ahead >= 1 + SCALING else 1.0) * (1 + margin + EXTRAPOLATION_PENALTY * (ahead > 1))
    low, high = run_seconds / stretch + load, run_seconds * (1 + margin) + load
    if blind:
        low = min(low, short * factor / (1 + margin) + load)
        high = max(high, longest * factor * (1 + margin) + load)
        notes.insert(0, f"answer lengths unknown: {seconds:.0f} s is a guess (answers of {shape.mean_output:.0f} "
                        f"tokens on average); the interval runs from answers of {SHORTEST_ANSWER:.0f} token to "
                        f"answers that run to their max_tokens or to the context window (num_ctx {chosen_ctx}). "
                        f"A pilot measures them first: {PILOT_HINT}")
    rate = shape.n / seconds if seconds > 0 else 0.0
    if basis.measured_req_per_s and rate > 1.25 * basis.measured_req_per_s:
        notes.append(f"the benchmark measured {basis.measured_req_per_s:.2f} req/s at num_ctx {basis.num_ctx}, "
                     f"concurrency {basis.concurrency}, with answers of {basis.measured_output_mean:.0f} tokens; "
                     f"this workload's {shape.mean_output:.0f}-token answers are predicted to go at {rate:.2f} req/s")
    used = [f for f in same_ctx if f.concurrency == chosen_c] or [basis]
    points = [{"id": i, "run_id": f.run_id, "num_ctx": f.num_ctx, "concurrency": f.concurrency}
              for f in used for i in f.point_ids]
    return Estimate(
        model=basis.model, backend=basis.backend, num_requests=shape.n, prompt_tokens_mean=shape.mean_prompt,
        output_tokens_mean=shape.mean_output, seconds=seconds, low=low, high=high, load_seconds=load,
        num_ctx=chosen_ctx, concurrency=chosen_c, req_per_s=rate, best=best, candidates=candidates, points=points,
        guess=blind, history_factor=factor, history_batches=len(ratios), notes=notes,
        measured_req_per_s=basis.measured_req_per_s,
        answers=shape.answers.summary() if shape.answers is not None else None, output_share=share,
        cached_prompt_tokens=round(shape.cached_tokens, 1) if shape.schedule is not None else None,
        schedule=shape.schedule,
    )


def answer_bounds(shape: Shape, num_ctx: int) -> tuple[Shape, Shape]:
    """The workload with the shortest answers a model may give, and with every answer running to its limit: its
    ``max_tokens``, or the context left at ``num_ctx`` (a model that loops runs on until the context is full). A
    blind estimate's interval lies between the two: without a measurement of the answers, nothing narrower holds."""
    caps = shape.caps or [None] * len(shape.prompt_tokens)
    rooms = shape.rooms or [None] * len(caps)
    limits = [min(float(b) for b in (cap, room if room is not None else max(1.0, num_ctx - prompt)) if b is not None)
              for cap, room, prompt in zip(caps, rooms, shape.prompt_tokens, strict=True)]
    return (dataclasses.replace(shape, output_tokens=[min(SHORTEST_ANSWER, o) for o in limits]),
            dataclasses.replace(shape, output_tokens=limits))


def output_share(fit: ConfigFit, shape: Shape) -> float:
    """How the running time scales with the answers' length: (d log t / d log O), from every answer 10% longer."""
    base = fit.run_seconds(shape)
    longer = fit.run_seconds(dataclasses.replace(shape, output_tokens=[o * 1.1 for o in shape.output_tokens]))
    return max(0.0, (longer / base - 1) / 0.1) if base > 0 else 0.0


def answer_spread(fit: ConfigFit, shape: Shape) -> tuple[float, float, float]:
    """What the answers' spread does to a run: (mean running time with lengths drawn from the learnt curve / with
    every answer at its expected length, the relative spread of those draws, the relative uncertainty the file's
    unknown mean answer adds). The draws are seeded by the workload, so one file gets one estimate whichever path
    asks (before submitting, at the batch's start, the command line)."""
    assert shape.answers is not None and shape.caps is not None
    answers, caps = shape.answers, shape.caps
    base = fit.run_seconds(shape)
    if base <= 0:
        return 1.0, 0.0, 0.0
    rooms = shape.rooms or [None] * len(caps)
    rng = random.Random(f"{shape.n}|{sum(shape.output_tokens):.3f}")
    runs = []
    for _ in range(max(4, min(DRAWS, DRAW_BUDGET // max(len(caps), 1)))):
        drawn = [answers.draw(cap, rng.random(), room) for cap, room in zip(caps, rooms, strict=True)]
        runs.append(fit.run_seconds(dataclasses.replace(shape, output_tokens=drawn)))
    centre = statistics.fmean(runs)
    spread = statistics.stdev(runs) / centre if len(runs) > 1 and centre > 0 else 0.0
    longer = [min([o * 1.1, *(b for b in (cap, room) if b is not None)])
              for o, cap, room in zip(shape.output_tokens, caps, rooms, strict=True)]
    elasticity = max(0.0, (fit.run_seconds(dataclasses.replace(shape, output_tokens=longer)) / base - 1) / 0.1)
    return centre / base, spread, answers.mean_cv * elasticity


def nothing_left(fit: ConfigFit, model: str, done: int) -> Estimate:
    return Estimate(model=model, backend=fit.backend, num_requests=0, prompt_tokens_mean=0.0, output_tokens_mean=0.0,
                    seconds=0.0, low=0.0, high=0.0, load_seconds=0.0, num_ctx=fit.num_ctx,
                    concurrency=fit.concurrency, req_per_s=0.0, best=None, candidates=[], points=[],
                    done_requests=done, notes=[f"every line was already run by a pilot ({done})"])


def pilot_extrapolation(model: str, backend: str, remaining: int, pilot: Sequence[PilotRow], done: int, *,
                        include_load: bool = True, concurrency: int | None = None) -> Estimate:
    """No benchmark of the model: the pilot's own requests, run ``c`` at a time, are the measurement. The
    remaining lines' latencies are drawn from the pilot's (a bootstrap of the makespan at the pilot's ``c``), and
    the interval is the t-interval of the pilot's mean latency (a sample of n out of N lines) with the draws'
    spread. ``concurrency``: the batch's, when pinned; the estimate stays at the pilot's level and says so when they
    differ (without a benchmark nothing tells how the engine runs at another)."""
    latencies = [float(p.latency_ms or 0.0) for p in pilot]
    c = max(1, max(p.concurrency or 1 for p in pilot))
    n, population = len(latencies), remaining + done
    rng = random.Random(f"{n}|{remaining}|{sum(latencies):.3f}")
    runs = [makespan([rng.choice(latencies) for _ in range(remaining)], c) / 1000
            for _ in range(max(4, min(DRAWS, DRAW_BUDGET // max(remaining, 1))))] if remaining else [0.0]
    seconds = statistics.fmean(runs)
    spread = statistics.stdev(runs) / seconds if len(runs) > 1 and seconds > 0 else 0.0
    fpc = math.sqrt(max(0.0, 1 - n / population)) if population > n else 0.0
    half = t_quantile(0.975, n - 1) * statistics.stdev(latencies) / math.sqrt(n) / statistics.fmean(latencies) * fpc
    margin = max(MIN_MARGIN, math.sqrt(half ** 2 + (Z * spread) ** 2))
    tokens = [float(p.completion_tokens or 0) for p in pilot]
    return Estimate(
        model=model, backend=backend, num_requests=remaining, prompt_tokens_mean=0.0,
        output_tokens_mean=statistics.fmean(tokens), seconds=seconds, low=seconds / (1 + margin),
        high=seconds * (1 + margin), load_seconds=0.0, num_ctx=0, concurrency=c,
        req_per_s=remaining / seconds if seconds > 0 else 0.0, best=None, candidates=[], points=[],
        method="a pilot of the file itself: its latencies drawn for the remaining lines, makespan at its concurrency",
        notes=[f"no benchmark points for {model}: extrapolated from {n} pilot lines run {c} at a time "
               f"(±{margin:.0%} is what a sample of {n} supports)"] + (
            [f"the batch runs {concurrency} at a time, the pilot ran {c}: without a benchmark nothing tells how "
             f"the engine runs at {concurrency}, so the estimate is for {c}"] if concurrency not in (None, c) else []),
        measured_req_per_s=None, done_requests=done)
