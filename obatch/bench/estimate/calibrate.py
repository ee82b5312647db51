"""What turns a batch file's lines into engine tokens: the ``TokenCalibration`` of a model, from what was measured.

obatch's text estimate of a prompt maps to the engine's token count by a straight line fitted on the measured
requests and the model's finished batch requests; answer lengths are learnt from a pilot of the file, finished
batches and natural benchmark requests (``obatch.bench.answers``); and how much of a repeated prompt prefix the
engine really skipped (``cache_kept``) from the prompt timings of finished batches, or of a pilot before any batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import context
from obatch.bench.answers import AnswerSources, observe
from obatch.bench.estimate.fit import ConfigFit, least_squares
from obatch.bench.estimate.replay import run_shares
from obatch.bench.estimate.shape import TokenCalibration, prompt_text
from obatch.prefix import prefix_key
from obatch.schedule import expected_length
from obatch.store import bench_repo
from obatch.store.tables import PilotRow


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
    schedules = await bench_repo.batch_schedules(session, sorted({t[0] for t in timed}))
    alone = min(fits, key=lambda f: f.concurrency)
    piloted = pilot_cache_kept(pilot, alone, repeated) if pilot else None
    kept = cache_kept(timed, alone, lambda e: max(1.0, slope * e + intercept),
                      window=max(f.concurrency for f in fits), default=1.0 if piloted is None else piloted,
                      schedules={b: s or "auto" for b, s in schedules.items()})
    return TokenCalibration(slope, intercept, answers=sources.lengths(endpoint, population=population),
                            cache_kept=kept)


def cache_kept(timed: Sequence[tuple[str, int, str, str, int, float]], fit: ConfigFit,
               tokens: Callable[[int], float], *, window: int, default: float = 1.0,
               schedules: Mapping[str, str] | None = None) -> float:
    """How much of the prefix an engine's cache should hold (``cached_shares``) it really skipped, from finished
    batch requests the engine timed: the least-squares slope of (full prompt time − measured) on the time the
    cache should have saved, in [0, 1]. llama.cpp and Ollama skip it (about 1); an engine without a prefix cache
    processes every prompt in full (0). ``default`` (1: the cache works; or what a pilot showed) until enough
    requests had a prefix to skip. The first ``window`` lines of a batch are left out: their prompts were processed
    as one batch. ``schedules``: the order each batch ran in (``"auto"``: the scheduler's, replayed as an estimate
    replays it, ``obatch.bench.estimate.replay``; else, or not given, the file's)."""
    by_batch: dict[str, list[tuple[int, str, str, int, float]]] = defaultdict(list)
    for batch_id, line, url, body, estimate, ms in timed:
        by_batch[batch_id].append((line, url, body, estimate, ms))
    num = den = saved_total = 0.0
    for batch_id, rows in by_batch.items():
        rows.sort()
        bodies = [orjson.loads(body) for _, _, body, _, _ in rows]
        texts = [prompt_text(row[1], body) for row, body in zip(rows, bodies, strict=True)]
        keys = [prefix_key(row[1], body) for row, body in zip(rows, bodies, strict=True)]
        lengths = [expected_length(row[3], context.output_budget(body), context.DEFAULT_OUTPUT_BUDGET)
                   for row, body in zip(rows, bodies, strict=True)]
        order, shares = run_shares(texts, keys, lengths, window, (schedules or {}).get(batch_id, "file"))
        ran = [rows[i] for i in order] if order is not None else rows
        for i, ((_, _, _, estimate, ms), share) in enumerate(zip(ran, shares, strict=True)):
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
