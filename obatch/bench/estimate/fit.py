"""The cost model of one configuration, fitted on the requests its stored benchmark points measured.

Per configuration (backend, model, num_ctx, concurrency ``c``), by least squares on the engine's own timings,
coefficients kept non-negative (``least_squares``: a hand-written solver for a few columns):

    service(P, O) = overhead + P·(1 - cached)·(p0 + p1·P)
                    + O·(d + g(own) - g_measured + (c - 1)·(g(ctx) - g_measured) + stall - stall_measured)

``P`` prompt tokens, ``O`` output tokens: prompt processing grows a little faster than linearly (attention). ``d``
is the measured time per decoded token with ``c`` requests in flight (so it includes sharing the engine with the
``c - 1`` others) at the mean context the point measured; a decode step attends to the context of every sequence
in flight, so a token decoded at context position ``x`` costs ``a·x + b·x²`` more than one at position 0, and a
request's own tokens cost that on average over its span ``[P, P + O]``: ``g(own) = a·(P + O/2) + b·(P² + P·O +
O²/3)``; the ``c - 1`` others cost the workload's token-weighted mean of ``g``. ``a`` and ``b`` (not negative) are
fitted (``position_fit``) on every timed request of the model on the backend — all concurrency levels of the sweep,
and the engine timings of finished batch lines and of a pilot of the file, whose start and end times tell what
ran beside each (``in_flight``: a short answer beside long ones is slow for their sake) — because a sweep's forced
answers reach a few hundred tokens of context while natural answers may run on to the context window
(all in ms). Continuous batching runs a newcomer's prompt inside the steps of the ``c - 1`` requests decoding,
so their decode also pays for it: ``stall = (c - 1) · Σ prompt time / Σ output tokens`` of the workload, against
the stall the point measured under. ``cached``: the share of the prompt in the engine's prefix cache
(``obatch.bench.estimate.shape``).
The first ``c`` requests leave together and the engine processes their prompts as one batch, so each of them waits
for all of those prompts (and that first wave is left out of the prompt fit).

A run is the makespan of its service times (``obatch.bench.estimate.schedule``) at the calibrated parallelism
``m``, times a residual factor ``k`` (``wall / predicted`` over the points' own requests, about 1) that keeps what is
left, e.g. an engine faster than its per-request timings suggest. The model's load time is the longest the points
of that num_ctx measured.

Interval: ``± 1.96 · sqrt(cv_k² + rmse²/N)`` where ``cv_k`` is the spread of k over the repeats (0.05 assumed with
a single repeat) and ``rmse`` the relative per-request residual of the fit, at least ±5%; +10% when the workload's
mean prompt or output length lies outside what the points measured, or its concurrency was not measured.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import errors
from obatch.bench.estimate.schedule import effective_parallelism, makespan_at, makespan_runs_at, speedups
from obatch.bench.estimate.shape import Shape
from obatch.bench.metrics import stdev
from obatch.store import bench_repo
from obatch.store.bench_tables import BenchPointRow, BenchSampleRow
from obatch.store.tables import PilotRow

Z = 1.96
SINGLE_REPEAT_CV = 0.05
EXTRAPOLATION_PENALTY = 0.10
MIN_MARGIN = 0.05


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(vector)
    a = [[*row, vector[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                for c in range(col, n + 1):
                    a[r][c] -= factor * a[col][c]
    return [a[i][n] / a[i][i] for i in range(n)]


def least_squares(features: Sequence[Sequence[float]], y: Sequence[float]) -> list[float] | None:
    """Non-negative least squares for a few columns, the simple way: fit all; while a coefficient is negative,
    drop the last column still in (the higher-order terms come last) and refit. None when nothing fits."""
    k = len(features[0]) if features else 0
    while k > 0:
        xtx = [[sum(row[i] * row[j] for row in features) for j in range(k)] for i in range(k)]
        xty = [sum(row[i] * t for row, t in zip(features, y, strict=True)) for i in range(k)]
        coef = _solve(xtx, xty)
        if coef is not None and all(c >= 0 for c in coef):
            return coef + [0.0] * (len(features[0]) - k)
        k -= 1
    return None


@dataclass
class ConfigFit:
    """The fitted cost model of one configuration, and the stored points it rests on."""

    backend: str
    model: str
    num_ctx: int
    concurrency: int
    run_id: str
    point_ids: list[int]
    overhead_ms: float
    p0: float
    p1: float
    decode_ms: float  # per output token, at the mean context decode_ctx
    decode_ctx: float
    ctx_slope: float  # a: ms per output token per token of context per sequence in flight
    prompt_stall: float  # ms per output token the others' prompt processing added to decode_ms as measured
    parallelism: float
    efficiency: list[float]
    load_seconds: float
    prompt_range: tuple[float, float]
    output_range: tuple[float, float]
    rel_rmse: float
    n_samples: int
    stall_share: float = 1.0  # how much of the prompt stall shows in this engine's decode timings (0-1)
    measured_req_per_s: float = 0.0  # what the points measured on their own workload (completed req/s)
    measured_output_tps: float = 0.0
    measured_output_mean: float = 0.0  # their answers' mean length
    ctx_curve: float = 0.0  # b: ms per output token per squared token of context (decoding slows as context grows)
    decode_ctx2: float | None = None  # token-weighted mean of the squared context decode_ms was measured at
    speed: tuple[float, ...] = ()  # how much faster requests run with fewer in flight (``speedups``)

    def prompt_ms(self, prompt: float, cached: float = 0.0) -> float:
        return prompt * (1 - cached) * (self.p0 + self.p1 * prompt)

    def per_token_ms(self, own: float, context: float, stall: float | None = None, own2: float | None = None,
                     context2: float | None = None) -> float:
        """Decode time per output token of a request attending to ``own`` tokens while the ``c - 1`` others in
        flight attend to ``context`` tokens on average and their prompts stall decoding by ``stall`` ms per output
        token (default: as much as when it was measured). ``own2`` and ``context2`` are the mean squared context
        positions (``position_moments``; default: the squares of ``own`` and ``context``)."""
        ref2 = self.decode_ctx ** 2 if self.decode_ctx2 is None else self.decode_ctx2
        mine = own ** 2 if own2 is None else own2
        theirs = context ** 2 if context2 is None else context2
        shift = self.ctx_slope * ((own - self.decode_ctx) + (self.concurrency - 1) * (context - self.decode_ctx))
        shift += self.ctx_curve * ((mine - ref2) + (self.concurrency - 1) * (theirs - ref2))
        shift += self.stall_share * ((self.prompt_stall if stall is None else stall) - self.prompt_stall)
        return max(self.decode_ms / 2, self.decode_ms + shift)

    def stall_of(self, requests: Sequence[tuple[float, float, float]]) -> float:
        """Decode stall per output token from the prompts the ``c - 1`` others process meanwhile (continuous
        batching runs a newcomer's prompt in the steps of those decoding)."""
        tokens = sum(o for _, o, _ in requests)
        prompts = sum(self.prompt_ms(p, c) for p, _, c in requests)
        return (self.concurrency - 1) * prompts / tokens if tokens else 0.0

    def service_ms(self, prompt: float, output: float, cached: float = 0.0, context: float | None = None,
                   stall: float | None = None, context2: float | None = None) -> float:
        """One request's time in the engine plus overhead (ms); ``cached`` is the share of the prompt found in the
        prefix cache (not processed again, but attended to); ``context`` and ``context2`` the workload's mean
        context and mean squared context (default: this request's own); ``stall`` see ``per_token_ms``."""
        own, own2 = position_moments(prompt, output)
        return self.overhead_ms + self.prompt_ms(prompt, cached) + output * self.per_token_ms(
            own, own if context is None else context, stall, own2, own2 if context2 is None else context2)

    @property
    def k(self) -> float:
        return sum(self.efficiency) / len(self.efficiency)

    @property
    def cv_k(self) -> float:
        spread = stdev(self.efficiency)
        return spread / self.k if spread is not None and self.k > 0 else SINGLE_REPEAT_CV

    def services(self, requests: Sequence[tuple[float, float, float]]) -> list[float]:
        """Service times of requests (prompt, output, cached share) sent in this order: the first wave (the first
        ``concurrency``, sent together) waits for all of its prompts, which the engine processes as one batch."""
        context, context2, stall = mean_context(requests), mean_context2(requests), self.stall_of(requests)
        out = [self.service_ms(p, o, c, context, stall, context2) for p, o, c in requests]
        wave = requests[:self.concurrency]
        if len(wave) > 1:
            own = [self.prompt_ms(p, c) for p, _, c in wave]
            for i, mine in enumerate(own):
                out[i] += sum(own) - mine
        return out

    def uniform_runs(self, shape: Shape) -> list[tuple[float, int]]:
        """``services`` of a uniform shape (``shape.count`` copies of one request) as runs of equal service times:
        the first wave's, then the rest's. One request's context and stall are those of many equal ones."""
        one = shape.requests()[:1]
        prompt, _, cached = one[0]
        service = self.services(one)[0]
        wave = min(self.concurrency, shape.n)
        return [(service + (wave - 1) * self.prompt_ms(prompt, cached), wave), (service, shape.n - wave)]

    def run_seconds(self, shape: Shape) -> float:
        if shape.count is not None:
            return self.k * makespan_runs_at(self.uniform_runs(shape), self.parallelism) / 1000
        return self.k * makespan_at(self.services(shape.requests()), self.parallelism, self.speed) / 1000 * \
            shape.scale

    def covers(self, shape: Shape) -> bool:
        return (self.prompt_range[0] * 0.8 <= shape.mean_prompt <= self.prompt_range[1] * 1.25
                and self.output_range[0] * 0.8 <= shape.mean_output <= self.output_range[1] * 1.25)

    def margin(self, shape: Shape) -> float:
        margin = Z * math.sqrt(self.cv_k ** 2 + self.rel_rmse ** 2 / max(shape.n, 1))
        return max(MIN_MARGIN, margin) + (0.0 if self.covers(shape) else EXTRAPOLATION_PENALTY)


def position_moments(prompt: float, output: float) -> tuple[float, float]:
    """The mean context position and mean squared position of a request's decoded tokens, which run from ``P``
    to ``P + O``: ``P + O/2`` and ``P² + P·O + O²/3`` (a cost growing as ``a·x + b·x²`` integrates exactly)."""
    return prompt + output / 2, prompt * prompt + prompt * output + output * output / 3


def mean_context(requests: Sequence[tuple[float, float, float]]) -> float:
    """The context decoded tokens attend to on average, weighted by output tokens: ``P + O/2``."""
    tokens = sum(o for _, o, _ in requests)
    return sum(o * (p + o / 2) for p, o, _ in requests) / tokens if tokens else 0.0


def mean_context2(requests: Sequence[tuple[float, float, float]]) -> float:
    """The mean squared context position of decoded tokens, weighted by output tokens (``position_moments``)."""
    tokens = sum(o for _, o, _ in requests)
    return sum(o * position_moments(p, o)[1] for p, o, _ in requests) / tokens if tokens else 0.0


Timed = tuple[float, ...]  # a timed request: (prompt tokens, completion tokens, engine decode ms[, start s, end s])


def _timed(samples: Sequence[BenchSampleRow]) -> list[Timed]:
    return [(float(s.prompt_tokens or 0), float(s.completion_tokens), float(s.decode_ms or 0.0)) for s in samples
            if s.ok and s.completion_tokens and s.decode_ms is not None and s.prompt_tokens is not None]


def _decoded(samples: Sequence[BenchSampleRow]) -> list[tuple[float, float, float]]:
    """(context, ms per output token, output tokens) of the samples with decode timings."""
    return [(t[0] + t[1] / 2, t[2] / t[1], t[1]) for t in _timed(samples)]


def in_flight(group: Sequence[Timed]) -> list[tuple[float, float, float]]:
    """Per request of a group: (mean number of sequences in flight, mean sum of their context positions, mean sum
    of their squared positions) over its life. A decode step attends to every sequence in flight, so a request's
    time per token follows what all of them attend to, not its own context alone: a short answer that ran beside
    three long ones at 1,900 tokens of context was slow for their sake. With start and end times (finished batch
    lines, a pilot) each other request counts for the share of the life it overlapped, at the positions it went
    through meanwhile (linearly from its prompt end to its answer end); without them (a sweep's requests), a request
    counts alone (its group's mean absorbs the others)."""
    timed = all(len(t) >= 5 for t in group)
    lives = sorted((t[3], j) for j, t in enumerate(group) if t[4] > t[3]) if timed else []
    starts = [start for start, _ in lives]
    longest = max((group[j][4] - start for start, j in lives), default=0.0)
    out = []
    for i, mine in enumerate(group):
        own1, own2 = position_moments(mine[0], mine[1])
        count, sum1, sum2 = 1.0, own1, own2
        if timed and mine[4] > mine[3]:
            life = mine[4] - mine[3]
            # only requests started within the longest life before this one's start can overlap it
            for _, j in lives[bisect.bisect_right(starts, mine[3] - longest):bisect.bisect_left(starts, mine[4])]:
                other = group[j]
                if j == i:
                    continue
                start, end = max(mine[3], other[3]), min(mine[4], other[4])
                if end <= start:
                    continue
                at_start = other[0] + other[1] * (start - other[3]) / (other[4] - other[3])
                at_end = other[0] + other[1] * (end - other[3]) / (other[4] - other[3])
                share = (end - start) / life
                count += share
                sum1 += share * (at_start + at_end) / 2
                sum2 += share * (at_start * at_start + at_start * at_end + at_end * at_end) / 3
        out.append((count, sum1, sum2))
    return out


def position_fit(groups: Sequence[Sequence[Timed]], *, curve: bool = True) -> tuple[float, float]:
    """How a decoded token's time grows with the context positions ``x`` of the sequences in flight: ``(a, b)``
    of ``a·Σx + b·Σx²`` (ms per token). The output-weighted least squares of each request's ms per token on what
    was in flight over its life (``in_flight``: the sums of their mean positions and mean squared positions), each
    group (a sweep configuration, a batch, a pilot: one engine state, one concurrency) against its own means,
    pooled. How many were in flight is left out: it moves with the positions at a batch's tail, and on timings as
    noisy as a shared CPU's the two cannot be told apart. Neither coefficient is negative (where the joint fit
    makes one so, the better of the two alone); ``curve=False`` leaves the squares out. Groups of fewer than 3
    requests tell nothing."""
    width = 2 if curve else 1
    raw: list[list[tuple[list[float], float, float]]] = []  # per group: (features, ms per token, tokens)
    for group in groups:
        timed = [t for t in group if t[1] > 0 and t[2] >= 0]
        if len(timed) >= 3:
            raw.append([([s1, s2 / 1000][:width], t[2] / t[1], t[1]) for t, (_, s1, s2) in
                        zip(timed, in_flight(timed), strict=True)])

    def fit(kept: list[list[tuple[list[float], float, float]]]) -> tuple[list[float], list[tuple[int, int, float]]]:
        rows, targets, where = [], [], []
        for g, group in enumerate(kept):
            weight = sum(w for _, _, w in group)
            if len(group) < 3 or weight <= 0:
                continue
            means = [sum(w * f[k] for f, _, w in group) / weight for k in range(width)]
            y0 = sum(w * y for _, y, w in group) / weight
            for i, (f, y, w) in enumerate(group):
                root = math.sqrt(w)
                rows.append([root * (f[k] - means[k]) for k in range(width)])
                targets.append(root * (y - y0))
                where.append((g, i, root))
        if not rows:
            return [0.0] * width, []
        coef = _nonnegative_fit(rows, targets)
        return coef, [(g, i, (t - sum(c * x for c, x in zip(coef, r, strict=True))) / root)
                      for (g, i, root), r, t in zip(where, rows, targets, strict=True)]

    coef, residuals = fit(raw)
    # one pass of trimming: a request a busy machine stalled (another process's work, a swap) says nothing of the
    # engine: those whose residual per token lies beyond 3.5 median absolute deviations are left out, and the rest
    # (each group against its own new means) fitted again
    if residuals:
        centre = statistics.median(e for _, _, e in residuals)
        spread = 1.4826 * statistics.median(abs(e - centre) for _, _, e in residuals)
        out = {(g, i) for g, i, e in residuals if abs(e - centre) > 3.5 * spread} if spread > 0 else set()
        if out:
            coef, _ = fit([[row for i, row in enumerate(group) if (g, i) not in out] for g, group in enumerate(raw)])
    return coef[0], (coef[1] / 1000 if curve else 0.0)


def _nonnegative_fit(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Least squares with no negative coefficient: the full fit, else the best fit of a subset of the columns
    (the others zero); all zero when nothing fits."""
    width = len(rows[0])
    subsets = sorted((c for r in range(width, 0, -1) for c in itertools.combinations(range(width), r)),
                     key=len, reverse=True)
    best: tuple[float, list[float]] | None = None
    for columns in subsets:  # the full fit, else the best non-negative subset of the terms
        coef = _solve([[sum(r[i] * r[j] for r in rows) for j in columns] for i in columns],
                      [sum(r[i] * t for r, t in zip(rows, targets, strict=True)) for i in columns])
        if coef is None or any(c < 0 for c in coef):
            continue
        full = [0.0] * width
        for i, c in zip(columns, coef, strict=True):
            full[i] = c
        error = sum((t - sum(c * x for c, x in zip(full, r, strict=True))) ** 2 for r, t in zip(rows, targets,
                                                                                                strict=True))
        if best is None or error < best[0] - 1e-12:
            best = (error, full)
        if len(columns) == width:
            break
    return best[1] if best is not None else [0.0] * width


def context_slope(groups: Sequence[Sequence[BenchSampleRow]]) -> float:
    """How much a decoded token's time grows per token of its own context, as a straight line: the
    output-weighted least-squares slope within each configuration's requests, pooled (never negative)."""
    return position_fit([_timed(samples) for samples in groups], curve=False)[0]


def fit_config(points: Sequence[BenchPointRow], samples: Sequence[BenchSampleRow], *, ctx_slope: float = 0.0,
               ctx_curve: float = 0.0, max_overhead_ms: float | None = None,
               decode_at: dict[int, float] | None = None) -> ConfigFit | None:
    """Fit one configuration's cost model on its points (repeats) and their requests; None without data.

    The first wave of a point (its first ``c`` requests, sent together) is left out of the prompt fit: the engine
    processes their prompts as one batch and reports that batch's time for each (``ConfigFit.services`` models it).
    ``ctx_slope`` and ``ctx_curve`` are how decoding slows with context, pooled over the model's configurations
    and timed batch lines (``position_fit``).
    ``max_overhead_ms`` caps the per-request overhead (latency not spent in the engine) at what the lowest
    concurrency measured: above it, the extra is waiting for a free engine slot, which scales with the other
    requests' work and belongs in the calibrated parallelism, not in a per-request constant.
    ``decode_at``: the decode time per token the lower concurrency levels of the same num_ctx measured, which
    tells how much faster the last requests of a run go as fewer remain in flight (``speedups``)."""
    ok = [s for s in samples if s.ok and s.prompt_tokens is not None and s.completion_tokens is not None]
    if not ok or not points:
        return None
    first = points[0]
    c = first.concurrency
    pairs = [(float(s.prompt_tokens or 0), float(s.completion_tokens or 0)) for s in ok]
    fit = ConfigFit(
        backend=first.backend, model=first.model, num_ctx=first.num_ctx, concurrency=c, run_id=first.run_id,
        point_ids=[p.id for p in points if p.id is not None], overhead_ms=0.0, p0=0.0, p1=0.0, decode_ms=0.0,
        decode_ctx=mean_context([(p, o, 0.0) for p, o in pairs]), ctx_slope=ctx_slope, prompt_stall=0.0,
        parallelism=float(c),
        efficiency=[], load_seconds=0.0, prompt_range=(min(p for p, _ in pairs), max(p for p, _ in pairs)),
        output_range=(min(o for _, o in pairs), max(o for _, o in pairs)), rel_rmse=0.0, n_samples=len(ok),
        ctx_curve=ctx_curve, decode_ctx2=mean_context2([(p, o, 0.0) for p, o in pairs]))
    decoded = _decoded(ok)
    if len(decoded) == len(ok) and all(s.prompt_ms is not None for s in ok):
        staggered = [s for s in ok if s.idx >= c] if c > 1 and sum(s.idx >= c for s in ok) >= max(4, c) else ok
        fit.p0, fit.p1 = least_squares([[float(s.prompt_tokens or 0), float(s.prompt_tokens or 0) ** 2]
                                        for s in staggered], [s.prompt_ms or 0.0 for s in staggered]) or [0.0, 0.0]
        tokens = sum(w for _, _, w in decoded)
        fit.decode_ms = sum(y * w for _, y, w in decoded) / tokens if tokens else 0.0
        fit.prompt_stall = fit.stall_of([(p, o, 0.0) for p, o in pairs])
    else:  # an engine without timings: fit the client-side latency itself
        coef = least_squares([[1.0, p, o] for p, o in pairs], [s.latency_ms for s in ok])
        fit.p0, fit.decode_ms = (coef[1], coef[2]) if coef else (0.0, 0.0)
        fit.ctx_slope = fit.ctx_curve = 0.0
    fit.speed = speedups({**(decode_at or {}), c: fit.decode_ms}, c)
    by_point: dict[int, list[BenchSampleRow]] = defaultdict(list)
    for s in ok:
        by_point[s.point_id].append(s)
    runs = [(point, by_point.get(point.id or -1, [])) for point in points]
    predicted = {id(s): service for _, own in runs for s, service in
                 zip(own, fit.services([(float(s.prompt_tokens or 0), float(s.completion_tokens or 0), 0.0)
                                        for s in own]), strict=True)}
    rest = sorted(s.latency_ms - predicted[id(s)] for s in ok)
    fit.overhead_ms = max(0.0, rest[len(rest) // 2])
    if max_overhead_ms is not None:
        fit.overhead_ms = min(fit.overhead_ms, max_overhead_ms)
    residuals = [(s.latency_ms - predicted[id(s)] - fit.overhead_ms) / s.latency_ms for s in ok if s.latency_ms > 0]
    fit.rel_rmse = math.sqrt(sum(r * r for r in residuals) / len(residuals)) if residuals else 0.0
    replays = []  # (each point's predicted service times, its measured wall ms)
    for point, own in runs:
        services = [predicted[id(s)] + fit.overhead_ms for s in own]
        if services and point.wall_seconds > 0:
            replays.append((services, point.wall_seconds * 1000))
    if replays:
        fit.parallelism = sum(effective_parallelism(s, w, c, fit.speed) for s, w in replays) / len(replays)
        fit.efficiency = [w / makespan_at(s, fit.parallelism, fit.speed) for s, w in replays
                          if makespan_at(s, fit.parallelism, fit.speed)]
    fit.efficiency = fit.efficiency or [1.0]
    loads = sorted(p.load_seconds for p in points)
    fit.load_seconds = loads[len(loads) // 2]
    fit.measured_req_per_s = sum(p.req_per_s for p in points) / len(points)
    fit.measured_output_tps = sum(p.output_tps for p in points) / len(points)
    fit.measured_output_mean = sum(o for _, o in pairs) / len(pairs)
    return fit


TimedGroups = Sequence[tuple[str | None, Sequence[Timed]]]  # (backend, None: the one estimated; a group's requests)


async def fits_for(session: AsyncSession, model: str, backend: str | None = None, *, timings: TimedGroups = ()
                   ) -> list[ConfigFit]:
    """One fit per measured configuration of a model: the newest run's non-excluded points of each.

    Without ``backend``, the backend of the model's newest point is used (estimates never mix engines).
    ``timings``: groups of timed requests besides the sweep's (finished batches, a pilot), which tell how decoding
    slows at context positions the sweep did not reach (``position_fit``); those of another backend are left out."""
    points = await bench_repo.list_points(session, models=[model], backend=backend, include_excluded=False)
    points = [p for p in points if p.rate is None]  # request-rate points: no concurrency a batch could run at
    if not points:
        return []
    backend = backend or points[-1].backend
    newest: dict[tuple[int, int], str] = {}
    for p in points:
        if p.backend == backend:
            newest[(p.num_ctx, p.concurrency)] = p.run_id
    chosen = [p for p in points if p.backend == backend and newest[(p.num_ctx, p.concurrency)] == p.run_id]
    samples = await bench_repo.samples_of(session, [p.id for p in chosen if p.id is not None])
    extra = [group for owner, group in timings if owner in (None, backend)]
    return await asyncio.to_thread(_fit_configs, chosen, samples, extra)  # CPU work: off the event loop


def _fit_configs(chosen: Sequence[BenchPointRow], samples: Sequence[BenchSampleRow],
                 timings: Sequence[Sequence[Timed]] = ()) -> list[ConfigFit]:
    by_config: dict[tuple[int, int], list[BenchPointRow]] = defaultdict(list)
    for p in chosen:
        by_config[(p.num_ctx, p.concurrency)].append(p)
    by_point: dict[int, list[BenchSampleRow]] = defaultdict(list)
    for s in samples:
        by_point[s.point_id].append(s)
    own = {config: [s for p in group for s in by_point.get(p.id or -1, [])] for config, group in by_config.items()}
    slopes = {n: position_fit([*(_timed(samples) for (m, _), samples in own.items() if m == n), *timings])
              for n, _ in own}
    fits: list[ConfigFit] = []
    base_overhead: dict[int, float] = {}  # per num_ctx, from its lowest concurrency (no client-made queue)
    decode_at: dict[int, dict[int, float]] = defaultdict(dict)  # per num_ctx: concurrency -> decode ms per token
    for num_ctx, concurrency in sorted(by_config):
        fit = fit_config(by_config[(num_ctx, concurrency)], own[(num_ctx, concurrency)],
                         ctx_slope=slopes[num_ctx][0], ctx_curve=slopes[num_ctx][1],
                         max_overhead_ms=base_overhead.get(num_ctx), decode_at=decode_at[num_ctx])
        if fit is not None:
            base_overhead.setdefault(num_ctx, fit.overhead_ms)
            decode_at[num_ctx][concurrency] = fit.decode_ms
            fits.append(fit)
    for fit in fits:  # a cold start: Ollama loads once per num_ctx (the first point has it), llama.cpp every point
        fit.load_seconds = max(f.load_seconds for f in fits if f.num_ctx == fit.num_ctx)
        alone = min((f for f in fits if f.num_ctx == fit.num_ctx), key=lambda f: f.concurrency)
        if alone.concurrency == 1 and fit.concurrency > 1 and fit.prompt_stall > 0:
            # the stall is only charged as far as decoding with others in flight was slower than alone: an engine
            # that keeps decoding while it takes in prompts (or a simulator) shows none of it
            fit.stall_share = min(1.0, max(0.0, (fit.decode_ms - alone.decode_ms) / fit.prompt_stall))
    return fits


async def fits_preferring(session: AsyncSession, model: str, backend: str | None, *, timings: TimedGroups = ()
                          ) -> list[ConfigFit]:
    """The model's fits on ``backend`` when it has some, else on the backend it was measured on last."""
    fits = (await fits_for(session, model, backend, timings=timings)) if backend else []
    fits = fits or await fits_for(session, model, timings=timings)
    if not fits:
        raise errors.NotFoundError(f"No benchmark points for model {model!r}: run `obatch bench --model {model}` "
                                   "first.", param="model")
    return fits


async def decode_timings(session: AsyncSession, model: str, pilot: Sequence[PilotRow] = (), *,
                         exclude_batch: str | None = None) -> list[tuple[str | None, list[Timed]]]:
    """The engine's decode timings of the model's finished batch lines (per batch, with its backend) and of a
    pilot's lines (one group, on the engine being estimated): natural answers, at every context position they
    reached."""
    groups: dict[tuple[str, str], list[Timed]] = defaultdict(list)
    for backend, batch_id, prompt, tokens, ms, latency, end in await bench_repo.decode_timings(
            session, model, exclude=exclude_batch):
        groups[(backend, batch_id)].append((float(prompt), float(tokens), ms, end - latency / 1000, end))
    out: list[tuple[str | None, list[Timed]]] = [(backend, rows) for (backend, _), rows in groups.items()]
    piloted: list[Timed] = []
    for row in pilot:
        done = orjson.loads(row.result_json or "{}")
        values = [done.get(k) for k in ("prompt_tokens", "completion_tokens", "engine_decode_ms", "finished_at")]
        if all(v is not None for v in values) and values[1] and row.latency_ms is not None:
            p, o, ms, finished = (float(v) for v in values)
            piloted.append((p, o, ms, finished - row.latency_ms / 1000, finished))
    if piloted:
        out.append((None, piloted))
    return out
