"""Duration estimates: the sentence before a run, and past batches' estimated vs actual durations."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import altair as alt
import polars as pl

from obatch.bench.schemas import EstimateRecord
from obatch.protocol import DeadlinePlan, DurationEstimate


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


PILOT = "auto"  # the pilot the Batches page offers when nothing is known about a model's answer lengths


def estimate_seconds(estimate: DurationEstimate | None) -> tuple[float | None, float | None, float | None]:
    """(expected, low, high) seconds of an estimate answer (all None without one)."""
    return (estimate.seconds, estimate.low, estimate.high) if estimate is not None else (None, None, None)


def estimate_config(estimate: DurationEstimate | None) -> str | None:
    """``num_ctx 4096 · concurrency 4``: the configuration an estimate assumes (None when it does not say)."""
    if estimate is None or estimate.num_ctx is None or estimate.concurrency is None:
        return None
    return f"num_ctx {estimate.num_ctx} · concurrency {estimate.concurrency}"


def describe_estimate(estimate: DurationEstimate | None) -> str | None:
    """One sentence: ``about 2 min 10 s (1 min 50 s – 2 min 40 s)``, or None without an estimate."""
    if estimate is None:
        return None
    return f"about {format_seconds(estimate.seconds)} ({format_seconds(estimate.low)} – " \
           f"{format_seconds(estimate.high)})"


def offers_pilot(estimate: DurationEstimate | None) -> bool:
    """Whether the answer lengths behind a file's estimate are unknown, so a pilot would tell them."""
    if estimate is None or estimate.pilot is not None:
        return False
    return any(part.answers is not None and not part.answers.known for part in estimate.groups or [estimate])


def is_guess(estimate: DurationEstimate | None) -> bool:
    """Whether the server calls the estimate's duration a guess (answer lengths unknown, no pilot measured them,
    the interval what the model could answer): the page then says so first and offers the pilot before the
    figure."""
    return estimate is not None and estimate.pilot is None and estimate.guess


def format_window(seconds: float) -> str:
    """A completion window in its own unit: 86400 → ``24 h``, 600 → ``10 min``, 90 → ``1 min 30 s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0 and (unit != "d" or seconds > 86400):
            return f"{seconds // size:.0f} {unit}"
    return format_seconds(seconds)


@dataclass
class DeadlineView:
    """What the page says of a plan (``DeadlinePlan``): ``level`` "miss" (a warning), "risk" (the upper bound is
    past the window) or "meets"; the sentence; and the configurations that would meet a missed window."""

    level: str
    sentence: str
    meets: list[str]


def deadline_view(plan: DeadlinePlan | None, *, made: bool = False) -> DeadlineView | None:
    """The estimate against the chosen completion window in the page's words (None: nothing to compare); ``made``:
    the plan a batch made at its creation (``obatch.deadline``), told as such."""
    if plan is None or plan.seconds is None or plan.low is None or plan.high is None:
        return None
    window = format_window(plan.window_seconds)
    interval = f"{format_seconds(plan.seconds)} ({format_seconds(plan.low)} – {format_seconds(plan.high)})"
    options = [f"num_ctx {o.num_ctx} · concurrency {o.concurrency}"
               f"{f' · on {o.hosts} hosts like this one' if o.hosts > 1 else ''}: about {format_seconds(o.seconds)}"
               for o in plan.meets]
    if plan.expected_miss:
        sentence = (f"{'At its creation this batch was expected' if made else 'Expected'} to miss the {window} "
                    f"completion window by {format_seconds(plan.miss_seconds)}: "
                    f"estimated {interval}"
                    + ("; even the lower bound is past it" if plan.certain_miss else "")
                    + ". The lines still running when the window ends expire.")
        return DeadlineView("miss", sentence, options)
    if plan.high > plan.window_seconds:
        return DeadlineView("risk", f"Expected to finish within the {window} completion window, though the "
                                    f"estimate's upper bound is past it by "
                                    f"{format_seconds(plan.high - plan.window_seconds)}.", [])
    return DeadlineView("meets", f"Expected to finish well within the {window} completion window.", [])


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


def estimate_record_frame(records: Iterable[EstimateRecord]) -> pl.DataFrame:
    """Past batches' estimated vs actual durations (``GET /v1/benchmarks/estimates``, as the client parses it)."""
    return pl.DataFrame([{name: getattr(r, name) for name in ESTIMATE_RECORD_SCHEMA} for r in records],
                        schema=ESTIMATE_RECORD_SCHEMA)


def estimate_record_chart(frame: pl.DataFrame) -> alt.TopLevelMixin:
    """The report notebook's estimate-vs-actual chart (``obatch.bench.charts``), on the API's records."""
    from obatch.bench.charts import estimate_vs_actual

    return estimate_vs_actual(frame)
