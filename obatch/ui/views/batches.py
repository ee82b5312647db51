"""The batch list, the progress panel (counts, throughput, ETA) and a failed batch's validation problems."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from obatch.protocol import FINAL_STATUSES, Batch, BatchExtension, DurationEstimate
from obatch.ui.views.estimates import format_seconds

BATCH_SCHEMA: dict[str, Any] = {
    "id": pl.Utf8, "status": pl.Utf8, "progress": pl.Float64, "total": pl.Int64, "completed": pl.Int64,
    "failed": pl.Int64, "not run": pl.Int64,
    "cached": pl.Int64, "retry of": pl.Utf8,  # lines answered by reuse; the batch whose failed lines it retries
    "model": pl.Utf8, "created": pl.Datetime("ms"), "endpoint": pl.Utf8,
    "output_file_id": pl.Utf8, "error_file_id": pl.Utf8, "input_file_id": pl.Utf8,
}
MODELS_KEY = "models"  # the metadata key the UI sets at submission: the file's models, for the batch list


def not_run(batch: Batch) -> int:
    """Lines of a cancelled or expired batch that never ran (the server's ``obatch.not_run``; OpenAI's
    ``request_counts.failed`` counts them as failed)."""
    value = batch.obatch.not_run if batch.obatch else None
    return value if value is not None and value > 0 else 0


def counts(batch: Batch) -> tuple[int, int, int, int]:
    """(total, succeeded, really failed, never run)."""
    c = batch.request_counts
    total, completed, failed = (c.total, c.completed, c.failed) if c else (0, 0, 0)
    skipped = min(not_run(batch), max(0, failed))
    return total, completed, failed - skipped, skipped


def model_of(batch: Batch) -> str:
    """The override, else the models the file names (recorded by the UI at submission), else "per line"."""
    return batch.model or (batch.metadata or {}).get(MODELS_KEY) or "per line"


def batches_frame(batches: Sequence[Batch]) -> pl.DataFrame:
    """The batch list table: one row per batch, newest first, with a 0..1 progress of the lines that ran."""
    rows = []
    for b in batches:
        total, completed, failed, skipped = counts(b)
        rows.append({"id": b.id, "status": b.status, "model": model_of(b), "endpoint": b.endpoint,
                     "created": b.created_at * 1000, "total": total, "completed": completed, "failed": failed,
                     "not run": skipped,
                     "progress": (completed + failed) / total if total else (1.0 if b.status == "completed" else 0.0),
                     "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
                     "input_file_id": b.input_file_id, "cached": b.obatch.cached if b.obatch else None,
                     "retry of": b.obatch.parent if b.obatch else None})
    return pl.DataFrame(rows, schema=BATCH_SCHEMA)


def is_final(batch: Batch) -> bool:
    return batch.status in FINAL_STATUSES


@dataclass
class BatchProgress:
    """What the progress panel shows. Rates count succeeded requests only; the ETA uses everything finished;
    lines a cancel or an expiry stopped (``not_run``) are neither failures nor progress. ``rates_at_least``: the
    batch ended within the second it started (the server's stamps are whole seconds), so the rates are over one
    second and the true ones are higher."""

    total: int
    completed: int
    failed: int
    elapsed_s: float | None
    requests_per_s: float | None
    tokens_per_s: float | None
    eta_s: float | None
    expected_s: float | None = None
    not_run: int = 0
    rates_at_least: bool = False
    waiting: bool = False  # the engine does not answer: the batch waits, its ETA is paused

    @property
    def eta_text(self) -> str:
        """The ETA metric: ``waiting`` while the engine is down (a rate over the outage would lie)."""
        return "waiting" if self.waiting else format_seconds(self.eta_s)

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    def sentence(self, status: str) -> str:
        """``2 of 3 requests run · 1 succeeded · 1 failed`` (and the lines a cancel or an expiry left unrun)."""
        text = f"{self.done} of {self.total} requests run · {self.completed} succeeded · {self.failed} failed"
        if self.not_run:
            why = {"expired": "expired"}.get(status, "cancelled")
            text += f" · {self.not_run} {why} (not run)"
        return text


def _end_of(batch: Batch) -> int | None:
    for stamp in (batch.completed_at, batch.failed_at, batch.cancelled_at, batch.expired_at, batch.finalizing_at):
        if stamp:
            return stamp
    return None


def batch_progress(batch: Batch, *, now: float | None = None, estimate: DurationEstimate | None = None,
                   engine_up: bool = True) -> BatchProgress:
    """Counts, throughput and ETA of a batch; before the first result the ETA falls back to the estimate. While
    the engine does not answer (``engine_up`` false, from ``/health``, or the batch's own ETA says it waits for one)
    a running batch has no ETA: it waits.

    Elapsed time is counted in the server's whole seconds (its timestamps have no fraction): a running batch's
    ``int(now)`` never passes the end stamp the server writes later, so the figure never goes backwards."""
    now = time.time() if now is None else now
    total, completed, failed, skipped = counts(batch)
    extension = batch.obatch or BatchExtension()
    estimate = estimate or extension.estimate
    expected = estimate.seconds if estimate is not None else None
    if not batch.in_progress_at:
        return BatchProgress(total, completed, failed, None, None, None, expected, expected, skipped)
    ended = _end_of(batch)
    elapsed = float(max(0, (ended or int(now)) - batch.in_progress_at))
    at_least = ended is not None and elapsed == 0
    span = 1.0 if at_least else elapsed
    rate = completed / span if span > 0 else None
    tokens = batch.usage.output_tokens if batch.usage else 0
    tps = tokens / span if span > 0 and tokens else None
    done = completed + failed
    eta: float | None
    live = extension.eta  # refined by the server from the lines finished, tokens-aware
    if is_final(batch) or batch.status in ("finalizing", "cancelling"):
        eta = 0.0
    elif live is not None and live.seconds_left is not None:
        eta = max(0.0, live.seconds_left - max(0.0, now - live.at))
    elif done and elapsed > 0:
        eta = (total - done) / (done / elapsed)
    elif expected is not None:
        eta = max(0.0, expected - elapsed)
    else:
        eta = None
    waiting = (not engine_up or (live is not None and live.waiting)) and eta != 0.0  # the server's pool knows too
    return BatchProgress(total, completed, failed, elapsed, rate, tps, None if waiting else eta, expected, skipped,
                         at_least, waiting)


def picked_row(ids: Sequence[str], selection: Any) -> str | None:
    """The batch id of the row a user clicked in the batch table (Streamlit's selection state), if any."""
    rows = ((selection or {}).get("selection") or {}).get("rows") or []
    return ids[rows[0]] if rows and 0 <= rows[0] < len(ids) else None


def batch_errors_frame(batch: Batch) -> pl.DataFrame:
    """A failed batch's validation problems (OpenAI ``errors.data``)."""
    items = batch.errors.data if batch.errors else []
    return pl.DataFrame([{"line": e.line, "code": e.code, "message": e.message} for e in items],
                        schema={"line": pl.Int64, "code": pl.Utf8, "message": pl.Utf8})


RUN_HOSTS_SCHEMA: dict[str, Any] = {"host": pl.Utf8, "state": pl.Utf8, "concurrency": pl.Int64, "mode": pl.Utf8,
                                    "why": pl.Utf8, "in flight": pl.Int64, "served": pl.Int64, "changes": pl.Int64}
LEVEL_HISTORY_SCHEMA: dict[str, Any] = {"host": pl.Utf8, "step": pl.Int64, "concurrency": pl.Int64, "why": pl.Utf8}


def _run_hosts(batch: Batch) -> list[dict[str, Any]]:
    story = batch.obatch.concurrency if batch.obatch else None
    return [h for h in (story or {}).get("hosts") or [] if isinstance(h, dict)]


def _requests(n: object) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"


def concurrency_text(batch: Batch) -> str | None:
    """How the batch runs, from its ``obatch.concurrency`` (what the batch process wrote last): ``at most 4
    requests in flight (auto: kept 4 …) on http://…``; with several hosts the sum and each host's level. None
    before it ran."""
    hosts = _run_hosts(batch)
    if not hosts:
        return None
    mode = (batch.obatch.concurrency or {}).get("mode") if batch.obatch else None
    if len(hosts) == 1:
        (h,) = hosts
        return f"at most {_requests(h.get('concurrency'))} in flight ({mode or 'fixed'}: {h.get('reason') or '—'}) " \
               f"on `{h.get('url')}`"
    total = sum(int(h.get("concurrency") or 0) for h in hosts if h.get("state") != "down")
    return f"at most {_requests(total)} in flight ({mode or 'fixed'}) over {len(hosts)} hosts: " + \
        "; ".join(f"`{h.get('url')}` {h.get('concurrency')} ({h.get('state')})" for h in hosts)


def run_hosts_frame(batch: Batch) -> pl.DataFrame:
    """The hosts the batch runs on: each one's level and why, its state, what it served, how often it changed."""
    return pl.DataFrame([{
        "host": h.get("url"), "state": h.get("state"), "concurrency": h.get("concurrency"),
        "mode": "auto" if h.get("auto") else "fixed", "why": h.get("reason") or "", "in flight": h.get("in_flight"),
        "served": h.get("served"), "changes": max(0, len(h.get("history") or []) - 1),
    } for h in _run_hosts(batch)], schema=RUN_HOSTS_SCHEMA)


def level_history_frame(batch: Batch) -> pl.DataFrame:
    """Each host's levels during the run, in order (the first: the level the run began at), and why."""
    return pl.DataFrame([{"host": h.get("url"), "step": i, "concurrency": c.get("level"), "why": c.get("reason")}
                         for h in _run_hosts(batch) for i, c in enumerate(h.get("history") or [])],
                        schema=LEVEL_HISTORY_SCHEMA)
