"""Reality corrects the model: what finished batches took against what the cost model gives them.

The ratios of actual to modelled running time of the model's newest finished batches (``run_seconds`` against the
model replayed on the lines each batch ran, at the prompt and answer tokens they really had, so that what the
answers took — learnt already — is not corrected twice; same backend, the same concurrency when there are some)
scale new estimates by their (geometric) median shrunk toward 1 by ``n / (n + 1)`` — one batch's duration is about
as noisy as the bias it would correct (the same file run twice can differ by 10-15% on a busy CPU), so a single
batch moves the estimate half way and many batches all the way. Their spread widens the interval
(``obatch.bench.estimate.predict``). The first batch has no such help.

A pilot of the file measures the engine's speed *today* (``pilot_speed``): the engine of a shared machine may run
a third slower than when it was swept an hour before. Its lines' wall time against the model replayed on them (at
the tokens they really had, ``c`` at a time as they ran) is a ratio like a finished batch's, but of this hour; it is
shrunk toward 1 by how much of its spread is noise (``τ² / (τ² + se²)``, ``τ`` = ``SPEED_DRIFT`` the drift an hour
may bring, ``se`` the replay's own uncertainty on so few lines: the spread of the sweep's repeats, the fit's
per-request residual and the scatter of the pilot's own latencies about the model, over the lines' number) and
replaces the history's ratio.

Each batch keeps the estimate made at its start beside its actual duration: ``estimates_vs_actuals`` is that record.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from obatch.bench.estimate.fit import ConfigFit
from obatch.bench.estimate.predict import at_concurrency, pick_num_ctx
from obatch.bench.estimate.replay import cached_shares
from obatch.bench.estimate.shape import SHARE_SAMPLE, Shape, TokenCalibration, prefix_cached, prompt_text
from obatch.store import bench_repo
from obatch.store.tables import BatchRow, PilotRow

HISTORY = 10  # finished batches whose estimate-vs-actual ratio corrects new estimates
HISTORY_LINES = 1000  # lines of each the cost model is replayed on (the running time scaled to all of them)
SPEED_DRIFT = 0.2  # how far (relative, one sigma) an engine's speed may have moved since it was swept
MIN_SPEED_LINES = 8  # timed pilot lines it takes to tell today's speed


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
    chosen = pick_num_ctx(fits, shape.need, num_ctx)
    return at_concurrency([f for f in fits if f.num_ctx == chosen], shape, concurrency)[0]


@dataclass(frozen=True, slots=True)
class Speed:
    """Today's speed as a pilot measured it: ``ratio`` = its wall time / the model's, the ``factor`` that ratio is
    trusted for (shrunk toward 1 by its noise) and that factor's relative uncertainty (one sigma)."""

    ratio: float
    factor: float
    uncertainty: float
    lines: int

    def note(self) -> str:
        return (f"today's engine speed: the {self.lines} pilot lines took ×{self.ratio:.2f} the time the benchmark's "
                f"model gives them; the estimate is scaled ×{self.factor:.2f} (instead of by finished batches)")


def pilot_speed(fits: Sequence[ConfigFit], pilot: Sequence[PilotRow], *, num_ctx: int | None, cached: float
                ) -> Speed | None:
    """How fast the engine ran a pilot of the file against what the fits give its lines (blocking: CPU work).

    The lines are split into the runs that ran them (a larger automatic pilot extends a smaller one: a gap where no
    line was in flight ends a run); each run is replayed ``c`` at a time in the order its lines started, at the
    prompt and answer tokens they had (``cached``: the share of a prompt the prefix cache held), and the ratio of
    the runs' wall times to their replays is their sum's. None with fewer than ``MIN_SPEED_LINES`` timed lines."""
    timed = []
    for row in pilot:
        done = orjson.loads(row.result_json or "{}")
        prompt, output, end = done.get("prompt_tokens"), done.get("completion_tokens"), done.get("finished_at")
        if prompt is not None and output and end is not None and row.latency_ms:
            timed.append((float(end) - row.latency_ms / 1000, float(end), float(prompt), float(output),
                          max(1, row.concurrency or 1)))
    if len(timed) < MIN_SPEED_LINES or not fits:
        return None
    timed.sort()
    runs: list[list[tuple[float, float, float, float, int]]] = []
    for line in timed:
        if runs and line[0] < max(t[1] for t in runs[-1]):
            runs[-1].append(line)
        else:
            runs.append([line])
    wall = model = 0.0
    margins, lines = [], []
    for run in runs:
        shape = Shape([t[2] for t in run], [t[3] for t in run], [cached] * len(run))
        chosen = pick_num_ctx(fits, shape.need, num_ctx)
        same = [f for f in fits if f.num_ctx == chosen]
        seconds, basis, _ = at_concurrency(same, shape, max(t[4] for t in run))
        wall, model = wall + max(t[1] for t in run) - run[0][0], model + seconds
        margins.append(math.sqrt(basis.cv_k ** 2 + basis.rel_rmse ** 2 / len(run)) * len(run))
        lines += [(t[1] - t[0]) * 1000 / s for t, s in zip(run, basis.services(shape.requests()), strict=True) if s > 0]
    if model <= 0 or wall <= 0:
        return None
    ratio = wall / model
    # the sweep's own noise, and how much the pilot's lines scatter about the model (jitter on a busy machine)
    scatter = statistics.stdev(lines) / statistics.fmean(lines) / math.sqrt(len(lines)) if len(lines) > 1 else 0.0
    se = math.hypot(sum(margins) / len(timed), scatter)
    trust = SPEED_DRIFT ** 2 / (SPEED_DRIFT ** 2 + se ** 2)
    return Speed(ratio, math.exp(math.log(ratio) * trust), math.sqrt(trust) * se, len(timed))


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
