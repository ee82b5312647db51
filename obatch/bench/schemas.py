"""The benchmark API's wire contract: one pydantic model per answer of ``/v1/benchmarks/*``.

The server builds its answers from these (``obatch.bench.service``), ``obatch.client`` parses them back into the
same classes and the UI renders those, so a field renamed on one side breaks a test instead of a chart. Only
pydantic here: no web or UI framework. Field names are the store's column names (``req_per_s``, ``output_tps``,
``latency_p50`` in milliseconds); every throughput counts completed requests only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from obatch.bench.load import MAX_RATE, Arrival

SweepStatus = Literal["queued", "in_progress", "cancelling", "cancelled", "completed", "failed"]
SWEEP_ACTIVE: frozenset[str] = frozenset({"queued", "in_progress", "cancelling"})

MAX_SWEEP_POINTS = 256  # models × num_ctx × load levels (concurrency levels and rates) × repeats of one sweep
MAX_SWEEP_REQUESTS = 4096  # measured requests per point
MAX_NUM_CTX = 1 << 20
MAX_LEVEL = 1024  # concurrency


class _Wire(BaseModel):
    """Answers ignore fields they do not know (a newer server may add some); requests refuse them."""

    model_config = ConfigDict(extra="ignore")


class BenchPoint(_Wire):
    """One measured point: one repeat of one configuration (backend, model, num_ctx, load) in one run. The load is
    ``concurrency`` requests in flight, or, with a ``rate``, requests sent at that rate (open loop) with
    ``concurrency`` as their cap in flight (0: none)."""

    object: Literal["benchmark.point"] = "benchmark.point"
    id: int | None = None
    run_id: str
    backend: str
    model: str
    num_ctx: int
    concurrency: int
    repeat: int = 0
    rate: float | None = None  # offered requests per second; None: a closed-loop concurrency point
    arrival: str | None = None  # constant | poisson
    achieved_rate: float | None = None  # requests really sent per second
    workload: str = ""
    created_at: float
    engine_version: str | None = None
    quantization: str | None = None
    parameter_size: str | None = None
    n_requests: int
    n_completed: int
    n_failed: int
    success_rate: float
    excluded: bool = False
    wall_seconds: float
    load_seconds: float | None = None
    req_per_s: float
    output_tps: float
    prompt_tps: float | None = None
    gen_tps: float | None = None
    prompt_tokens_mean: float | None = None
    completion_tokens_mean: float | None = None
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
    errors: dict[str, int] = Field(default_factory=dict)
    sample_responses: list[str] = Field(default_factory=list)
    goodput: float | None = None  # req/s that met the SLO asked for (``?slo=``); None without one
    slo_share: float | None = None  # the share of the point's requests that met it


class BenchConfig(_Wire):
    """One configuration of a model, its repeats folded: means over the repeats that count (not ``excluded``)."""

    object: Literal["benchmark.config"] = "benchmark.config"
    run_id: str
    backend: str
    model: str
    num_ctx: int
    concurrency: int
    rate: float | None = None  # as ``BenchPoint``: a rate configuration is never the best one
    arrival: str | None = None
    achieved_rate: float | None = None
    repeats: int
    excluded: int = 0  # repeats left out for failing too much
    n_completed: int
    n_failed: int
    success_rate: float
    req_per_s: float
    req_per_s_std: float | None = None
    output_tps: float
    output_tps_std: float | None = None
    gen_tps: float | None = None
    prompt_tps: float | None = None
    latency_mean: float | None = None
    latency_p50: float | None = None
    latency_p90: float | None = None
    latency_p99: float | None = None
    ttft_p50: float | None = None
    ttft_p90: float | None = None
    tpot_p50: float | None = None
    itl_p50: float | None = None
    load_seconds: float | None = None
    created_at: float
    best: bool = False  # the model's best configuration among the rows of this answer (``obatch.bench.best``)


class BenchRun(_Wire):
    """A sweep run: its parameters and (for admin keys) the machine it ran on."""

    object: Literal["benchmark.run"] = "benchmark.run"
    id: str
    name: str = ""
    status: str
    created_at: float
    finished_at: float | None = None
    backend: str
    workload: str
    models: str
    num_ctx: str
    concurrency: str
    rates: str | None = None  # the request rates measured, their arrival kind and cap
    requests: int
    repeats: int
    hostname: str | None = None
    cpu: str | None = None
    engine_version: str | None = None
    obatch_version: str | None = None
    notebook_path: str | None = None


class EstimateRecord(_Wire):
    """A finished batch's estimate (made before it ran) against its actual duration."""

    object: Literal["benchmark.estimate_record"] = "benchmark.estimate_record"
    batch_id: str
    source: str | None = None
    backend: str | None = None
    models: str = ""
    requests: int
    completed: int | None = None
    concurrency: int | None = None
    created_at: int | None = None
    estimated_seconds: float
    low: float | None = None
    high: float | None = None
    actual_seconds: float
    error_pct: float | None = None
    within_interval: bool
    actual_req_per_s: float | None = None


class Capacity(_Wire):
    """The highest load of a model at one num_ctx at which at least ``min_share`` of the requests met the SLO
    (``obatch.bench.slo``), judged on the newest measurement of each level: the highest concurrency (``load`` is
    ``"concurrency"``), or, over request-rate points, the highest offered rate (``load`` is ``"rate"``)."""

    object: Literal["benchmark.capacity"] = "benchmark.capacity"
    backend: str
    model: str
    num_ctx: int
    slo: dict[str, float]  # bounds in milliseconds: ttft, tpot, latency
    min_share: float
    load: Literal["concurrency", "rate"] = "concurrency"
    concurrency: int | None = None  # the capacity in concurrency; None: no measured level met the SLO
    rate: float | None = None  # the capacity in offered req/s (``load`` "rate"); None: no rate met it
    arrival: str | None = None
    goodput: float | None = None
    req_per_s: float | None = None
    levels: list[dict[str, Any]] = Field(default_factory=list)  # every level: its load, goodput, share met

    @property
    def met(self) -> bool:
        """Whether some measured level met the SLO."""
        return (self.rate if self.load == "rate" else self.concurrency) is not None


class SweepParams(BaseModel):
    """What ``POST /v1/benchmarks/sweeps`` takes (as ``obatch bench``: models × num_ctx × load levels × repeats).
    The load levels are ``concurrency`` levels and request ``rates`` (open loop, ``arrival`` gaps, at most
    ``max_concurrency`` in flight, 0 for no cap); given rates without concurrency, only the rates are measured."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, max_length=16)
    num_ctx: list[int] = Field(default_factory=lambda: [2048], min_length=1, max_length=16)
    concurrency: list[int] = Field(default_factory=lambda: [1, 2, 4], max_length=16)
    rates: list[float] = Field(default_factory=list, max_length=16)
    arrival: Arrival = "poisson"
    max_concurrency: int = Field(default=0, ge=0, le=MAX_LEVEL)
    requests: int = Field(default=16, ge=1, le=MAX_SWEEP_REQUESTS)
    workload: Literal["tiny", "short", "chat", "long-prompt", "long-output"] = "chat"
    repeats: int = Field(default=1, ge=1, le=10)
    name: str = Field(default="", max_length=128)

    @model_validator(mode="before")
    @classmethod
    def _rates_alone(cls, data: Any) -> Any:
        """Rates without concurrency levels measure the rates only (not the default levels as well)."""
        if isinstance(data, dict) and data.get("rates") and "concurrency" not in data:
            return {**data, "concurrency": []}
        return data

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        names = [m.strip() for m in value]
        if any(not m or len(m) > 256 or any(ord(ch) < 32 for ch in m) for m in names):
            raise ValueError("each model is a name of 1 to 256 characters without control characters")
        return list(dict.fromkeys(names))

    @field_validator("num_ctx")
    @classmethod
    def _num_ctx(cls, value: list[int]) -> list[int]:
        if any(not 1 <= n <= MAX_NUM_CTX for n in value):
            raise ValueError(f"each num_ctx is between 1 and {MAX_NUM_CTX}")
        return sorted(set(value))

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, value: list[int]) -> list[int]:
        if any(not 1 <= c <= MAX_LEVEL for c in value):
            raise ValueError(f"each concurrency level is between 1 and {MAX_LEVEL}")
        return sorted(set(value))

    @field_validator("rates")
    @classmethod
    def _rates(cls, value: list[float]) -> list[float]:
        if any(not 0 < r <= MAX_RATE for r in value):
            raise ValueError(f"each request rate is above 0 and at most {MAX_RATE:g} per second")
        return sorted(set(value))

    @property
    def points(self) -> int:
        return len(self.models) * len(self.num_ctx) * (len(self.concurrency) + len(self.rates)) * self.repeats

    def problem(self) -> tuple[str, str] | None:
        """(message, param) of what makes the sweep unrunnable beyond each field's own bounds, or None."""
        if not self.concurrency and not self.rates:
            return "A sweep needs at least one concurrency level or request rate.", "concurrency"
        if self.points > MAX_SWEEP_POINTS:
            return (f"This sweep has {self.points} points; at most {MAX_SWEEP_POINTS} may run in one sweep.",
                    "concurrency")
        return None


class Sweep(_Wire):
    """A sweep the server runs: its parameters, where it stands, and the benchmark run its points belong to."""

    object: Literal["benchmark.sweep"] = "benchmark.sweep"
    id: str
    status: SweepStatus
    params: SweepParams
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    points_done: int = 0
    points_total: int
    current: str | None = None  # the point being measured, or why the sweep waits
    run_id: str | None = None
    backend: str | None = None
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.status in SWEEP_ACTIVE
