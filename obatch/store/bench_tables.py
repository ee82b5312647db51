"""SQLModel tables of the benchmark system: one row per sweep run, per measured point, per measured request.

A *point* is one repeat of one configuration (backend, model, num_ctx, concurrency, workload) inside a run; its
aggregate metrics are columns (so views and the REST API read them without recomputing), and its requests are kept
as ``BenchSampleRow`` rows: the estimator fits its per-token model on them. A point's load is either closed-loop
(``concurrency`` requests in flight, ``rate`` NULL) or open-loop (requests sent at ``rate`` per second with
``arrival`` gaps, whatever the engine answers; ``concurrency`` is then its cap on requests in flight, 0 for none).
``(run_id, model, num_ctx, concurrency, repeat)`` is unique among closed-loop points and, with ``rate`` and
``arrival``, among open-loop ones (two partial indexes: NULL never equals NULL in a unique key), which is what makes
an interrupted sweep resumable.
"""

from __future__ import annotations

from sqlalchemy import Index, text
from sqlmodel import Field, SQLModel


class BenchRunRow(SQLModel, table=True):
    __tablename__ = "bench_runs"

    id: str = Field(primary_key=True)
    name: str = ""
    status: str = Field(default="running", index=True)  # running | completed
    created_at: float
    finished_at: float | None = None
    backend: str
    url: str | None = None
    workload: str  # a built-in name, a file path or an inline spec
    workload_json: str  # the resolved workload (lengths, seed) as JSON
    models_json: str
    num_ctx_json: str
    concurrency_json: str
    rates_json: str | None = None  # request rates of an open-loop sweep, with its arrival kind and cap
    requests: int
    repeats: int = 1
    warmup: int = 1
    seed: int = 0
    max_failure_rate: float = 0.05
    signature: str = Field(index=True)  # what a rerun with the same parameters matches to resume
    params_json: str | None = None  # notebook / CLI parameters as given
    environment_json: str | None = None  # host, CPU, memory, GPU, engine and obatch versions
    notebook_path: str | None = None  # the executed notebook of an `obatch sweep` run
    obatch_version: str = ""


class BenchPointRow(SQLModel, table=True):
    __tablename__ = "bench_points"
    __table_args__ = (
        Index("uq_bench_points_config", "run_id", "model", "num_ctx", "concurrency", "repeat", unique=True,
              sqlite_where=text("rate IS NULL"), postgresql_where=text("rate IS NULL")),
        Index("uq_bench_points_rate", "run_id", "model", "num_ctx", "concurrency", "rate", "arrival", "repeat",
              unique=True, sqlite_where=text("rate IS NOT NULL"), postgresql_where=text("rate IS NOT NULL")),
        Index("ix_bench_points_model_config", "model", "num_ctx", "concurrency"),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="bench_runs.id", index=True)
    backend: str
    model: str
    num_ctx: int
    concurrency: int  # in flight (closed loop); for a rate point its cap, 0 for none
    repeat: int = 0
    rate: float | None = None  # requests sent per second (open loop); NULL: closed-loop concurrency
    arrival: str | None = None  # constant | poisson, for a rate point
    achieved_rate: float | None = None  # requests really sent per second (a cap or a busy client falls behind)
    workload: str
    created_at: float
    engine_version: str | None = None
    quantization: str | None = None
    parameter_size: str | None = None
    # volume
    n_requests: int
    n_completed: int
    n_failed: int
    success_rate: float
    excluded: bool = False  # failures above the run's threshold: kept, but never averaged in
    wall_seconds: float
    load_seconds: float = 0.0
    # throughput (completed requests only)
    req_per_s: float
    output_tps: float  # completion tokens of completed requests per wall-clock second (all streams together)
    prompt_tps: float | None = None  # per request, from the engine's own prompt timings
    gen_tps: float | None = None  # per request, from the engine's own decode timings
    prompt_tokens_mean: float | None = None
    completion_tokens_mean: float | None = None
    # latency (completed requests only), milliseconds
    latency_mean: float | None = None
    latency_p50: float | None = None
    latency_p90: float | None = None
    latency_p99: float | None = None
    ttft_mean: float | None = None
    ttft_p50: float | None = None
    ttft_p90: float | None = None
    ttft_p99: float | None = None
    tpot_mean: float | None = None
    tpot_p50: float | None = None
    tpot_p90: float | None = None
    tpot_p99: float | None = None
    itl_mean: float | None = None
    itl_p50: float | None = None
    itl_p90: float | None = None
    itl_p99: float | None = None
    errors_json: str | None = None  # {error code: count}
    samples_json: str | None = None  # a few responses, to see what was measured


class BenchSampleRow(SQLModel, table=True):
    __tablename__ = "bench_samples"

    point_id: int = Field(primary_key=True, foreign_key="bench_points.id")
    idx: int = Field(primary_key=True)
    ok: bool
    prompt_estimate: int = 0  # obatch's own estimate from the text (obatch.context), to calibrate it
    max_tokens: int | None = None
    prompt_tokens: int | None = None  # usage.prompt_tokens
    completion_tokens: int | None = None
    prompt_ms: float | None = None  # engine timings
    decode_ms: float | None = None
    latency_ms: float
    ttft_ms: float | None = None
    error_code: str | None = None


class BenchSweepRow(SQLModel, table=True):
    """A sweep the server runs (``POST /v1/benchmarks/sweeps``): kept until done, so a restarted server resumes it
    where its benchmark run (``run_id``) stands."""

    __tablename__ = "bench_sweeps"

    id: str = Field(primary_key=True)
    owner: str | None = Field(default=None, index=True)
    status: str = Field(index=True)  # queued | in_progress | cancelling | cancelled | completed | failed
    params_json: str  # obatch.bench.schemas.SweepParams
    requests: int = 0  # the engine requests it sends (points × requests): what counts against its key's daily budget
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    points_done: int = 0
    points_total: int
    current: str | None = None
    run_id: str | None = None
    backend: str | None = None
    error: str | None = None
