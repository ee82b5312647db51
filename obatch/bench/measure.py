"""Measuring: one point (a configuration, once), and sweeps of models × num_ctx × load levels × repeats.

A point goes: ``backend.prepare`` (the engine (re)loads for this num_ctx and this many parallel slots; Ollama
loads on the first request instead), warm-up requests (not measured), then the workload's requests, streamed so
that TTFT and inter-token gaps are seen by the client. A load level is either a concurrency (closed loop: the same
runner ``obatch run`` uses, one shared queue, ``concurrency`` workers) or a request rate (open loop,
``obatch.bench.load``: each request sent when its arrival is due, whatever the engine is doing); both retry
transient faults and measure latency from the moment a request is sent. Wall time runs from the first measured
request to the last answer.

A sweep stores each point as it finishes. Its order changes the model, then num_ctx, then the load, with
repeats innermost, so every engine (re)load happens once per configuration. Running the same sweep again resumes
the unfinished run and measures only the points it lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from obatch import errors
from obatch.backends.base import Backend, BackendWrapper, Result, complete_by_streaming
from obatch.backends.pool import fixed
from obatch.bench.environment import environment, obatch_version
from obatch.bench.load import ARRIVALS, MAX_RATE, achieved_rate, arrival_offsets, rate_label
from obatch.bench.metrics import Sample, summarise
from obatch.bench.workloads import BenchRequest, Workload, parse_workload
from obatch.config import Settings
from obatch.progress import progress_bar
from obatch.protocol import new_id
from obatch.runner import Job, Outcome, RetryPolicy, call_with_retries, run_jobs
from obatch.store import bench_repo
from obatch.store.bench_tables import BenchPointRow, BenchRunRow
from obatch.store.db import Sessions, open_store

SAMPLE_RESPONSES = 3
SAMPLE_CHARS = 300


@dataclass(frozen=True, slots=True)
class PointKey:
    """One point. With a ``rate`` the load is open-loop and ``concurrency`` caps the requests in flight (0: no
    cap); without, ``concurrency`` requests are kept in flight."""

    model: str
    num_ctx: int
    concurrency: int
    repeat: int = 0
    rate: float | None = None
    arrival: str | None = None

    @property
    def config(self) -> bench_repo.PointConfig:
        return (self.model, self.num_ctx, self.concurrency, self.repeat, self.rate, self.arrival)

    @property
    def load(self) -> str:
        """``concurrency 4`` or ``rate 2/s poisson``: what a progress line calls the load."""
        if self.rate is None:
            return f"concurrency {self.concurrency}"
        return f"rate {rate_label(self.rate, self.arrival, self.concurrency)}"


@dataclass
class SweepSpec:
    """Everything that defines a sweep; two sweeps with equal specs are the same sweep (and resume each other)."""

    models: list[str]
    num_ctx: list[int]
    concurrency: list[int]
    requests: int = 32
    workload: str = "chat"
    repeats: int = 1
    warmup: int = 1
    seed: int = 0
    max_failure_rate: float = 0.05
    backend: str | None = None  # None: the settings' backend; "sim": an in-process Ollama simulator
    url: str | None = None
    name: str = ""
    rates: list[float] = field(default_factory=list)  # requests per second (open loop), beside ``concurrency``
    arrival: str = "poisson"  # of the rate points: constant | poisson
    max_concurrency: int = 0  # of the rate points: the most requests in flight, 0 for no cap

    def __post_init__(self) -> None:
        if not self.models or not self.num_ctx or not (self.concurrency or self.rates):
            raise errors.ConfigError("A sweep needs at least one model, one num_ctx and one concurrency level or "
                                     "request rate.")
        if (min(self.concurrency, default=1) < 1 or min(self.num_ctx) < 1 or self.requests < 1
                or self.repeats < 1 or self.max_concurrency < 0):
            raise errors.ConfigError("num_ctx, concurrency, requests and repeats must be positive.")
        if any(not 0 < r <= MAX_RATE for r in self.rates):
            raise errors.ConfigError(f"Request rates are between 0 and {MAX_RATE:g} per second.", param="rate")
        if self.arrival not in ARRIVALS:
            raise errors.ConfigError(f"arrival is one of {', '.join(ARRIVALS)}; got {self.arrival!r}.",
                                     param="arrival")
        self.num_ctx = sorted(set(self.num_ctx))
        self.concurrency = sorted(set(self.concurrency))
        self.rates = sorted({float(r) for r in self.rates})

    def resolved_workload(self) -> Workload:
        return parse_workload(self.workload)

    def points(self) -> list[PointKey]:
        return plan(self.models, self.num_ctx, self.concurrency, self.repeats, rates=self.rates,
                    arrival=self.arrival, max_concurrency=self.max_concurrency)

    def signature(self, backend: str) -> str:
        identity = {k: v for k, v in asdict(self).items() if k not in ("name", "workload")}
        if not self.rates:  # a sweep without rates keeps the signature it had before rates existed (it resumes)
            identity = {k: v for k, v in identity.items() if k not in ("rates", "arrival", "max_concurrency")}
        identity |= {"backend": backend, "workload": self.resolved_workload().as_dict()}
        return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass
class SweepReport:
    run_id: str
    measured: list[PointKey] = field(default_factory=list)
    skipped: list[PointKey] = field(default_factory=list)
    seconds: float = 0.0


def plan(models: Sequence[str], num_ctx: Sequence[int], concurrency: Sequence[int], repeats: int = 1, *,
         rates: Sequence[float] = (), arrival: str = "poisson", max_concurrency: int = 0) -> list[PointKey]:
    """Every point of a sweep in measuring order: model, then num_ctx, then the load (concurrency levels, then
    request rates), repeats innermost.

    Ollama reloads a model when num_ctx changes; the embedded engine restarts when num_ctx or its slot count
    changes. This order makes each of those changes once per configuration (the fewest possible)."""
    loads = [(c, None) for c in concurrency] + [(max_concurrency, float(r)) for r in rates]
    return [PointKey(m, n, c, r, rate, arrival if rate is not None else None)
            for m in models for n in num_ctx for c, rate in loads for r in range(repeats)]


def reloads(points: Sequence[PointKey], *, restart_on_concurrency: bool) -> int:
    """How many engine (re)loads measuring ``points`` in this order costs."""
    count, loaded = 0, None
    for p in points:
        state = (p.model, p.num_ctx, p.concurrency if restart_on_concurrency else None)
        if state != loaded:
            count, loaded = count + 1, state
    return count


class ChunkClock(BackendWrapper):
    """A backend wrapper that notes the gaps between streamed content chunks of each request (inter-token
    latency), keyed by the identity of the request body. Everything else passes through."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.gaps: dict[int, list[float]] = {}

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        if not stream or url != "/v1/chat/completions":
            return await self.inner.complete(url, body, num_ctx=num_ctx, stream=stream)
        self.gaps[id(body)] = []  # a retried attempt starts over
        return await complete_by_streaming(self, body, num_ctx=num_ctx)

    async def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        gaps = self.gaps.setdefault(id(body), [])
        last: float | None = None
        async for chunk in self.inner.stream_chat(body, num_ctx=num_ctx):
            if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
                now = time.perf_counter()
                if last is not None:
                    gaps.append((now - last) * 1000)
                last = now
            yield chunk


@dataclass
class MeasuredPoint:
    key: PointKey
    samples: list[Sample]
    wall_seconds: float
    load_seconds: float
    metrics: dict[str, Any]
    achieved_rate: float | None = None  # requests sent per second, for a rate point


def _sample(outcome: Outcome, request: BenchRequest, gaps: list[float]) -> Sample:
    result, error = outcome.result, outcome.error
    if result is None:
        return Sample(ok=False, latency_ms=outcome.latency_ms, prompt_estimate=request.prompt_estimate,
                      max_tokens=request.max_tokens, error_code=error.code if error else "error")
    usage = result.body.get("usage") or {}
    t = result.timings
    choices = result.body.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content") if choices else None
    return Sample(ok=True, prompt_tokens=usage.get("prompt_tokens", t.prompt_tokens),
                  completion_tokens=usage.get("completion_tokens", t.completion_tokens),
                  engine_prompt_tokens=t.prompt_tokens, prompt_ms=t.prompt_ms, decode_ms=t.decode_ms,
                  load_ms=t.load_ms, ttft_ms=t.ttft_ms, itl_ms=gaps, content=content, latency_ms=outcome.latency_ms,
                  prompt_estimate=request.prompt_estimate, max_tokens=request.max_tokens)


async def _run(backend: ChunkClock, requests: Sequence[BenchRequest], key: PointKey, policy: RetryPolicy,
               on_done: Callable[[], None] | None) -> tuple[list[Sample], float]:
    """Run requests at the point's concurrency; (samples in request order, wall seconds)."""
    jobs = [Job(i, f"bench-{i}", r.url, r.body, num_ctx=key.num_ctx, prompt_estimate=r.prompt_estimate)
            for i, r in enumerate(requests)]
    samples: list[Sample | None] = [None] * len(jobs)
    last = started = time.perf_counter()

    async def feed() -> AsyncIterator[Job]:
        for job in jobs:
            yield job

    async def sink(outcome: Outcome) -> None:
        nonlocal last
        last = time.perf_counter()
        index = outcome.job.line
        samples[index] = _sample(outcome, requests[index], backend.gaps.pop(id(outcome.job.body), []))
        if on_done is not None:
            on_done()

    await run_jobs(feed(), fixed(backend, key.concurrency), sink, policy=policy, stream=True)
    return [s for s in samples if s is not None], last - started


async def _run_open(backend: ChunkClock, requests: Sequence[BenchRequest], key: PointKey, policy: RetryPolicy,
                    on_done: Callable[[], None] | None, *, seed: int) -> tuple[list[Sample], float, list[float]]:
    """Send each request when its arrival is due (``obatch.bench.load``), however many are still unanswered (up
    to the point's cap, when it has one); (samples in request order, wall seconds, when each request was sent)."""
    assert key.rate is not None
    due = arrival_offsets(key.arrival or "poisson", key.rate, len(requests), seed=seed)
    pool = fixed(backend, key.concurrency or max(len(requests), 1))
    samples: list[Sample | None] = [None] * len(requests)
    sent: list[float] = []
    last = started = time.perf_counter()

    async def one(index: int, job: Job) -> None:
        nonlocal last
        lease = await pool.lease(None)  # at once without a cap; with one, in arrival order as slots free up
        sent.append(begun := time.perf_counter())
        result, error, attempts = await call_with_retries(pool, job, policy, stream=True, first=lease)
        last = time.perf_counter()
        outcome = Outcome(job, result, error, (last - begun) * 1000, attempts, time.time())
        samples[index] = _sample(outcome, requests[index], backend.gaps.pop(id(job.body), []))
        if on_done is not None:
            on_done()

    async with asyncio.TaskGroup() as group:
        for i, (request, offset) in enumerate(zip(requests, due, strict=True)):
            wait = started + offset - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            job = Job(i, f"bench-{i}", request.url, request.body, num_ctx=key.num_ctx,
                      prompt_estimate=request.prompt_estimate)
            group.create_task(one(i, job))
    return [s for s in samples if s is not None], last - started, sent


async def measure_point(backend: Backend, key: PointKey, requests: Sequence[BenchRequest], *, warmup: int,
                        policy: RetryPolicy, max_failure_rate: float,
                        on_done: Callable[[], None] | None = None, seed: int = 0) -> MeasuredPoint:
    """(Re)load the engine for the point, warm it up (``warmup`` extra requests, not measured, one at a time for
    a rate point), measure. ``seed`` draws a rate point's Poisson arrivals."""
    clock = ChunkClock(backend)
    slots = key.concurrency if key.rate is None else key.concurrency or None  # uncapped: the engine's own width
    load_seconds = await backend.prepare(key.model, num_ctx=key.num_ctx, parallel=slots)
    warm, measured = requests[:warmup], requests[warmup:]
    if warm:
        warm_key = key if key.rate is None else PointKey(key.model, key.num_ctx, 1)
        warm_samples, _ = await _run(clock, warm, warm_key, policy, None)
        reported = max((s.load_ms or 0.0 for s in warm_samples), default=0.0) / 1000
        load_seconds = max(load_seconds, reported)  # Ollama loads on the first request and reports it there
    if key.rate is None:
        samples, wall = await _run(clock, measured, key, policy, on_done)
        return MeasuredPoint(key, samples, wall, load_seconds, summarise(samples, wall,
                                                                         max_failure_rate=max_failure_rate))
    samples, wall, sent = await _run_open(clock, measured, key, policy, on_done, seed=seed)
    metrics = summarise(samples, wall, max_failure_rate=max_failure_rate)
    return MeasuredPoint(key, samples, wall, load_seconds, metrics, achieved_rate=achieved_rate(sent))


def point_row(run: BenchRunRow, point: MeasuredPoint, env: dict[str, Any]) -> BenchPointRow:
    metrics = dict(point.metrics)
    errors_seen = metrics.pop("errors")
    model_facts = (env.get("models") or {}).get(point.key.model) or {}
    responses = [s.content[:SAMPLE_CHARS] for s in point.samples if s.ok and s.content][:SAMPLE_RESPONSES]
    return BenchPointRow(
        run_id=run.id, backend=run.backend, model=point.key.model, num_ctx=point.key.num_ctx,
        concurrency=point.key.concurrency, repeat=point.key.repeat, rate=point.key.rate, arrival=point.key.arrival,
        achieved_rate=point.achieved_rate, workload=run.workload, created_at=time.time(),
        engine_version=env.get("engine_version"), quantization=model_facts.get("quantization"),
        parameter_size=model_facts.get("parameter_size"), load_seconds=point.load_seconds,
        errors_json=orjson.dumps(errors_seen).decode() if errors_seen else None,
        samples_json=orjson.dumps(responses).decode(), **metrics,
    )


def sample_rows(point: MeasuredPoint) -> list[dict[str, Any]]:
    return [{"idx": i, "ok": s.ok, "prompt_estimate": s.prompt_estimate, "max_tokens": s.max_tokens,
             "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens, "prompt_ms": s.prompt_ms,
             "decode_ms": s.decode_ms, "latency_ms": s.latency_ms, "ttft_ms": s.ttft_ms, "error_code": s.error_code}
            for i, s in enumerate(point.samples)]


@contextlib.asynccontextmanager
async def open_bench_backend(spec: SweepSpec, settings: Settings) -> AsyncIterator[Backend]:
    """The backend a sweep measures: the settings' one (``spec.backend``/``spec.url`` override them), or for
    ``"sim"`` an in-process Ollama simulator serving the sweep's models with a plausible latency model."""
    if spec.backend == "sim":
        from obatch.backends.ollama import OllamaBackend
        from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel

        config = SimConfig(models=tuple(SimModel(m) for m in spec.models), num_parallel=4, load_seconds=0.05,
                           prompt_tps=4000.0, decode_tps=400.0, default_output_tokens=4096, seed=spec.seed)
        async with OllamaSim(config) as sim:
            backend: Backend = OllamaBackend(sim.url)
            try:
                yield backend
            finally:
                await backend.aclose()
        return
    from obatch.backends import open_backend

    chosen = settings.model_copy(update={"backend": spec.backend}) if spec.backend else settings
    backend = await open_backend(chosen.with_urls([spec.url] if spec.url else []))
    try:
        yield backend
    finally:
        await backend.aclose()


async def start_run(sessions: Sessions, spec: SweepSpec, backend: Backend, *, fresh: bool,
                     params: dict[str, Any] | None, notebook: str | None) -> tuple[BenchRunRow, dict[str, Any]]:
    label = "sim" if spec.backend == "sim" else backend.name  # simulated figures never feed a real estimate
    signature = spec.signature(label)
    async with sessions() as session:
        run = None if fresh else await bench_repo.find_unfinished_run(session, signature)
        if run is not None:
            return run, orjson.loads(run.environment_json or "{}")
        env = await environment(backend, spec.models)
        run = BenchRunRow(
            id=new_id("bench"), name=spec.name, created_at=time.time(), backend=label,
            url=spec.url, workload=spec.workload, workload_json=orjson.dumps(spec.resolved_workload().as_dict()
                                                                               ).decode(),
            models_json=orjson.dumps(spec.models).decode(), num_ctx_json=orjson.dumps(spec.num_ctx).decode(),
            concurrency_json=orjson.dumps(spec.concurrency).decode(), requests=spec.requests,
            rates_json=orjson.dumps({"rates": spec.rates, "arrival": spec.arrival,
                                     "max_concurrency": spec.max_concurrency}).decode() if spec.rates else None,
            repeats=spec.repeats, warmup=spec.warmup, seed=spec.seed, max_failure_rate=spec.max_failure_rate,
            signature=signature, params_json=orjson.dumps(params, default=str).decode() if params else None,
            environment_json=orjson.dumps(env).decode(), notebook_path=notebook, obatch_version=obatch_version(),
        )
        bench_repo.add(session, run)
        await session.commit()
    return run, env


async def sweep_with(sessions: Sessions, backend: Backend, spec: SweepSpec, *, settings: Settings,
                     progress: bool = True, fresh: bool = False, params: dict[str, Any] | None = None,
                     notebook: str | None = None) -> SweepReport:
    """Run (or resume) a sweep on an open store and backend; each point is stored as soon as it is measured."""
    started = time.monotonic()
    run, env = await start_run(sessions, spec, backend, fresh=fresh, params=params, notebook=notebook)
    async with sessions() as session:
        done = await bench_repo.done_points(session, run.id)
    points = spec.points()
    report = SweepReport(run.id, skipped=[p for p in points if p.config in done])
    todo = [p for p in points if p.config not in done]
    policy = RetryPolicy.from_settings(settings, max_attempts=3)
    workload = spec.resolved_workload()
    bar = progress_bar(len(todo) * spec.requests, run.id[:14], enabled=progress)
    try:
        for key in todo:
            bar.set_description(f"{key.model} ctx={key.num_ctx} {key.load} r={key.repeat}")
            requests = workload.requests(key.model, spec.requests + spec.warmup, seed=spec.seed + key.repeat)
            measured = await measure_point(backend, key, requests, warmup=spec.warmup, policy=policy,
                                           max_failure_rate=spec.max_failure_rate,
                                           on_done=bar.update, seed=spec.seed + key.repeat)
            async with sessions() as session:
                await bench_repo.add_point(session, point_row(run, measured, env), sample_rows(measured))
                await session.commit()
            report.measured.append(key)
    finally:
        bar.close()
    async with sessions() as session:
        row = await bench_repo.get_run(session, run.id)
        row.status, row.finished_at = "completed", time.time()
        await session.commit()
    report.seconds = time.monotonic() - started
    return report


async def run_sweep(spec: SweepSpec, *, settings: Settings | None = None, progress: bool = True,
                    fresh: bool = False, params: dict[str, Any] | None = None, notebook: str | None = None
                    ) -> SweepReport:
    """Open the store and the backend, run (or resume) the sweep, close both. The notebook and CLI door."""
    settings = settings or Settings()
    engine, sessions = await open_store(settings.db_url)
    try:
        async with open_bench_backend(spec, settings) as backend:
            return await sweep_with(sessions, backend, spec, settings=settings, progress=progress, fresh=fresh,
                                    params=params, notebook=notebook)
    finally:
        await engine.dispose()
