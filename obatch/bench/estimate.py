"""How long will a workload take? Token-aware, config-aware estimates calibrated on stored benchmark points.

The model, per configuration (backend, model, num_ctx, concurrency ``c``), fitted on the requests its points
measured (least squares on the engine's own timings, coefficients kept non-negative):

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
answers reach a few hundred tokens of context while natural answers may run on to the context window.
(all in ms). Continuous batching runs a newcomer's prompt inside the steps of the ``c - 1`` requests decoding,
so their decode also pays for it: ``stall = (c - 1) · Σ prompt time / Σ output tokens`` of the workload, against
the stall the point measured under. ``cached`` is the share of the prompt the engine's prefix cache already
holds: benchmark prompts are all distinct, while real batches often repeat a system prompt or a document, which
llama.cpp (and Ollama, and vLLM) do not process again; it is estimated per request as the mean common prefix with
the ``c`` requests sent before it.
The first ``c`` requests leave together and the engine processes their prompts as one batch, so each of them waits
for all of those prompts (and that first wave is left out of the prompt fit).

A run of N requests is then the makespan of N such service times pulling from one queue in order (exactly how
``obatch.runner`` schedules) on ``m`` parallel servers, times a residual factor ``k``. Both are calibrated on the
stored points, replaying each point's own requests: ``m`` is the parallelism (between 1 and ``c``; fractional
values interpolate) whose makespan matches the point's measured wall time — ``c`` when the engine has a slot per
request in flight, fewer when it queues them (Ollama with ``OLLAMA_NUM_PARALLEL`` below ``c``) — and ``k``
(``wall / predicted``, about 1) keeps what is left, e.g. an engine faster than its per-request timings suggest.
A service time is a request's time beside ``c - 1`` others; with fewer left in flight (a run's tail) each goes
faster, by the ratio of the decode times the lower concurrency levels of the sweep measured (``speedups``: on two
CPU cores one sequence alone decodes about 2.6 times as fast as one of four), so one long answer at the end of a
small file costs its own time alone, not its time at full load.
Add the model's load time (the longest the points of that num_ctx measured) for the engine's (re)load.

Interval: ``± 1.96 · sqrt(cv_k² + rmse²/N)`` where ``cv_k`` is the spread of k over the repeats (0.05 assumed with
a single repeat) and ``rmse`` the relative per-request residual of the fit, at least ±5%; +10% when the workload's
mean prompt or output length lies outside what the points measured, or its concurrency was not measured.

Reality corrects the model: the ratios of actual to modelled running time of the model's newest finished
batches (``run_seconds`` against the model replayed on the lines each batch ran, at the prompt and answer tokens
they really had, so that what the answers took — learnt already — is not corrected twice; same backend, the same
concurrency when there are some) scale new estimates by their (geometric) median shrunk toward 1 by
``n / (n + 1)`` — one batch's duration is about as noisy as the bias it would correct (the same file run twice can
differ by 10-15% on a busy CPU), so a single batch moves the estimate half way and many batches all the way. Their
spread widens the interval. The first batch has no such help.

Prompt lengths of a batch file come from obatch's text estimate (``obatch.context``) mapped to the engine's token
counts by a straight line fitted on the measured requests (and the model's finished batch requests). Answer lengths
come from what the model's answers really took (``obatch.bench.answers``: a pilot of the file, finished batches,
natural benchmark requests): a request with cap ``m`` expects ``E[min(X, m)]``, one without a cap ``E[X]``, where
answers that run on to the context stop at the context left at the num_ctx the batch will run with. The run
is replayed with lengths drawn from that distribution (a long answer late in the run lengthens the makespan), and
the interval widens by the draws' spread and by how far a new file's mean answer may lie from the learnt one.
Where nothing is known, the cap (or 256 tokens) is assumed, the interval is wide, and the notes offer a pilot.

Intervals are multiplicative (``seconds / (1 + margin)`` to ``seconds · (1 + margin)``): durations err by factors,
and a lower bound never falls below zero. A file is estimated by one function (``estimate_model``) whoever asks —
the estimate endpoint, ``obatch estimate`` and the batch at its start — so one file gets one figure.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import context, errors
from obatch.backends.base import Backend, capabilities_of
from obatch.backends.pool import Pool
from obatch.bench.answers import UNBOUNDED_OUTPUT, AnswerLengths, AnswerSources, observe, t_quantile
from obatch.bench.best import best_config
from obatch.bench.metrics import stdev
from obatch.jsonl import Request, iter_file
from obatch.store import bench_repo, pilots, repo
from obatch.store.bench_tables import BenchPointRow, BenchSampleRow
from obatch.store.db import Sessions
from obatch.store.tables import BatchRow, FileRow, PilotRow

log = logging.getLogger("obatch.bench")

Z = 1.96
SINGLE_REPEAT_CV = 0.05
EXTRAPOLATION_PENALTY = 0.10
MIN_MARGIN = 0.05
HISTORY = 10  # finished batches whose estimate-vs-actual ratio corrects new estimates
ROUTE_SECONDS = 10.0  # how long a batch's start estimate waits for the engine to say a model's context length
HISTORY_LINES = 1000  # lines of each the cost model is replayed on (the running time scaled to all of them)
DRAWS = 24  # answer-length draws per estimate (fewer for big files: DRAW_BUDGET requests in all)
DRAW_BUDGET = 200_000
SHARE_SAMPLE = 2000  # prompts per model read to estimate the prefix-cache share (the rest take their mean)
SAMPLE = 4000  # lines per model an estimate reads at most; beyond that a uniform random sample of this many


# ------------------------------------------------------------------------------------------------ workload


@dataclass(slots=True)
class Shape:
    """A workload to estimate: each request's prompt and output tokens, in run order."""

    prompt_tokens: list[float]
    output_tokens: list[float]
    cached: list[float] | None = None  # share of each prompt the engine's prefix cache already holds (0-1)
    notes: list[str] = field(default_factory=list)
    count: int | None = None  # set: the workload is this many copies of the one request listed
    caps: list[int | None] | None = None  # each request's max_tokens, when its output is drawn from ``answers``
    answers: AnswerLengths | None = None  # what the model's answers are known to take
    sampled: int | None = None  # set: the listed requests are a uniform random sample of this many
    rooms: list[float | None] | None = None  # each request's context left at the num_ctx it runs with (None: unknown)
    longest: float = 0.0  # the context the longest request needs (it may not be among a sample's)

    def requests(self) -> list[tuple[float, float, float]]:
        """(prompt tokens, output tokens, cached share) per listed request."""
        cached = self.cached or [0.0] * len(self.prompt_tokens)
        return list(zip(self.prompt_tokens, self.output_tokens, cached, strict=True))

    @classmethod
    def uniform(cls, num_requests: int, prompt_tokens: float, output_tokens: float) -> Shape:
        """``num_requests`` equal requests, held as one (the estimate's cost does not grow with their number)."""
        if num_requests < 1 or prompt_tokens < 0 or output_tokens < 0:
            raise errors.ConfigError("num_requests must be positive and token lengths non-negative.")
        return cls([float(prompt_tokens)], [float(output_tokens)], count=num_requests)

    @property
    def n(self) -> int:
        return self.count if self.count is not None else self.sampled or len(self.prompt_tokens)

    @property
    def scale(self) -> float:
        """Running time of the whole workload per running time of the requests listed (a sample's N/n)."""
        return self.sampled / len(self.prompt_tokens) if self.sampled and self.prompt_tokens else 1.0

    @property
    def need(self) -> int:
        """The context the longest request needs (prompt + output)."""
        return int(max(self.longest, *(p + o for p, o in zip(self.prompt_tokens, self.output_tokens, strict=True)),
                       0.0))

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_tokens) / len(self.prompt_tokens) if self.prompt_tokens else 0.0

    @property
    def mean_output(self) -> float:
        return sum(self.output_tokens) / len(self.output_tokens) if self.output_tokens else 0.0


@dataclass(frozen=True, slots=True)
class TokenCalibration:
    """Maps obatch's text estimate to the engine's prompt tokens, and max_tokens to expected output tokens."""

    slope: float = 1.0
    intercept: float = 0.0
    output_fill: float = 1.0
    unbounded_output: float = UNBOUNDED_OUTPUT
    answers: AnswerLengths | None = None  # learnt answer lengths; when known they replace the two above
    cache_kept: float = 1.0  # how much of a repeated prompt prefix the engine really skipped (finished batches)

    def prompt(self, estimate: int) -> float:
        return max(1.0, self.slope * estimate + self.intercept)

    def output(self, max_tokens: int | None, room: float | None = None) -> float:
        """Expected output tokens of a request; ``room``: the context left for its answer (an answer the context
        cuts ends there)."""
        if self.answers is not None and self.answers.known:
            return self.answers.expected(max_tokens, room)
        guess = self.unbounded_output if max_tokens is None else max_tokens * self.output_fill
        return min(guess, room) if room is not None and room > 0 else guess


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def prompt_text(url: str, body: dict[str, Any]) -> str:
    """The text a request sends, in order (what an engine's prefix cache compares)."""
    if url == "/v1/chat/completions":
        return "\n".join(f"{m.get('role')}:{_text(m.get('content'))}"
                         for m in body.get("messages") or [] if isinstance(m, dict))
    return _text(body.get("prompt") if url == "/v1/completions" else body.get("input"))


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings (binary search over C-speed comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def cached_shares(texts: Sequence[str], window: int) -> list[float]:
    """For each prompt, the share an engine's prompt cache is expected to hold already: its common prefix with
    the prompts of the ``window`` requests before it, averaged (llama.cpp and Ollama keep one cached prompt per
    slot and give a new request the slot just freed, i.e. one of the last ``window`` requests)."""
    shares = []
    for i, text in enumerate(texts):
        previous = texts[max(0, i - window):i]
        if not text or not previous:
            shares.append(0.0)
            continue
        shares.append(sum(common_prefix(text, p) for p in previous) / len(previous) / len(text))
    return shares


@dataclass(frozen=True, slots=True)
class Line:
    """What an estimate needs of one request: obatch's prompt estimate, its cap and its endpoint."""

    prompt: int
    max_tokens: int | None
    url: str = "/v1/chat/completions"


@dataclass(slots=True)
class Lines:
    """One model's requests as an estimate reads them, in bounded memory however long the file: every line up to
    ``limit`` of them, beyond that a uniform random sample of ``limit`` (a reservoir with a fixed seed, kept in
    file order, so the same lines give the same sample whichever path reads them: the file before it is submitted,
    the store at the batch's start). What must hold for all of them is counted as they pass: how many, how many
    without a cap, the longest, the endpoints. The prompt texts of the first ``SHARE_SAMPLE`` lines tell how much
    of a prompt the engine's prefix cache holds."""

    limit: int = field(default_factory=lambda: SAMPLE)
    count: int = 0
    uncapped: int = 0
    longest: Line | None = None
    need: int = 0  # the longest line's prompt + output budget (``context.need_of``): what picks the num_ctx
    urls: set[str] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    kept: list[tuple[int, Line]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random("obatch-estimate-sample"))

    @classmethod
    def of(cls, lines: Iterable[Line], texts: Sequence[str] = (), *, limit: int | None = None) -> Lines:
        made = cls() if limit is None else cls(limit=limit)
        for line in lines:
            made.add(line)
        made.texts = list(texts)
        return made

    def add(self, line: Line) -> None:
        need = context.need_of(line.prompt, line.max_tokens)
        if self.longest is None or need > self.need:
            self.longest, self.need = line, need
        self.uncapped += line.max_tokens is None
        self.urls.add(line.url)
        if self.count < self.limit:
            self.kept.append((self.count, line))
        elif (slot := self.rng.randrange(self.count + 1)) < self.limit:  # Algorithm R
            self.kept[slot] = (self.count, line)
        self.count += 1

    @property
    def sampled(self) -> bool:
        return self.count > len(self.kept)

    def sample(self) -> list[Line]:
        """The lines kept (all of them, or the sample), in file order."""
        return [line for _, line in sorted(self.kept, key=lambda kept: kept[0])]


def prefix_cached(repeated: Sequence[float], n: int, kept: float, *, in_order: bool = True
                  ) -> tuple[list[float], float]:
    """Each of ``n`` requests' share of its prompt the engine skips (``repeated``: ``cached_shares`` of the texts
    read, times ``kept``, how much of it the engine really skipped), and their mean: requests beyond the texts read
    take the mean, and so do all of them when they are a random sample (``in_order`` False: neighbours in a sample
    are not neighbours in the run)."""
    shares = [share * kept for share in repeated]
    typical = sum(shares) / len(shares) if shares else 0.0
    cached = shares[:n] if in_order else []
    return cached + [typical] * (n - len(cached)), typical


def shape_of(lines: Lines, calibration: TokenCalibration, *, window: int = 4, num_ctx: int | None = None) -> Shape:
    """A model's lines → a Shape in engine tokens. The first lines have their own prefix-cache share (of the
    texts read), the others the mean of those; a sample's lines all take that mean (neighbours in a sample are
    not neighbours in the run). ``num_ctx``: the context window the batch runs with, which ends an answer that
    runs on to it (``num_ctx`` − its prompt)."""
    sample = lines.sample()
    repeated = cached_shares(lines.texts, window)
    cached, typical = prefix_cached(repeated, len(sample), calibration.cache_kept, in_order=not lines.sampled)
    prompts = [calibration.prompt(x.prompt) for x in sample]

    def room(prompt: float) -> float | None:
        return max(1.0, num_ctx - prompt) if num_ctx else None

    rooms = [room(p) for p in prompts]
    shape = Shape(prompts, [calibration.output(x.max_tokens, r) for x, r in zip(sample, rooms, strict=True)], cached,
                  rooms=rooms)
    if lines.sampled and lines.longest is not None:
        shape.sampled = lines.count
        longest = calibration.prompt(lines.longest.prompt)
        shape.longest = longest + calibration.output(lines.longest.max_tokens, room(longest))
        shape.notes.append(f"estimated on a uniform random sample of {len(sample)} of the {lines.count} lines")
    if calibration.answers is not None:
        shape.caps, shape.answers = [x.max_tokens for x in sample], calibration.answers
        shape.notes.extend(calibration.answers.notes(lines.count - lines.uncapped, lines.uncapped))
    elif lines.uncapped:
        shape.notes.append(f"requests without max_tokens assumed to answer {calibration.unbounded_output:.0f} "
                           "tokens")
    if typical >= 0.05:
        shape.notes.append(f"about {typical:.0%} of the prompt text repeats what recent requests sent: the engine's "
                           "prefix cache holds it, so only the rest is charged prompt processing")
    if calibration.cache_kept < 0.95 and sum(repeated) >= 0.05 * len(repeated) > 0:
        shape.notes.append(f"finished batches show the engine skipped only {calibration.cache_kept:.0%} of the "
                           "prompt prefixes it had just seen: the rest is charged as processed again")
    return shape


def file_rows(path: Path, model: str | None = None, *, done: set[tuple[str, str]] | None = None
              ) -> tuple[dict[str, Lines], dict[str, int]]:
    """The valid requests of a batch file by model (``Lines``: bounded, whatever the file's size; blocking: use a
    thread), leaving out those whose (custom_id, body sha256) is in ``done`` (a pilot ran them: the batch will take
    them as finished), and how many were left out per model."""
    groups: dict[str, Lines] = defaultdict(Lines)
    skipped: dict[str, int] = defaultdict(int)
    with path.open("rb") as handle:
        for r in iter_file(handle, model=model):
            if not isinstance(r, Request):
                continue
            if done and (r.custom_id, pilots.body_sha256(orjson.dumps(r.body))) in done:
                skipped[r.model] += 1
                continue
            group = groups[r.model]
            if len(group.texts) < SHARE_SAMPLE:
                group.texts.append(prompt_text(r.url, r.body))
            group.add(Line(context.estimate_prompt_tokens(r.url, r.body), context.output_budget(r.body), r.url))
    return dict(groups), dict(skipped)


# ------------------------------------------------------------------------------------------------ fitting


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


def makespan(service_ms: Sequence[float], workers: int, speed: Sequence[float] = ()) -> float:
    """When the last of these jobs ends, ``workers`` at a time pulling from one queue in order (ms).

    ``speed[k - 1]``: how much faster each job runs while only ``k`` are in flight (1 beyond the list): an engine
    that decodes one sequence alone does so faster than four side by side, so a long answer left alone at the end
    of a run finishes sooner than its service time at full load says. The jobs in flight share the engine, so
    they advance at one rate: a job of service ``s`` ends when the work done per job since it started reaches
    ``s``."""
    slots = max(1, min(workers, len(service_ms)))
    if not any(v != 1.0 for v in speed[:slots]):
        ends = [0.0] * slots
        for s in service_ms:
            heapq.heapreplace(ends, ends[0] + s)
        return max(ends)
    jobs = iter(service_ms)
    ends = sorted(itertools.islice(jobs, slots))  # the work done per job at which each in flight ends
    clock = done = 0.0
    while ends:
        k = len(ends)
        clock += (ends[0] - done) / (speed[k - 1] if k <= len(speed) else 1.0)
        done = ends[0]
        following = next(jobs, None)
        if following is None:
            heapq.heappop(ends)
        else:
            heapq.heapreplace(ends, done + following)
    return clock


def makespan_runs(runs: Sequence[tuple[float, int]], workers: int) -> float:
    """``makespan`` of runs of equal jobs ((service ms, how many) in order), in time independent of how many.

    Within a run, once the workers' end times lie within one job's length of each other, the next ``workers`` jobs
    go one to each (the earliest-ending worker's new end is at least the latest's), so whole rounds are added at
    once; only the jobs before that and the remainder are placed one by one. The ends' multiset, and so the
    makespan, is what ``makespan`` finds on the expanded list."""
    ends = [0.0] * max(1, min(workers, sum(n for _, n in runs)))
    top = 0.0
    for service, count in runs:
        while count and top - ends[0] > service:
            top = max(top, ends[0] + service)
            heapq.heapreplace(ends, ends[0] + service)
            count -= 1
        rounds, count = divmod(count, len(ends))
        if rounds:
            ends = [e + rounds * service for e in ends]  # a constant shift keeps the heap a heap
            top += rounds * service
        for _ in range(count):
            top = max(top, ends[0] + service)
            heapq.heapreplace(ends, ends[0] + service)
    return top


def _interpolated(makespan_of: Callable[[int], float], parallelism: float) -> float:
    low = max(1, math.floor(parallelism))
    at_low = makespan_of(low)
    if parallelism <= low:
        return at_low
    return at_low + (makespan_of(low + 1) - at_low) * (parallelism - low)


def makespan_at(service_ms: Sequence[float], parallelism: float, speed: Sequence[float] = ()) -> float:
    """``makespan`` for a fractional number of servers, linear between the two whole numbers around it."""
    return _interpolated(lambda workers: makespan(service_ms, workers, speed), parallelism)


def makespan_runs_at(runs: Sequence[tuple[float, int]], parallelism: float) -> float:
    """``makespan_runs`` for a fractional number of servers (as ``makespan_at``)."""
    return _interpolated(lambda workers: makespan_runs(runs, workers), parallelism)


def effective_parallelism(service_ms: Sequence[float], wall_ms: float, concurrency: int,
                          speed: Sequence[float] = ()) -> float:
    """The parallelism in [1, concurrency] whose makespan of these jobs equals the measured wall time."""
    if not service_ms or makespan(service_ms, concurrency, speed) >= wall_ms:
        return float(concurrency)
    if makespan(service_ms, 1, speed) <= wall_ms:
        return 1.0
    low, high = 1.0, float(concurrency)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if makespan_at(service_ms, middle, speed) > wall_ms else (low, middle)
    return (low + high) / 2


def speedups(decode_ms: dict[int, float], concurrency: int) -> tuple[float, ...]:
    """``makespan``'s ``speed`` for a configuration of ``concurrency`` from the decode time per token measured at
    each concurrency level (of the same num_ctx): with ``k`` in flight a job runs ``d(c) / d(k)`` times as fast,
    ``d`` linear between the measured levels; at least as fast as at ``c`` and never more throughput than ``c``
    in flight gave (``c / k``). Empty when no lower level was measured."""
    levels = sorted((c, d) for c, d in decode_ms.items() if c <= concurrency and d > 0)
    if concurrency not in decode_ms or len(levels) < 2:
        return ()
    top = decode_ms[concurrency]
    out = []
    for k in range(1, concurrency):
        below = [(c, d) for c, d in levels if c <= k]
        above = [(c, d) for c, d in levels if c >= k]
        if not below:
            return ()  # below the lowest level measured: nothing tells
        (c0, d0), (c1, d1) = below[-1], above[0]
        at_k = d0 if c1 == c0 else d0 + (d1 - d0) * (k - c0) / (c1 - c0)
        out.append(min(concurrency / k, max(1.0, top / at_k)))
    return tuple(out)


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


async def calibration_for(session: AsyncSession, model: str, fits: Sequence[ConfigFit], *,
                          endpoint: str | None = None, pilot: Sequence[PilotRow] = (),
                          population: int | None = None, exclude_batch: str | None = None,
                          repeated: float = 0.0) -> TokenCalibration:
    """Text-estimate → engine-token line from measured requests and finished batches, and the model's answer
    lengths (``obatch.bench.answers``): a pilot's of this file when given (``population``: the file's lines), else
    those of finished batches (on ``endpoint`` when it has enough) and of natural benchmark requests. A batch being
    estimated at its start leaves its own rows out (``exclude_batch``: the lines a pilot ran are already finished
    there), so it is estimated from what its file's estimate saw. ``repeated``: the mean share of a line's prompt
    that repeats the lines before it (``cached_shares``), for what a pilot tells of the prefix cache."""
    ids = [i for f in fits for i in f.point_ids]
    pairs = [(float(s.prompt_estimate), float(s.prompt_tokens)) for s in await bench_repo.samples_of(session, ids)
             if s.ok and s.prompt_tokens is not None and s.prompt_estimate > 0]
    history = await bench_repo.batch_token_pairs(session, model, exclude=exclude_batch)
    pairs += [(float(e), float(p)) for e, p, _, _ in history if e > 0]
    slope, intercept = 1.0, 0.0
    if pairs:
        coef = least_squares([[e, 1.0] for e, _ in pairs], [p for _, p in pairs])
        if coef is not None and coef[0] > 0:
            slope, intercept = coef
        else:
            slope = sum(p for _, p in pairs) / sum(e for e, _ in pairs)
    sources = AnswerSources()
    for row in pilot:
        if (seen := observe(row.completion_tokens, row.max_tokens, row.finish_reason, "pilot")) is not None:
            sources.pilot.append(seen)
    for url, max_tokens, tokens, reason, batch_id in await bench_repo.answer_observations(session, model,
                                                                                        exclude=exclude_batch):
        if (seen := observe(tokens, max_tokens, reason, batch_id)) is not None:
            sources.batches[url].append(seen)
    for tokens, run_id in await bench_repo.natural_bench_answers(session, model):
        if (seen := observe(tokens, None, None, run_id)) is not None:
            sources.benchmarks.append(seen)
    timed = await bench_repo.prompt_timings(session, model, exclude=exclude_batch)
    alone = min(fits, key=lambda f: f.concurrency)
    piloted = pilot_cache_kept(pilot, alone, repeated) if pilot else None
    kept = cache_kept(timed, alone, lambda e: max(1.0, slope * e + intercept),
                      window=max(f.concurrency for f in fits), default=1.0 if piloted is None else piloted)
    return TokenCalibration(slope, intercept, answers=sources.lengths(endpoint, population=population),
                            cache_kept=kept)


def cache_kept(timed: Sequence[tuple[str, int, str, str, int, float]], fit: ConfigFit,
               tokens: Callable[[int], float], *, window: int, default: float = 1.0) -> float:
    """How much of the prefix an engine's cache should hold (``cached_shares``) it really skipped, from finished
    batch requests the engine timed: the least-squares slope of (full prompt time − measured) on the time the
    cache should have saved, in [0, 1]. llama.cpp and Ollama skip it (about 1); an engine without a prefix cache
    processes every prompt in full (0). ``default`` (1: the cache works; or what a pilot showed) until enough
    requests had a prefix to skip. The first ``window`` lines of a batch are left out: their prompts were processed
    as one batch."""
    by_batch: dict[str, list[tuple[int, str, str, int, float]]] = defaultdict(list)
    for batch_id, line, url, body, estimate, ms in timed:
        by_batch[batch_id].append((line, url, body, estimate, ms))
    num = den = saved_total = 0.0
    for rows in by_batch.values():
        rows.sort()
        texts = [prompt_text(url, orjson.loads(body)) for _, url, body, _, _ in rows]
        for i, ((_, _, _, estimate, ms), share) in enumerate(zip(rows, cached_shares(texts, window), strict=True)):
            if i < window:
                continue
            full = fit.prompt_ms(tokens(estimate))
            saved = full * share
            num, den, saved_total = num + (full - ms) * saved, den + saved * saved, saved_total + saved
    if den <= 0 or saved_total < 0.05 * sum(fit.prompt_ms(tokens(r[4])) for r in timed) or len(timed) < 8:
        return default
    return min(1.0, max(0.0, num / den))


def pilot_cache_kept(pilot: Sequence[PilotRow], fit: ConfigFit, repeated: float) -> float | None:
    """``cache_kept`` from a pilot, before any batch tells it: the pilot ran random lines of the file, so each had
    about the file's mean repeated share (``repeated``, of ``cached_shares``) in common with those before it; what
    its prompts took against their full cost (``fit.prompt_ms`` of the engine's own token counts) says how much of
    that share the engine skipped. The first wave (the pilot's first ``c`` lines by start time) is left out; None
    when the pilot cannot tell (too few lines, or too little repeated)."""
    rows = []
    for row in pilot:
        done = orjson.loads(row.result_json or "{}")
        prompt, ms, end = done.get("prompt_tokens"), done.get("engine_prompt_ms"), done.get("finished_at")
        if prompt and ms is not None and end is not None and row.latency_ms is not None:
            rows.append((float(end) - row.latency_ms / 1000, float(prompt), float(ms)))
    rows = sorted(rows)[max((p.concurrency or 1) for p in pilot):] if rows else []
    full = sum(fit.prompt_ms(p) for _, p, _ in rows)
    if len(rows) < 8 or repeated < 0.05 or full <= 0:
        return None
    return min(1.0, max(0.0, (full - sum(ms for _, _, ms in rows)) / (repeated * full)))


# ------------------------------------------------------------------------------------------------ estimating


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
    history_factor: float = 1.0  # the correction learned from finished batches (1: none yet)
    history_batches: int = 0
    notes: list[str] = field(default_factory=list)
    measured_req_per_s: float | None = None  # what the points the estimate rests on measured (their workload)
    answers: dict[str, Any] | None = None  # what the answer lengths were taken from (``AnswerLengths.summary``)
    pilot: dict[str, Any] | None = None  # the pilot run behind it, if any
    done_requests: int = 0  # lines a pilot already ran: the batch takes them as finished
    output_share: float | None = None  # how the running time scales with the answers' length (d log t / d log O)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick_num_ctx(fits: Sequence[ConfigFit], need: int, target: int | None) -> int:
    sizes = sorted({f.num_ctx for f in fits})
    if target is not None:
        at_least = [n for n in sizes if n >= target]
        return at_least[0] if at_least else sizes[-1]
    holding = [n for n in sizes if n >= need]
    return holding[0] if holding else sizes[-1]


def _at_concurrency(fits: Sequence[ConfigFit], shape: Shape, concurrency: int) -> tuple[float, ConfigFit, str | None]:
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


def estimate_from_fits(fits: Sequence[ConfigFit], shape: Shape, *, num_ctx: int | None = None,
                       concurrency: int | None = None, include_load: bool = True,
                       history: Sequence[tuple[int, float]] = ()) -> Estimate:
    """The estimate for one model's fits: for (num_ctx, concurrency) when given, else for the best config.

    ``history`` holds (concurrency, actual / modelled running time) of finished batches (``history_ratios``): the
    median ratio of those at the chosen concurrency (of all when none is), shrunk toward 1 by ``n / (n + 1)``,
    scales the running time, and their spread widens the interval — the record of estimate vs actual corrects
    what the benchmark could not see."""
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
    if concurrency is None and num_ctx is None:
        chosen_ctx, chosen_c = best["num_ctx"], best["concurrency"]
    else:
        chosen_ctx = _pick_num_ctx(fits, need, num_ctx)
        fastest = min((f.run_seconds(shape), f.concurrency) for f in fits if f.num_ctx == chosen_ctx)[1]
        chosen_c = concurrency if concurrency is not None else fastest
    same_ctx = [f for f in fits if f.num_ctx == chosen_ctx]
    run_seconds, basis, note = _at_concurrency(same_ctx, shape, chosen_c)
    margin = basis.margin(shape)
    share = None
    if shape.answers is not None and shape.caps is not None and shape.count is None:
        drawn, draw_cv, mean_cv = answer_spread(basis, shape)
        run_seconds *= drawn
        margin = math.sqrt(margin ** 2 + (Z * draw_cv) ** 2 + (Z * mean_cv) ** 2)
        share = output_share(basis, shape)
    ratios = [r for c, r in history if c == chosen_c] or [r for _, r in history]
    factor = math.exp(statistics.median(map(math.log, ratios)) * len(ratios) / (len(ratios) + 1)) if ratios else 1.0
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
        output_tokens_mean=shape.mean_output, seconds=seconds, low=run_seconds / (1 + margin) + load,
        high=run_seconds * (1 + margin) + load, load_seconds=load, num_ctx=chosen_ctx, concurrency=chosen_c,
        req_per_s=rate, best=best, candidates=candidates, points=points,
        history_factor=factor, history_batches=len(ratios), notes=notes,
        measured_req_per_s=basis.measured_req_per_s,
        answers=shape.answers.summary() if shape.answers is not None else None, output_share=share,
    )


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


async def history_ratios(session: AsyncSession, model: str, backend: str, limit: int = HISTORY, *,
                         fits: Sequence[ConfigFit] = (), calibration: TokenCalibration | None = None
                         ) -> list[tuple[int, float]]:
    """(concurrency, actual / modelled running time) of the newest finished batches that ran ``model`` alone on
    ``backend`` and were estimated before they ran: what the cost model got wrong, which is what the ratio should
    correct. What a batch's answers took is learnt already (``calibration_for``), so the model is replayed on the
    batch's own lines at the lengths they really had (``replayed_seconds``, with ``fits``): a file whose answers ran
    longer than expected, or whose long answers were more of them, must not make the next file's estimate longer a
    second time. Without ``fits`` (or the lines), the estimate the batch stored at its start stands for the model,
    taken as the model made it (before any earlier correction, so corrections do not compound) and rescaled to the
    batch's mean answer. Running time leaves the load out."""
    out: list[tuple[int, float]] = []
    for batch in await bench_repo.estimated_batches(session, limit=10 * limit):
        groups = orjson.loads(batch.estimate_json or "{}").get("groups") or []
        if batch.backend != backend or len(groups) != 1 or groups[0].get("model") != model:
            continue
        made = groups[0]
        load = float(made.get("load_seconds") or 0.0)
        count, rows = await bench_repo.run_lines(session, batch.id, model, HISTORY_LINES) if fits else (0, [])
        raw = await asyncio.to_thread(replayed_seconds, fits, rows, count, calibration or TokenCalibration(),
                                      num_ctx=made.get("num_ctx"), concurrency=int(made["concurrency"])) \
            if rows else None
        if raw is None:
            raw = (float(made["seconds"]) - load) / float(made.get("history_factor") or 1.0)
            expected, share = float(made.get("output_tokens_mean") or 0.0), made.get("output_share")
            if expected > 0 and share is not None and batch.completed and batch.output_tokens > 0:
                raw *= (batch.output_tokens / batch.completed / expected) ** float(share)
        if raw > 0 and batch.run_seconds > load:
            out.append((int(made["concurrency"]), (batch.run_seconds - load) / raw))
        if len(out) >= limit:
            break
    return out


def replayed_seconds(fits: Sequence[ConfigFit], rows: Sequence[tuple[str, str, int, int]], count: int,
                     calibration: TokenCalibration, *, num_ctx: int | None, concurrency: int) -> float | None:
    """The running time the cost model gives a finished batch's lines (``bench_repo.run_lines``: the first of
    ``count``) at the prompt and answer tokens the engine reported, in their order, at the batch's num_ctx and
    concurrency (blocking: CPU work for a thread)."""
    if not fits or not rows:
        return None
    texts = [prompt_text(url, orjson.loads(body)) for url, body, _, _ in rows[:SHARE_SAMPLE]]
    cached, _ = prefix_cached(cached_shares(texts, concurrency), len(rows), calibration.cache_kept)
    shape = Shape([float(p) for _, _, p, _ in rows], [float(o) for _, _, _, o in rows], cached,
                  sampled=count if count > len(rows) else None)
    chosen = _pick_num_ctx(fits, shape.need, num_ctx)
    return _at_concurrency([f for f in fits if f.num_ctx == chosen], shape, concurrency)[0]


async def fits_preferring(session: AsyncSession, model: str, backend: str | None, *, timings: TimedGroups = ()
                          ) -> list[ConfigFit]:
    """The model's fits on ``backend`` when it has some, else on the backend it was measured on last."""
    fits = (await fits_for(session, model, backend, timings=timings)) if backend else []
    fits = fits or await fits_for(session, model, timings=timings)
    if not fits:
        raise errors.NotFoundError(f"No benchmark points for model {model!r}: run `obatch bench --model {model}` "
                                   "first.", param="model")
    return fits


async def estimate_groups(session: AsyncSession, *, model: str | None = None, num_requests: int | None = None,
                          prompt_tokens: float | None = None, output_tokens: float | None = None,
                          file: Path | None = None, backend: str | None = None, num_ctx: int | None = None,
                          concurrency: int | None = None, include_load: bool = True,
                          engine: Backend | None = None, file_sha256: str | None = None) -> list[Estimate]:
    """Estimates for ``num_requests`` × (prompt_tokens, output_tokens) on ``model``, or for a batch file: one per
    model group of the file (``model`` then overrides every line's model, as ``obatch run --model`` does).
    Points measured on ``backend`` are preferred. A file is estimated exactly as its batch will be at its start
    (``estimate_model``): ``engine``, when given, tells the context window obatch will pick; ``file_sha256`` finds
    the lines a pilot already ran (left out: the batch takes them as finished) and the answers it measured."""
    if file is None:
        if model is None or num_requests is None or prompt_tokens is None or output_tokens is None:
            raise errors.ConfigError("Give model, num_requests, prompt_tokens and output_tokens, or an input file.",
                                     param="num_requests")
        fits = await fits_preferring(session, model, backend)
        history = await history_ratios(session, model, fits[0].backend, fits=fits,
                                       calibration=await calibration_for(session, model, fits))
        return [await asyncio.to_thread(
            functools.partial(estimate_from_fits, fits, Shape.uniform(num_requests, prompt_tokens, output_tokens),
                              num_ctx=num_ctx, concurrency=concurrency, include_load=include_load, history=history))]
    piloted = await pilot_rows(session, file_sha256) if file_sha256 else []
    done = {(p.custom_id, p.body_sha256) for p in piloted if p.used_by is None}
    groups, skipped = await asyncio.to_thread(file_rows, file, model, done=done)
    if not groups and not skipped:
        raise errors.ConfigError("The file holds no valid batch requests.", param="input_file_id")
    out = []
    for name in [*groups, *(m for m in skipped if m not in groups)]:
        out.append(await estimate_model(
            session, name, groups.get(name) or Lines(), backend=backend, engine=engine, num_ctx=num_ctx,
            concurrency=concurrency, include_load=include_load, pilot=[p for p in piloted if p.model == name],
            done=skipped.get(name, 0)))
    return out


async def pilot_rows(session: AsyncSession, file_sha256: str) -> list[PilotRow]:
    return await pilots.all_of(session, file_sha256)


async def estimate_model(session: AsyncSession, model: str, lines: Lines, *, backend: str | None,
                         engine: Backend | None = None, num_ctx: int | None = None, concurrency: int | None = None,
                         include_load: bool = True, pilot: Sequence[PilotRow] = (), done: int = 0,
                         strict_backend: bool = False, exclude_batch: str | None = None) -> Estimate:
    """The one estimate of a model's lines, whoever asks (the estimate endpoint and command line for a file, the
    batch at its start): the same rows, answer lengths, context window and draws give the same figures.

    The context window is the one the batch will run: obatch's pick for the longest request when the engine sets
    one (``engine``'s capabilities; assumed when no engine is at hand), or ``num_ctx`` when given; answers that
    run on to the context end there. The model's context length only lowers that pick for a model whose context
    is smaller; it is not asked here (an estimate needs no engine, and must not wait on a busy one) but taken from
    what an engine pool learnt when it routed the model (a batch routes its models before its estimate, a pilot
    before it runs). Without benchmark points, a pilot's own latencies are extrapolated instead."""
    timings = await decode_timings(session, model, pilot, exclude_batch=exclude_batch)
    try:
        fits = (await fits_for(session, model, backend, timings=timings)) if strict_backend else \
            await fits_preferring(session, model, backend, timings=timings)
    except errors.NotFoundError:
        fits = []
    population = lines.count + done
    if not fits:
        timed = [p for p in pilot if p.latency_ms]
        if len(timed) >= 2:
            return pilot_extrapolation(model, backend or (engine.name if engine else ""), lines.count, timed, done,
                                       include_load=include_load)
        raise errors.NotFoundError(f"No benchmark points for model {model!r}: run `obatch bench --model {model}` "
                                   "first, or a pilot of the file (--pilot 16).", param="model")
    if not lines.count:
        return _nothing_left(fits[0], model, done)
    if num_ctx is None and (engine is None or capabilities_of(engine).sets_num_ctx):
        known = engine.context_lengths.get(model) if isinstance(engine, Pool) else None
        num_ctx = context.fit_num_ctx(lines.need, known).num_ctx
    endpoint = next(iter(lines.urls)) if len(lines.urls) == 1 else None
    window = concurrency or max(f.concurrency for f in fits)
    shares = cached_shares(lines.texts, window) if pilot else []
    calibration = await calibration_for(session, model, fits, endpoint=endpoint, pilot=pilot, population=population,
                                        exclude_batch=exclude_batch,
                                        repeated=statistics.fmean(shares) if shares else 0.0)
    history = await history_ratios(session, model, fits[0].backend, fits=fits, calibration=calibration)
    made = await asyncio.to_thread(_estimate_rows, fits, lines, calibration,
                                   window=concurrency or max(f.concurrency for f in fits), num_ctx=num_ctx,
                                   concurrency=concurrency, include_load=include_load, history=history)
    made.done_requests = done
    if done:
        made.notes.append(f"{done} line(s) a pilot already ran are not counted: the batch takes them as finished")
    return made


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


def _nothing_left(fit: ConfigFit, model: str, done: int) -> Estimate:
    return Estimate(model=model, backend=fit.backend, num_requests=0, prompt_tokens_mean=0.0, output_tokens_mean=0.0,
                    seconds=0.0, low=0.0, high=0.0, load_seconds=0.0, num_ctx=fit.num_ctx,
                    concurrency=fit.concurrency, req_per_s=0.0, best=None, candidates=[], points=[],
                    done_requests=done, notes=[f"every line was already run by a pilot ({done})"])


def pilot_extrapolation(model: str, backend: str, remaining: int, pilot: Sequence[PilotRow], done: int, *,
                        include_load: bool = True) -> Estimate:
    """No benchmark of the model: the pilot's own requests, run ``c`` at a time, are the measurement. The
    remaining lines' latencies are drawn from the pilot's (a bootstrap of the makespan at the pilot's ``c``), and
    the interval is the t-interval of the pilot's mean latency (a sample of n out of N lines) with the draws'
    spread."""
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
               f"(±{margin:.0%} is what a sample of {n} supports)"],
        measured_req_per_s=None, done_requests=done)


def _estimate_rows(fits: Sequence[ConfigFit], lines: Lines, calibration: TokenCalibration, *, window: int,
                   **options: Any) -> Estimate:
    """``shape_of`` then ``estimate_from_fits``: the CPU part of an estimate, run in a worker thread. Answers
    that run on to the context end at the batch's num_ctx (when known, else the measured one it would use)."""
    num_ctx = options.get("num_ctx") or _pick_num_ctx(fits, lines.need, None)
    return estimate_from_fits(fits, shape_of(lines, calibration, window=window, num_ctx=num_ctx), **options)


async def estimate(session: AsyncSession, model: str | None, **kwargs: Any) -> Estimate:
    """``estimate_groups`` for one model (a file's lines all count as ``model``): the notebook and CLI form."""
    return (await estimate_groups(session, model=model, **kwargs))[0]


# ------------------------------------------------------------------------------------- batches: before & after


async def estimate_batch(sessions: Sessions, batch: BatchRow, backend: Backend, concurrency: int | None
                         ) -> dict[str, Any] | None:
    """The estimate for a batch about to run (its pending requests, per model group, at the num_ctx obatch will
    pick and the batch's concurrency — ``None`` for auto, which settles at the fastest measured level), made by
    ``estimate_model`` as the file's estimate is; None when a model has no benchmark points."""
    async with sessions() as session:
        stored = await session.get(FileRow, batch.input_file_id)
        piloted = await pilot_rows(session, stored.sha256) if stored is not None and stored.sha256 else []
        models = [g.model for g in await repo.pending_groups(session, batch.id, context.DEFAULT_OUTPUT_BUDGET)]
        for model in models:  # before the rows are read: reading them costs time, for nothing
            if not any(p.model == model for p in piloted) and not await fits_for(session, model, backend.name):
                return None
    if isinstance(backend, Pool):  # the batch routes its models next: learn their context lengths now
        for model in models:
            with contextlib.suppress(errors.BackendError, TimeoutError):
                async with asyncio.timeout(ROUTE_SECONDS):
                    await backend.route(model)
    async with sessions() as session:
        groups: dict[str, Lines] = defaultdict(Lines)
        async for model, url, prompt, max_tokens in bench_repo.pending_lines(session, batch.id):
            groups[model].add(Line(prompt, max_tokens, url))
        parts = []
        for model, lines in groups.items():
            lines.texts = [prompt_text(url, orjson.loads(body))
                           for url, body in await bench_repo.pending_bodies(session, batch.id, model, SHARE_SAMPLE)]
            mine = [p for p in piloted if p.model == model]
            try:
                parts.append(await estimate_model(
                    session, model, lines, backend=backend.name, engine=backend, concurrency=concurrency,
                    pilot=mine, done=sum(p.used_by == batch.id for p in mine), strict_backend=True,
                    exclude_batch=batch.id))
            except errors.NotFoundError:
                return None
    if not parts:
        return None
    return {
        "seconds": sum(p.seconds for p in parts), "low": sum(p.low for p in parts),
        "high": sum(p.high for p in parts), "concurrency": concurrency, "made_at": time.time(),
        "groups": [{k: v for k, v in p.as_dict().items() if k != "candidates"} for p in parts],
    }


async def estimate_json_for_batch(sessions: Sessions, batch: BatchRow, backend: Backend, concurrency: int | None
                                  ) -> str | None:
    """``estimate_batch`` as the JSON kept in ``BatchRow.estimate_json``. An estimate is advice: any failure
    to make one is logged and the batch runs without it."""
    try:
        made = await estimate_batch(sessions, batch, backend, concurrency)
    except Exception:
        log.warning("could not estimate batch %s", batch.id, exc_info=True)
        return None
    return orjson.dumps(made).decode() if made is not None else None


def _estimate_vs_actual(batch: BatchRow) -> dict[str, Any]:
    made = orjson.loads(batch.estimate_json or "{}")
    actual = batch.run_seconds
    seconds = float(made.get("seconds") or 0.0)
    groups = made.get("groups") or []
    return {
        "batch_id": batch.id, "source": batch.source, "backend": batch.backend,
        "models": ",".join(g.get("model", "") for g in groups), "requests": batch.total,
        "completed": batch.completed, "concurrency": made.get("concurrency"), "created_at": batch.created_at,
        "estimated_seconds": seconds, "low": made.get("low"), "high": made.get("high"), "actual_seconds": actual,
        "error_pct": (seconds - actual) / actual * 100 if actual > 0 else None,
        "within_interval": bool(made.get("low", 0) <= actual <= made.get("high", 0)),
        "actual_req_per_s": batch.completed / actual if actual > 0 else None,
    }


async def estimates_vs_actuals(session: AsyncSession, *, owner: str | None = None, limit: int = 500
                               ) -> list[dict[str, Any]]:
    """Finished batches that were estimated before they ran (an owner's, or all): estimate, interval, realised
    duration, error."""
    return [_estimate_vs_actual(b) for b in await bench_repo.estimated_batches(session, owner=owner, limit=limit)]
