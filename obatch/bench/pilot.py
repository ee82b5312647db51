"""A pilot: run a small random sample of a batch file itself, to learn how long its answers are (and, without any
benchmark of the model, how long its requests take), before estimating the whole file.

The sample is a seeded shuffle of the file's valid lines (the same file gives the same sample; a larger pilot
extends a smaller one), run at the context window the batch will use, a few at a time. Every answer is stored as a
``PilotRow`` keyed by the file's content, the line's custom_id and its body: the batch that later imports the same
file takes those lines as finished (``obatch.store.pilots.adopt``), so no line runs twice. Lines a pilot already
ran are not run again by a second pilot. Failed lines are not stored: the batch runs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from obatch import batches, context, errors
from obatch.backends.base import Backend
from obatch.backends.pool import Pool
from obatch.config import Settings
from obatch.jsonl import Request, iter_file
from obatch.runner import Job, Outcome, RetryPolicy, run_jobs
from obatch.store import pilots, repo
from obatch.store.db import Sessions
from obatch.store.tables import PilotRow

DEFAULT_CONCURRENCY = 4
MAX_PILOT = 256


def file_sha256(path: Path) -> str:
    """The file's content hash, as ``obatch.batches.store_file`` records it (blocking: use a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _requests(path: Path, model: str | None) -> list[Request]:
    with path.open("rb") as handle:
        return [r for r in iter_file(handle, model=model) if isinstance(r, Request)]


async def run_pilot(sessions: Sessions, backend: Backend, settings: Settings, path: Path, *, size: int,
                    model: str | None = None, concurrency: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Run (or reuse) a pilot of ``size`` lines of the file at ``path``; returns what it did
    (``obatch.protocol.PilotInfo``'s fields)."""
    if not 1 <= size <= MAX_PILOT:
        raise errors.ConfigError(f"pilot must be between 1 and {MAX_PILOT} lines.", param="pilot")
    sha = await asyncio.to_thread(file_sha256, path)
    requests = await asyncio.to_thread(_requests, path, model)
    if not requests:
        raise errors.ConfigError("The file holds no valid batch requests.", param="input_file_id")
    async with sessions() as session:
        have = {p.custom_id for p in await pilots.all_of(session, sha)}
    order = list(range(len(requests)))
    random.Random(f"{sha}|{seed}").shuffle(order)
    wanted = [requests[i] for i in order[:min(size, len(requests))]]
    todo = [r for r in wanted if r.custom_id not in have]
    level = concurrency or DEFAULT_CONCURRENCY
    started = time.monotonic()
    ran = failed = 0
    by_model: dict[str, list[Request]] = defaultdict(list)
    for r in todo:
        by_model[r.model].append(r)
    pool = backend if isinstance(backend, Pool) else Pool([backend], concurrency=level)
    for name, group in by_model.items():
        stored, errored = await _run_group(sessions, pool, settings, sha, name, group,
                                           [r for r in requests if r.model == name], level)
        ran, failed = ran + stored, failed + errored
    return {"requests": len(wanted), "ran": ran, "reused": len(wanted) - len(todo), "failed": failed,
            "seconds": time.monotonic() - started, "concurrency": level, "file_sha256": sha}


async def _run_group(sessions: Sessions, pool: Pool, settings: Settings, sha: str, model: str,
                     group: Sequence[Request], every: Sequence[Request], level: int) -> tuple[int, int]:
    """One model's sample lines, at the context window the batch will pick for all of that model's lines."""
    num_ctx = None
    if pool.sets_num_ctx:
        info = await pool.route(model)
        need = max(context.need_of(context.estimate_prompt_tokens(r.url, r.body), context.output_budget(r.body))
                   for r in every)
        num_ctx = context.fit_num_ctx(need, info.context_length).num_ctx
    await pool.prepare(model, num_ctx=num_ctx, parallel=None)  # the engine's own width: the batch's, not ours
    rows: list[PilotRow] = []
    failed = 0

    async def jobs() -> AsyncIterator[Job]:
        for r in group:
            yield Job(r.line, r.custom_id, r.url, r.body, num_ctx=context.explicit_num_ctx(r.body) or num_ctx,
                      prompt_estimate=context.estimate_prompt_tokens(r.url, r.body))

    bodies = {r.custom_id: orjson.dumps(r.body) for r in group}
    caps = {r.custom_id: context.output_budget(r.body) for r in group}

    async def keep(outcome: Outcome) -> None:
        nonlocal failed
        if outcome.result is None:
            failed += 1
            return
        row = dict(zip(repo.FINISH_COLUMNS, batches.outcome_row(outcome), strict=False))  # the line number left out
        custom_id = outcome.job.custom_id
        rows.append(PilotRow(
            file_sha256=sha, custom_id=custom_id, body_sha256=pilots.body_sha256(bodies[custom_id]), model=model,
            url=outcome.job.url, max_tokens=caps[custom_id], completion_tokens=row["completion_tokens"],
            finish_reason=row["finish_reason"], latency_ms=outcome.latency_ms, concurrency=level,
            result_json=orjson.dumps(row).decode(), created_at=time.time()))

    await run_jobs(jobs(), pool, keep, policy=RetryPolicy.from_settings(settings), model=model, cap=level)
    async with sessions() as session:
        await pilots.save(session, rows)
        await session.commit()
    return len(rows), failed
