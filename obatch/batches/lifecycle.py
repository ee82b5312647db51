"""The batch lifecycle: create a batch, drive it from wherever it stands to a final status, cancel it, expire it.

Every step reads its state from the store and writes its progress back, so ``process`` can be called again on any
batch after a crash and does only what is missing:

    validating ─┬─> failed                     (input refused; every problem listed with its line)
                └─> in_progress ─┬─> finalizing ─> completed
                                 ├─> expired   (completion window passed; unfinished lines → batch_expired)
                                 └─> cancelling ─> cancelled (unfinished lines → batch_cancelled)

Importing the input is ``files``' part, recording results and closing the batch ``results'``; this module runs the
rows through the engines in between: one model group after another, each at one fitted context, with the run's
concurrency, remaining time and any cancel kept on the batch's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import orjson

from obatch import cache, context, errors, lease, structured
from obatch.backends.base import loaded_context
from obatch.backends.pool import Pool
from obatch.batches import provenance, reuse, slots
from obatch.batches.files import validate_and_import
from obatch.batches.results import ResultWriter, finalize
from obatch.batches.services import Progress, Services, reload, update_batch
from obatch.progress import LiveEta, prior_levels
from obatch.protocol import FINAL_STATUSES, new_id
from obatch.runner import Job, JobSource, Outcome, run_jobs
from obatch.schedule import FileOrder, Scheduler, Stats
from obatch.store import repo
from obatch.store.tables import BatchRow

_WINDOW = re.compile(r"([0-9]{1,6})([smhd])", re.ASCII)  # fullmatch: no spaces, newline or other digits
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str, *, minimum: int = 60) -> int:
    """``"24h"`` → 86400. Windows from ``minimum`` seconds (1 minute by default) to 7 days are accepted."""
    match = _WINDOW.fullmatch(window)
    if not match:
        raise errors.ConfigError(f"completion_window must look like '24h' or '30m', got {window[:32]!r}.",
                                 param="completion_window")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if not minimum <= seconds <= 7 * 86400:
        raise errors.ConfigError(f"completion_window must be between {minimum}s and 7d.", param="completion_window")
    return seconds


async def create_batch(svc: Services, *, input_file_id: str, endpoint: str | None, completion_window: str = "24h",
                       metadata: dict[str, str] | None = None, owner: str = "", model: str | None = None,
                       source: str = "api", signature: str | None = None, concurrency: int | None = None,
                       output_expires_after: int | None = None, output_retries: int | None = None,
                       schedule: str | None = None, parent_id: str | None = None) -> BatchRow:
    seconds = window_seconds(completion_window, minimum=svc.settings.min_completion_window)
    cache.check_metadata(metadata)
    created = int(svc.clock())
    async with svc.sessions() as session:
        await repo.get_file(session, input_file_id, owner if source == "api" else None)
        batch = BatchRow(
            id=new_id("batch"), owner=owner, endpoint=endpoint or "", input_file_id=input_file_id,
            completion_window=completion_window, created_at=created, expires_at=created + seconds,
            metadata_json=orjson.dumps(metadata).decode() if metadata is not None else None, model=model, source=source,
            signature=signature, concurrency=concurrency, backend=svc.backend.name,
            output_expires_after=output_expires_after, output_retries=output_retries, schedule=schedule,
            parent_id=parent_id,
            seq=await repo.next_seq(session),
        )
        repo.add(session, batch)
        await session.commit()
    return batch


async def process(svc: Services, batch_id: str, *, progress: Progress | None = None,
                  output: Path | None = None, error: Path | None = None, stream: bool = False) -> BatchRow:
    """Drive a batch from wherever it stands to a final status. Safe to call again after any crash.

    Only the holder of the batch's lease drives it: ``lease.BatchBusy`` when another live process does,
    ``lease.LeaseLost`` when this one stalled past the lease's expiry and another took over.
    """
    batch = await reload(svc, batch_id)
    if batch.status in FINAL_STATUSES:
        return batch
    async with lease.hold(svc.sessions, svc.settings, batch_id, svc.owner, svc.clock):
        return await _process(svc, batch_id, progress=progress, output=output, error=error, stream=stream)


async def _process(svc: Services, batch_id: str, *, progress: Progress | None, output: Path | None,
                   error: Path | None, stream: bool) -> BatchRow:
    batch = await reload(svc, batch_id)
    if batch.status in FINAL_STATUSES:
        return batch
    if batch.status == "validating" or not batch.imported:
        await validate_and_import(svc, batch)
        if batch.status == "failed":
            return batch
    if batch.status == "cancelling":
        return await finalize(svc, batch, "cancelled", output=output, error=error)
    if batch.status == "in_progress":
        if batch.started_at is None:  # the estimate is made before the clock starts, and kept to check it
            estimate = None
            if svc.estimator is not None:
                estimate = await svc.estimator(svc.sessions, batch, svc.pool, batch.concurrency or svc.pool.fixed)
            await update_batch(svc, batch, started_at=svc.clock(), estimate_json=estimate)
        started = time.monotonic()
        remaining = (batch.expires_at or 0) - svc.clock() if batch.expires_at else None
        outcome = "completed"
        try:
            window = asyncio.timeout(max(remaining, 0) if remaining is not None else None)
            async with window:
                await _execute(svc, batch, progress=progress, stream=stream)
        except* TimeoutError:
            if not window.expired():  # a timeout from below, not the completion window: not an expiry
                raise
            outcome = "expired"
        except* _Cancelled:
            outcome = "cancelled"
        finally:
            with contextlib.suppress(Exception):
                ran = batch.run_seconds + time.monotonic() - started
                await asyncio.shield(update_batch(svc, batch, run_seconds=ran))
        return await finalize(svc, batch, outcome, output=output, error=error)
    # finalizing: a crash happened while files were being written; write them again.
    return await finalize(svc, batch, "completed", output=output, error=error)


async def request_cancel(svc: Services, batch_id: str, owner: str | None = None) -> BatchRow:
    """Ask a batch to stop: the run notices within ``commit_interval`` and finalises as cancelled."""
    async with svc.sessions() as session:
        batch = await repo.get_batch(session, batch_id, owner)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        if batch.status in FINAL_STATUSES or batch.status == "finalizing":
            raise errors.ConflictError(f"Batch {batch_id} is {batch.status} and cannot be cancelled.")
        await repo.set_batch(session, batch_id, status="cancelling", cancelling_at=int(svc.clock()))
        await session.commit()
        return await repo.get_batch(session, batch_id, fresh=True)


# ------------------------------------------------------------------------------------------ running the rows


class _Cancelled(Exception):
    """Raised inside the run when the batch was asked to cancel (by any process, through the store)."""


async def _watch(svc: Services, writer: ResultWriter, done: asyncio.Event, memory: slots.Memory | None = None
                 ) -> None:
    """Flush on a timer, keep the concurrency story on the batch (and the slots auto read, in ``memory``), and
    notice a cancel written to the store.

    It stops between rounds when ``done`` is set, not by being cancelled: a cancel landing in its query would leave
    the connection to be rolled back at garbage collection (SQLite's write lock held until then)."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(svc.settings.commit_interval):
                await done.wait()
        if done.is_set():
            return
        await writer.flush()
        async with svc.sessions() as session:
            status = await repo.batch_status(session, writer.batch_id)
            if writer.eta is not None:
                writer.eta.level = svc.pool.settled_level()
            await repo.set_batch(session, writer.batch_id, concurrency_json=concurrency_json(svc.pool, writer.started),
                                 eta_json=orjson.dumps(writer.eta.as_dict()).decode() if writer.eta else None)
            await session.commit()
        if memory is not None:
            await slots.remember(svc, memory)
        if writer.progress is not None:
            eta = writer.eta.describe() if writer.eta is not None else ""
            writer.progress.set_postfix_str(svc.pool.levels() + (f"; {eta}" if eta else ""), refresh=False)
        if status == "cancelling":
            raise _Cancelled


def concurrency_json(pool: Pool, since: float) -> str:
    """Each host's level, the reason for it, and its changes since ``since`` (monotonic seconds)."""
    hosts = []
    for host in pool.hosts:
        entry = host.status().model_dump()
        changes = host.limit.history
        first = max((i for i, c in enumerate(changes) if c.at <= since), default=0)  # the level the run began at
        entry["history"] = [c.as_dict() for c in changes[first:]]
        hosts.append(entry)
    return orjson.dumps({"mode": "auto" if pool.concurrency == "auto" else "fixed", "hosts": hosts}).decode()


def _job(row: repo.PendingRow, num_ctx: int | None) -> Job:
    line, custom_id, url, text, prompt_estimate = row
    body = orjson.loads(text)
    return Job(line, custom_id, url, body, context.explicit_num_ctx(body) or num_ctx, prompt_estimate)


async def _jobs(svc: Services, batch_id: str, model: str, num_ctx: int | None,
                held: frozenset[int] = frozenset()) -> AsyncIterator[Job]:
    async for row in repo.iter_pending(svc.sessions, batch_id, model):
        if row[0] not in held:  # held: waits for an identical earlier line's answer (obatch.batches.reuse)
            yield _job(row, num_ctx)


async def _source(svc: Services, batch: BatchRow, model: str, num_ctx: int | None, stats: Stats,
                  held: frozenset[int] = frozenset()) -> JobSource:
    """Where a model group's jobs come from: the file's order, or the scheduler (``obatch.schedule``); lines in
    ``held`` wait for an identical earlier line's answer and are left out."""
    if stats.schedule == "file":
        return FileOrder(_jobs(svc, batch.id, model, num_ctx, held), stats)

    async def fetch(lines: Sequence[int]) -> list[Job]:
        rows = await repo.pending_rows(svc.sessions, batch.id, lines)
        return [_job(row, num_ctx) for row in rows if row[0] not in held]

    return await Scheduler.load(svc.sessions, batch.id, model, fetch, default_budget=context.DEFAULT_OUTPUT_BUDGET,
                                stats=stats)


async def schedule_stats(svc: Services, batch: BatchRow) -> Stats:
    """The batch's schedule (its own, else the settings') and the prefix groups its lines form."""
    async with svc.sessions() as session:
        groups, grouped = await repo.prefix_group_counts(session, batch.id)
        lines = await repo.count_requests(session, batch.id)
    stats = Stats(schedule=batch.schedule or svc.settings.schedule, groups=groups, grouped_lines=grouped, lines=lines)
    if batch.schedule_json:  # a resumed run: what the engine reported before counts too
        before = orjson.loads(batch.schedule_json)
        stats.add_reports(before)
    return stats


async def _execute(svc: Services, batch: BatchRow, *, progress: Progress | None, stream: bool = False) -> None:
    """Run every pending row, one model group after another (fewest model swaps), resuming where rows stand."""
    async with svc.sessions() as session:
        groups = await repo.pending_groups(session, batch.id, context.DEFAULT_OUTPUT_BUDGET)
    writer = ResultWriter(svc, batch.id, progress, eta=await live_eta(svc, batch))
    pool = svc.pool
    policy = svc.policy if batch.output_retries is None else replace(svc.policy, output_retries=batch.output_retries)
    stats = await schedule_stats(svc, batch)
    for group in groups:
        try:
            info = await pool.route(group.model)
        except errors.PermanentError as exc:
            await _fail_group(svc, batch.id, group.model, exc, progress, group.pending)
            continue
        num_ctx = await _fit_group(svc, batch.id, group, info.context_length, progress)
        hosts = await provenance.ask(pool, group.model)  # versions and digests: once, for the cache and the record
        plan = await reuse.before_group(svc, batch, group.model, progress, hosts)  # stored answers; repeats held
        if plan.answered and not await _has_pending(svc, batch.id, group.model):
            continue
        memory = await slots.recall(svc, group.model)  # auto starts where an earlier run found the slots
        await pool.prepare(group.model, num_ctx=num_ctx, parallel=pool.fixed, lines=group.pending)
        writer.hosts.update(await provenance.record(svc, batch, hosts))
        held = plan.held
        while True:  # a second round only for held lines whose leader failed: they run themselves
            try:
                async with asyncio.TaskGroup() as tasks:
                    done = asyncio.Event()
                    tasks.create_task(_watch(svc, writer, done, memory))
                    runner = tasks.create_task(run_jobs(
                        await _source(svc, batch, group.model, num_ctx, stats, held), pool,
                        _recording(svc, batch.id, group.model, writer), policy=policy, model=group.model,
                        stream=stream, cap=batch.concurrency))
                    await runner
                    done.set()
            finally:
                await asyncio.shield(writer.flush())
                await asyncio.shield(update_batch(svc, batch,
                                                  concurrency_json=concurrency_json(pool, writer.started),
                                                  schedule_json=orjson.dumps(stats.as_dict()).decode()))
                await asyncio.shield(slots.remember(svc, memory))
            if not held:
                break
            await reuse.answer_held(svc, batch, group.model, plan, progress)
            held = frozenset()
        await _record_loaded_context(svc, batch.id, group.model)


def _recording(svc: Services, batch_id: str, model: str, writer: ResultWriter) -> Callable[[Outcome], Awaitable[None]]:
    """``writer.add``, recording first, at the group's first answer (the model is loaded then), the context the
    engine loaded on the group's rows still to finish: each later result is committed with its ``loaded_context``
    already in place, so a line read while the batch runs is the line its output file will hold."""
    record: asyncio.Future[None] | None = None

    async def add(outcome: Outcome) -> None:
        nonlocal record
        if record is None and (outcome.result is not None or isinstance(outcome.error, structured.InvalidOutput)):
            record = asyncio.ensure_future(_record_loaded_context(svc, batch_id, model))
        if record is not None:  # answers that arrive meanwhile wait for it (a write is never cancelled midway)
            await asyncio.shield(record)
        await writer.add(outcome)

    return add


async def _has_pending(svc: Services, batch_id: str, model: str) -> bool:
    async with svc.sessions() as session:
        groups = await repo.pending_groups(session, batch_id, context.DEFAULT_OUTPUT_BUDGET)
    return any(g.model == model for g in groups)


async def live_eta(svc: Services, batch: BatchRow) -> LiveEta:
    """The remaining-time tracker of this run: the pending lines by cap, and the start estimate as its prior."""
    async with svc.sessions() as session:
        caps = await repo.pending_caps(session, batch.id)
    made = orjson.loads(batch.estimate_json) if batch.estimate_json else {}
    groups = made.get("groups") or []
    load = sum(float(g.get("load_seconds") or 0.0) for g in groups)
    lines = sum(int(g.get("num_requests") or 0) for g in groups)
    output = sum(float(g.get("output_tokens_mean") or 0.0) * int(g.get("num_requests") or 0) for g in groups)
    level, curve = prior_levels(groups)
    return LiveEta(caps, prior_seconds=max(0.0, float(made["seconds"]) - load) if made.get("seconds") else None,
                   prior_output=output / lines if lines else None, outages=svc.pool.outages, prior_level=level,
                   prior_curve=curve)


async def _record_loaded_context(svc: Services, batch_id: str, model: str) -> None:
    """Once per model group: the context the engine really ran (Ollama's may differ from the one asked)."""
    try:
        loaded = await loaded_context(svc.backend, model)
    except errors.BackendError:
        return  # a fact for the record, not worth failing a batch over
    if loaded:
        async with svc.sessions() as session:
            await repo.set_loaded_context(session, batch_id, model, loaded)
            await session.commit()


async def _fail_group(svc: Services, batch_id: str, model: str, exc: errors.BackendError,
                      progress: Progress | None, count: int) -> None:
    async with svc.sessions() as session:
        await repo.fail_pending(session, batch_id, exc.code, exc.message, model=model,
                                status=exc.status or exc.status_code)
        await session.commit()
    if progress is not None:
        progress.update(count)


async def _fit_group(svc: Services, batch_id: str, group: repo.Group, context_length: int | None,
                     progress: Progress | None) -> int | None:
    """One num_ctx for the group; requests that cannot fit the model at all fail now as context_length_exceeded."""
    if not svc.pool.sets_num_ctx:
        return None  # an OpenAI-compatible engine's context is fixed at its start
    if context_length:
        async with svc.sessions() as session:
            failed = await repo.fail_pending(session, batch_id, "context_length_exceeded",
                                             f"The request does not fit the model's context length of {context_length} "
                                             "tokens (prompt estimate plus max_tokens).", model=group.model,
                                             context_length=context_length)
            await session.commit()
        if progress is not None and failed:
            progress.update(failed)
        async with svc.sessions() as session:
            refreshed = [g for g in await repo.pending_groups(session, batch_id, context.DEFAULT_OUTPUT_BUDGET)
                         if g.model == group.model]
        if refreshed:
            group = refreshed[0]
    return context.fit_num_ctx(group.max_need, context_length).num_ctx
