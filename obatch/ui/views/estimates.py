"""Duration estimates: the sentence before a run, and past batches' estimated vs actual durations."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import altair as alt
import polars as pl

from obatch.protocol import DurationEstimate
from obatch.ui.views._values import flatten, integer, number


def format_seconds(seconds: float | None) -> str:
    """``93`` → ``1 min 33 s``; None → ``—``."""
    if seconds is None or math.isnan(seconds):
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "< 1 s" if seconds < 0.1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


_EXPECTED = ("expected_seconds", "seconds", "duration_s", "expected_s", "estimate_seconds", "eta_seconds")
_LOW = ("low_seconds", "lower_seconds", "min_seconds", "low_s", "low")
_HIGH = ("high_seconds", "upper_seconds", "max_seconds", "high_s", "high")


PILOT_LINES = 16  # the pilot the Batches page offers when nothing is known about a model's answer lengths

EstimateLike = DurationEstimate | Mapping[str, Any] | None


def estimate_seconds(estimate: EstimateLike) -> tuple[float | None, float | None, float | None]:
    """(expected, low, high) seconds of an estimate answer, whichever spelling it uses."""
    if isinstance(estimate, DurationEstimate):
        return estimate.seconds, estimate.low, estimate.high
    if not estimate:
        return None, None, None
    flat = flatten(estimate)
    interval = estimate.get("interval") or estimate.get("interval_seconds")

    def pick(names: Sequence[str]) -> float | None:
        return next((n for n in (number(flat.get(k)) for k in names) if n is not None), None)

    low, high = pick(_LOW), pick(_HIGH)
    if isinstance(interval, Sequence) and not isinstance(interval, str) and len(interval) == 2:
        low, high = number(interval[0]), number(interval[1])
    return pick(_EXPECTED), low, high


def estimate_config(estimate: EstimateLike) -> str | None:
    """``num_ctx 4096 · concurrency 4``: the configuration an estimate assumes (None when it does not say)."""
    if isinstance(estimate, DurationEstimate):
        estimate = estimate.model_dump()
    if not estimate or estimate.get("num_ctx") is None or estimate.get("concurrency") is None:
        return None
    return f"num_ctx {estimate['num_ctx']} · concurrency {estimate['concurrency']}"


def describe_estimate(estimate: EstimateLike) -> str | None:
    """One sentence: ``about 2 min 10 s (1 min 50 s – 2 min 40 s)``, or None without an expected duration."""
    expected, low, high = estimate_seconds(estimate)
    if expected is None:
        return None
    interval = f" ({format_seconds(low)} – {format_seconds(high)})" if low is not None and high is not None else ""
    return f"about {format_seconds(expected)}{interval}"


def offers_pilot(estimate: DurationEstimate | None) -> bool:
    """Whether the answer lengths behind a file's estimate are unknown, so a pilot would tell them."""
    if estimate is None or estimate.pilot is not None:
        return False
    return any(part.answers is not None and not part.answers.known for part in estimate.groups or [estimate])


def estimate_notes(estimate: DurationEstimate | None) -> list[str]:
    """How an estimate was made, in sentences (its notes, the pilot it ran, what the points measured)."""
    if estimate is None:
        return []
    out = []
    for part in estimate.groups or [estimate]:
        prefix = f"{part.model}: " if estimate.groups else ""
        if part.measured_req_per_s:
            out.append(f"{prefix}the benchmark points it rests on measured {part.measured_req_per_s:.2f} req/s "
                       "on their own workload")
        out += [prefix + note for note in part.notes]
    if estimate.pilot is not None:
        p = estimate.pilot
        out.append(f"pilot: {p.requests} lines of this file ({p.ran} run now, {p.reused} earlier, {p.failed} failed); "
                   "the batch takes them as finished")
    return out


ESTIMATE_RECORD_SCHEMA: dict[str, Any] = {
    "batch_id": pl.Utf8, "models": pl.Utf8, "requests": pl.Int64, "concurrency": pl.Int64,
    "estimated_seconds": pl.Float64, "low": pl.Float64, "high": pl.Float64, "actual_seconds": pl.Float64,
    "error_pct": pl.Float64, "within_interval": pl.Boolean,
}


def estimate_record_frame(records: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Past batches' estimated vs actual durations (the bench store's ``estimates`` view, as the API sends it)."""
    rows = []
    for record in records:
        flat = flatten(record)
        expected, low, high = estimate_seconds({**flat, "seconds": flat.get("estimated_seconds",
                                                                          flat.get("seconds"))})
        actual = next((v for v in (number(flat.get(k)) for k in ("actual_seconds", "actual_s", "actual"))
                       if v is not None), None)
        error = number(flat.get("error_pct"))
        if error is None and actual and expected:
            error = 100.0 * (expected - actual) / actual
        within = flat.get("within_interval")
        if within is None and None not in (actual, low, high):
            within = low <= actual <= high  # type: ignore[operator]
        models = flat.get("models") or flat.get("model")
        rows.append({"batch_id": flat.get("batch_id") or flat.get("id"),
                     "models": ",".join(models) if isinstance(models, list) else models,
                     "requests": integer(flat.get("requests") or flat.get("num_requests")),
                     "concurrency": integer(flat.get("concurrency")), "estimated_seconds": expected, "low": low,
                     "high": high, "actual_seconds": actual, "error_pct": error,
                     "within_interval": None if within is None else bool(within)})
    return pl.DataFrame(rows, schema=ESTIMATE_RECORD_SCHEMA)


def estimate_record_chart(frame: pl.DataFrame) -> alt.TopLevelMixin:
    """The report notebook's estimate-vs-actual chart (``obatch.bench.charts``), on the API's records."""
    from obatch.bench.charts import estimate_vs_actual

    return estimate_vs_actual(frame)
