"""Reality corrects the model: what finished batches took against what the cost model gives them.

The ratios of actual to modelled running time of the model's newest finished batches (``run_seconds`` against the
model replayed on the lines each batch ran, at the prompt and answer tokens they really had, so that what the
answers took — learnt already — is not corrected twice; same backend, the same concurrency when there are some)
scale new estimates by their (geometric) median shrunk toward 1 by ``n / (n + 1)`` — one batch's duration is about
as noisy as the bias it would correct (the same file run twice can differ by 10-15% on a busy CPU), so a single
batch moves the estimate half way and many batches all the way. Their spread widens the interval
(``obatch.bench.estimate.predict``). The first batch has no such help.

Each batch keeps the estimate made at its start beside its actual duration: ``estimates_vs_actuals`` is that record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from obatch.bench.estimate.fit import ConfigFit
from obatch.bench.estimate.predict import at_concurrency, pick_num_ctx
from obatch.bench.estimate.shape import SHARE_SAMPLE, Shape, TokenCalibration, cached_shares, prefix_cached, prompt_text
from obatch.store import bench_repo
from obatch.store.tables import BatchRow

HISTORY = 10  # finished batches whose estimate-vs-actual ratio corrects new estimates
HISTORY_LINES = 1000  # lines of each the cost model is replayed on (the running time scaled to all of them)


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
