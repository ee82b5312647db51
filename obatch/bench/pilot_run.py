"""A pilot: run a small random sample of a batch file itself, to learn how long its answers are (and, without any
benchmark of the model, how long its requests take), before estimating the whole file.

The sample is drawn as the file streams past (a file of any size costs the memory of the sample alone): each valid
line gets a seeded random key (a hash of the file, the seed and its custom_id: the same file gives the same sample,
and a larger pilot extends a smaller one), and the lines with the smallest keys are taken **per stratum of caps**
(no max_tokens, or the cap's power of two), as many from each as its share of the file: a 16-line pilot of a file
with mixed caps then runs the file's mix of caps, not whatever 16 lines chance picked. It runs at the context
window the batch will use, a few at a time. Every answer is stored as a
``PilotRow`` keyed by the file's content, the line's custom_id and its body: the batch that later imports the same
file takes those lines as finished (``obatch.store.pilots.adopt``), so no line runs twice. Lines a pilot already
ran are not run again by a second pilot. Failed lines are not stored: the batch runs them.

How many lines a pilot needs depends on the file: answers that all take about as long are known from a few, but a
model that runs some answers on to its context window (a small one at temperature 0 does) makes a file's duration
hang on how many of its lines do, and 16 lines may hold none or five of them. An **automatic** pilot (``"auto"``)
runs 16 lines, estimates, and doubles its sample while the answers it measured still leave the estimate unsure by
more than ±15% (``AUTO_WITHIN``, half the 95% interval), never beyond a quarter of the file (``AUTO_SHARE``) or
``MAX_PILOT`` lines. Its lines count toward the batch, so a larger pilot costs the wait, not extra work.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import math
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
from obatch.jsonl import Limits, Request, iter_file
from obatch.jsonl import file_sha256 as file_sha256  # where the pilots and their tests find it
from obatch.runner import Job, Outcome, RetryPolicy, run_jobs
from obatch.store import pilots, repo
from obatch.store.db import Sessions
from obatch.store.tables import PilotRow

DEFAULT_CONCURRENCY = 4
MAX_PILOT = 256
AUTO = "auto"
AUTO_START = 16  # an automatic pilot's first round (see the module docstring)
AUTO_SHARE = 0.25  # the largest share of the file it runs
AUTO_WITHIN = 0.15  # it stops once its answers leave the estimate unsure by no more than this (half the 95% interval)


def pilot_size(value: int | str | None) -> int | str | None:
    """A pilot as asked (a number of lines, or ``"auto"``), checked: ``ConfigError`` names ``pilot`` otherwise."""
    if value is None or value == AUTO:
        return value
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if not 1 <= size <= MAX_PILOT:
        raise errors.ConfigError(f"pilot must be between 1 and {MAX_PILOT} lines, or {AUTO!r}.", param="pilot")
    return size


def auto_sizes(lines: int) -> list[int]:
    """An automatic pilot's rounds for a file of ``lines`` valid lines: 16, doubled each round, up to a quarter of
    the file (and ``MAX_PILOT``; at least 2 lines, what a t-interval needs)."""
    most = min(MAX_PILOT, max(2, math.ceil(lines * AUTO_SHARE)))
    sizes = [min(AUTO_START, most)]
    while sizes[-1] < most:
        sizes.append(min(2 * sizes[-1], most))
    return sizes


def valid_lines(path: Path, model: str | None = None) -> int:
    """How many valid requests the file holds (blocking: use a thread)."""
    with path.open("rb") as handle:
        return sum(isinstance(r, Request) for r in iter_file(handle, model=model))


def stratum(max_tokens: int | None) -> int:
    """The cap kind a line counts in: -1 without max_tokens, else the cap's power of two."""
    return -1 if max_tokens is None else max(0, max_tokens - 1).bit_length()


def allocate(counts: dict[int, int], size: int) -> dict[int, int]:
    """``size`` lines shared among strata in proportion to their ``counts`` (largest remainders; never more than a
    stratum holds)."""
    total = sum(counts.values())
    if total <= size:
        return dict(counts)
    shares = {k: size * n / total for k, n in counts.items()}
    taken = {k: int(v) for k, v in shares.items()}
    for k in sorted(shares, key=lambda k: (taken[k] - shares[k], k))[:size - sum(taken.values())]:
        taken[k] += 1
    return taken


def sample_file(path: Path, model: str | None, size: int, key: str, limits: Limits | None = None
                ) -> tuple[list[Request], dict[str, int], int]:
    """The pilot's lines (stratified by cap kind, see the module docstring; in key order, which is random), the
    context each model's longest line needs, and how many valid lines the file holds. Reads the file once, keeping
    at most ``size`` lines per stratum (blocking: use a thread)."""
    kept: dict[int, list[tuple[int, int, Request]]] = defaultdict(list)  # per stratum, a max-heap of smallest keys
    counts: dict[int, int] = defaultdict(int)
    need: dict[str, int] = {}
    with path.open("rb") as handle:
        for r in iter_file(handle, model=model, limits=limits):
            if not isinstance(r, Request):
                continue
            cap = context.output_budget(r.body)
            need[r.model] = max(need.get(r.model, 0),
                                context.need_of(context.estimate_prompt_tokens(r.url, r.body), cap))
            kind = stratum(cap)
            counts[kind] += 1
            rank = int.from_bytes(hashlib.sha256(f"{key}|{r.custom_id}".encode()).digest()[:8], "big")
            heap = kept[kind]
            if len(heap) < size:
                heapq.heappush(heap, (-rank, r.line, r))
            elif -heap[0][0] > rank:
                heapq.heapreplace(heap, (-rank, r.line, r))
    wanted = allocate(dict(counts), size)
    chosen = [(-rank, r) for kind, heap in kept.items()
              for rank, _, r in sorted(heap, key=lambda item: (-item[0], item[1]))[:wanted.get(kind, 0)]]
    return [r for _, r in sorted(chosen, key=lambda item: (item[0], item[1].line))], need, sum(counts.values())


async def run_pilot(sessions: Sessions, backend: Backend, settings: Settings, path: Path, *, size: int,
                    model: str | None = None, concurrency: int | None = None, seed: int = 0, owner: str = ""
                    ) -> dict[str, Any]:
    """Run (or reuse) a pilot of ``size`` lines of the file at ``path`` for ``owner`` (the server's API key owner;
    "" for the CLI and notebook): only that owner's pilot lines are reused, and only that owner's batches take the
    lines it runs. Returns what it did (``obatch.protocol.PilotInfo``'s fields)."""
    pilot_size(size)
    sha = await asyncio.to_thread(file_sha256, path)
    # the lines a batch would refuse (engine options clients may not set) are never piloted either
    wanted, need, total = await asyncio.to_thread(sample_file, path, model, size, f"{sha}|{seed}",
                                                  Limits.for_clients(settings))
    if not total:
        raise errors.ConfigError("The file holds no valid batch requests.", param="input_file_id")
    async with sessions() as session:
        have = {p.custom_id for p in await pilots.all_of(session, owner, sha)}
    todo = [r for r in wanted if r.custom_id not in have]
    level = concurrency or DEFAULT_CONCURRENCY
    started = time.monotonic()
    ran = failed = 0
    by_model: dict[str, list[Request]] = defaultdict(list)
    for r in todo:
        by_model[r.model].append(r)
    pool = backend if isinstance(backend, Pool) else Pool([backend], concurrency=level)
    for name, group in by_model.items():
        stored, errored = await _run_group(sessions, pool, settings, (owner, sha), name, group, need[name], level)
        ran, failed = ran + stored, failed + errored
    return {"requests": len(wanted), "ran": ran, "reused": len(wanted) - len(todo), "failed": failed,
            "seconds": time.monotonic() - started, "concurrency": level, "file_sha256": sha, "lines": total}


async def _run_group(sessions: Sessions, pool: Pool, settings: Settings, file: tuple[str, str], model: str,
                     group: Sequence[Request], need: int, level: int) -> tuple[int, int]:
    """One model's sample lines, at the context window the batch will pick for all of that model's lines (whose
    longest needs ``need`` tokens); ``file``: the pilot's owner and the file's SHA-256, the lines' key."""
    owner, sha = file
    num_ctx = None
    if pool.sets_num_ctx:
        info = await pool.route(model)
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
            owner=owner, file_sha256=sha, custom_id=custom_id, body_sha256=pilots.body_sha256(bodies[custom_id]),
            model=model, url=outcome.job.url, max_tokens=caps[custom_id], completion_tokens=row["completion_tokens"],
            finish_reason=row["finish_reason"], latency_ms=outcome.latency_ms, concurrency=level,
            result_json=orjson.dumps(row).decode(), created_at=time.time()))

    await run_jobs(jobs(), pool, keep, policy=RetryPolicy.from_settings(settings), model=model, cap=level)
    async with sessions() as session:
        await pilots.save(session, rows)
        await session.commit()
    return len(rows), failed
