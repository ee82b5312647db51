"""Sweeps started from the UI: the server runs them (``POST /v1/benchmarks/sweeps``) on its own backend and stores
their points in its store; the page only sends the form and shows the sweep's points done of total."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from obatch.bench.schemas import EstimateRecord, Sweep, SweepParams
from obatch.client import Client, ClientError

WORKLOADS = ("tiny", "short", "chat", "long-prompt", "long-output")
NUM_CTX_CHOICES = (1024, 2048, 4096, 8192, 16384, 32768)
CONCURRENCY_CHOICES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class SweepPlan:
    """What the form asks for."""

    models: tuple[str, ...]
    num_ctx: tuple[int, ...]
    concurrency: tuple[int, ...]
    requests: int = 8
    workload: str = "short"
    repeats: int = 1
    name: str = "ui"
    rates: str = ""  # request rates as typed, e.g. "2, 4, 8" (requests per second, open loop)
    arrival: str = "poisson"

    @property
    def points(self) -> int:
        levels = len(set(self.concurrency)) + len(set(self.rate_values()))
        return len(set(self.models)) * len(set(self.num_ctx)) * levels * self.repeats

    def rate_values(self) -> list[float]:
        """The typed rates as numbers (ValueError names the one that is not a number)."""
        values = []
        for part in (p.strip() for p in self.rates.replace(";", ",").split(",")):
            if part:
                try:
                    values.append(float(part.removesuffix("/s")))
                except ValueError:
                    raise ValueError(f"{part!r} is not a request rate (requests per second, e.g. 2,4,8)") from None
        return values

    def problem(self) -> str | None:
        """Why the sweep cannot start, or None (the server checks again, with the same model)."""
        if not self.models:
            return "Pick at least one model."
        try:
            rates = self.rate_values()
        except ValueError as exc:
            return str(exc)
        if not self.num_ctx or not (self.concurrency or rates):
            return "Pick at least one context window and one concurrency level or request rate."
        if self.requests < 1:
            return "Measure at least one request per point."
        try:
            params = self.params()
        except ValidationError as exc:
            return "; ".join(str(e["msg"]) for e in exc.errors())
        found = params.problem()
        return found[0] if found else None

    def params(self) -> SweepParams:
        return SweepParams(models=list(self.models), num_ctx=list(self.num_ctx), concurrency=list(self.concurrency),
                           rates=self.rate_values(), arrival=self.arrival,
                           requests=self.requests, workload=self.workload, repeats=self.repeats, name=self.name)


def start(api: Client, plan: SweepPlan) -> Sweep:
    return api.start_sweep(plan.params())


def progress_text(sweep: Sweep) -> str:
    """``sweep-…: 3 of 8 point(s) measured · in progress · qwen · num_ctx 2048 · concurrency 4``."""
    state = sweep.status.replace("_", " ")
    where = f" · {sweep.current}" if sweep.current and sweep.active else ""
    return f"{sweep.points_done} of {sweep.points_total} point(s) measured · {state}{where}"


def estimate_records(api: Client) -> list[EstimateRecord]:
    """Finished batches' estimate vs actual, from the server (empty when it keeps none)."""
    try:
        return api.estimate_history()
    except ClientError:
        return []
