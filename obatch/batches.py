"""The batch lifecycle on top of the runner and the store: validate → import → execute → finalise.

Every step reads its state from the store and writes its progress back, so ``process`` can be called again on any
batch after a crash and does only what is missing:

    validating ─┬─> failed                     (input refused; every problem listed with its line)
                └─> in_progress ─┬─> finalizing ─> completed
                                 ├─> expired   (completion window passed; unfinished lines → batch_expired)
                                 └─> cancelling ─> cancelled (unfinished lines → batch_cancelled)

A request row takes its result only while it is still pending, and output/error files are written from the rows,
so each input line ends in exactly one of the two files, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from sqlalchemy import delete, func, select, update
from sqlmodel import col

from obatch import context, errors, lease
from obatch.backends.base import Backend, loaded_context
from obatch.backends.pool import Pool
from obatch.config import Settings
from obatch.jsonl import MAX_PROBLEMS, EnginePolicy, Limits, Request, iter_file
from obatch.progress import LiveEta
from obatch.protocol import (
    FINAL_STATUSES,
    NOT_RUN_CODES,
    Batch,
    BatchErrorItem,
    BatchErrors,
    BatchEta,
    BatchExtension,
    BatchUsage,
    DurationEstimate,
    ErrorDetail,
    ErrorResponse,
    FileObject,
    LineError,
    LineStats,
    OutputLine,
    OutputTokensDetails,
    RequestCounts,
    ResponseBody,
    new_id,
    response_content,
)
from obatch.runner import Job, Outcome, RetryPolicy, run_jobs
from obatch.store import pilots, repo
from obatch.store.db import Sessions
from obatch.store.tables import BatchRow, FileRow, RequestRow

MAX_EXPIRY = 30 * 86400  # OpenAI's longest file expiry
IMPORT_CHUNK = 2000
WRITE_CHUNK = 1000
_ID = re.compile(r"^(file|batch)-[0-9a-f]{24}$")
_WINDOW = re.compile(r"([0-9]{1,6})([smhd])", re.ASCII)  # fullmatch: no spaces, newline or other digits
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Estimator = Callable[[Sessions, BatchRow, Backend, int | None], Awaitable[str | None]]


class Progress(Protocol):
    """What a run reports to: lines done, and a note (the concurrency level and why). tqdm bars are one."""

    def update(self, n: int | float | None = 1) -> bool | None: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...


@dataclass
class Services:
    """What batch work needs, built by the process that owns it and passed in.

    ``pool`` is the backend's engine hosts with their concurrency levels (``settings.concurrency``: a number, or
    ``"auto"``). It lives as long as the services: every batch run through them leases slots from it, so runs share
    the engines fairly and an auto level learned by one run carries over to the next. ``estimator``, when given,
    makes the duration estimate kept with a batch before it runs (the benchmarks provide it; the lifecycle does not
    depend on them).
    """

    settings: Settings
    sessions: Sessions
    backend: Backend
    clock: Callable[[], float] = time.time
    estimator: Estimator | None = None
    owner: str = field(default_factory=lease.new_owner)  # this process's name on the leases it holds
    pool: Pool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = Pool.of(self.backend, concurrency=self.settings.concurrency,
                            maximum=self.settings.max_concurrency)

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy.from_settings(self.settings)


def _request_id() -> str:
    return new_id("batch_req", sep="_", length=32, secret=False)


def file_path(settings: Settings, file_id: str) -> Path:
    """Where a stored file's bytes live. Ids are ours and checked, so no caller text ever reaches the path."""
    if not _ID.match(file_id):
        raise errors.NotFoundError(f"No such file: {file_id}", param="file_id")
    return settings.files_dir / f"{file_id}.jsonl"


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


# ---------------------------------------------------------------------------------------------- files


async def store_file(svc: Services, chunks: AsyncIterator[bytes], *, filename: str, purpose: str,
                     owner: str = "", expires_after: int | None = None) -> FileRow:
    """Stream bytes to the files folder (size limit enforced while streaming), then record the file."""
    file_id = new_id("file")
    path = file_path(svc.settings, file_id)
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    handle = await asyncio.to_thread(path.open, "wb")
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > svc.settings.max_file_bytes:
                raise errors.InputFileError(
                    f"The file exceeds the limit of {svc.settings.max_file_bytes} bytes.",
                    [errors.LineProblem(None, "file_too_large", "The file is too large.")])
            digest.update(chunk)
            await asyncio.to_thread(handle.write, chunk)
    except BaseException:
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(handle.close)
    created = int(svc.clock())
    row = FileRow(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=size, created_at=created,
                  sha256=digest.hexdigest(), expires_at=created + expires_after if expires_after else None)
    async with svc.sessions() as session:
        session.add(row)
        await session.commit()
    return row


async def read_chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    """A file's bytes, a chunk at a time, read in a worker thread."""
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, size):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)


async def delete_file(svc: Services, file_id: str, owner: str | None = None) -> None:
    async with svc.sessions() as session:
        row = await repo.get_file(session, file_id, owner)
        await session.delete(row)
        await session.commit()
    await asyncio.to_thread(file_path(svc.settings, file_id).unlink, missing_ok=True)


async def delete_expired_files(svc: Services) -> int:
    """Delete every file whose ``expires_at`` has passed (row and bytes); returns how many. Files without an
    expiry are kept for ever: a local user's data is theirs until they delete it or ask for an expiry."""
    deleted = 0
    while True:
        async with svc.sessions() as session:
            ids = await repo.expired_files(session, int(svc.clock()))
        for file_id in ids:
            with contextlib.suppress(errors.NotFoundError):  # deleted meanwhile by its owner
                await delete_file(svc, file_id)
                deleted += 1
        if len(ids) < 1000:
            return deleted


def expiry_seconds(policy: dict[str, Any] | None, *, param: str, minimum: int) -> int | None:
    """OpenAI's ``{"anchor": "created_at", "seconds": N}`` → N, checked (``minimum`` s to 30 days)."""
    if policy is None:
        return None
    anchor, seconds = policy.get("anchor"), policy.get("seconds")
    if anchor != "created_at":
        raise errors.ConfigError(f"{param}.anchor must be 'created_at'; got {anchor!r}.", param=f"{param}.anchor")
    if isinstance(seconds, str) and seconds.strip().isdigit():
        seconds = int(seconds)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not minimum <= seconds <= MAX_EXPIRY:
        raise errors.ConfigError(f"{param}.seconds must be an integer between {minimum} and {MAX_EXPIRY}; "
                                 f"got {seconds!r}.", param=f"{param}.seconds")
    return seconds


# -------------------------------------------------------------------------------------------- batches


async def create_batch(svc: Services, *, input_file_id: str, endpoint: str | None, completion_window: str = "24h",
                       metadata: dict[str, str] | None = None, owner: str = "", model: str | None = None,
                       source: str = "api", signature: str | None = None, concurrency: int | None = None,
                       output_expires_after: int | None = None) -> BatchRow:
    seconds = window_seconds(completion_window, minimum=svc.settings.min_completion_window)
    created = int(svc.clock())
    async with svc.sessions() as session:
        await repo.get_file(session, input_file_id, owner if source == "api" else None)
        batch = BatchRow(
            id=new_id("batch"), owner=owner, endpoint=endpoint or "", input_file_id=input_file_id,
            completion_window=completion_window, created_at=created, expires_at=created + seconds,
            metadata_json=orjson.dumps(metadata).decode() if metadata else None, model=model, source=source,
            signature=signature, concurrency=concurrency, backend=svc.backend.name,
            output_expires_after=output_expires_after,
            seq=await repo.next_seq(session),
        )
        session.add(batch)
        await session.commit()
    return batch


def _request_row(batch_id: str, request: Request) -> tuple[Any, ...]:
    """A valid line as ``repo.REQUEST_COLUMNS``' values."""
    body = request.body
    return (batch_id, request.line, request.custom_id, request.url, str(body["model"]), orjson.dumps(body).decode(),
            context.estimate_prompt_tokens(request.url, body), context.output_budget(body), "pending", 0, False)


def _import_chunk(items: Iterator[Request | errors.LineProblem], batch_id: str, problems: list[errors.LineProblem]
                  ) -> tuple[int, list[tuple[Any, ...]]] | None:
    """The next ``IMPORT_CHUNK`` lines: (how many were read, rows of the valid ones), None at the end. Problems go
    to ``problems``; once there is one, no more rows are made (the file will be refused). Blocking: a worker thread
    runs it, so parsing and checking stay off the event loop."""
    read, rows = 0, []
    for item in itertools.islice(items, IMPORT_CHUNK):
        read += 1
        if isinstance(item, Request):
            if not problems:
                rows.append(_request_row(batch_id, item))
        elif len(problems) < MAX_PROBLEMS:
            problems.append(item)
    return (read, rows) if read else None


async def _validate_and_import(svc: Services, batch: BatchRow) -> None:
    """validating → failed (with every problem) or in_progress with one pending row per line.

    One pass over the file: lines are checked and imported together, and a file with any problem is refused with
    every problem listed and its rows removed. Until the batch is marked imported its rows are not run, so a crash
    mid-import only means importing again."""
    path = file_path(svc.settings, batch.input_file_id)
    limits = Limits(max_bytes=svc.settings.max_file_bytes, max_lines=svc.settings.max_lines,
                    max_depth=svc.settings.max_json_depth,
                    policy=EnginePolicy.from_settings(svc.settings) if batch.source == "api" else None)
    endpoint = batch.endpoint or None
    async with svc.sessions() as session:
        await repo.replace_requests(session, batch.id)
        await session.execute(update(BatchRow).where(col(BatchRow.id) == batch.id).values(  # pilot lines counted
            completed=0, failed=0, input_tokens=0, output_tokens=0, reasoning_tokens=0))  # by an import cut short
        await session.commit()
    try:
        handle = await asyncio.to_thread(path.open, "rb")
    except FileNotFoundError:
        gone = errors.LineProblem(None, "file_missing", "The input file is gone.")
        await _set(svc, batch, status="failed", failed_at=int(svc.clock()), errors_json=errors.problems_json([gone]))
        return
    problems: list[errors.LineProblem] = []
    total = 0
    try:
        items = iter_file(handle, limits=limits, endpoint=endpoint, model=batch.model)
        while chunk := await asyncio.to_thread(_import_chunk, items, batch.id, problems):
            if rows := chunk[1]:
                total += len(rows)
                async with svc.sessions() as session:
                    await repo.insert_requests(session, rows)
                    await session.commit()
    finally:
        await asyncio.to_thread(handle.close)
    if problems:
        async with svc.sessions() as session:
            await repo.replace_requests(session, batch.id)
            await session.commit()
        await _set(svc, batch, status="failed", failed_at=int(svc.clock()), errors_json=errors.problems_json(problems))
        return
    async with svc.sessions() as session:
        imported = (await session.execute(
            select(func.count()).select_from(RequestRow).where(col(RequestRow.batch_id) == batch.id))).scalar()
    if imported != total:  # never mark a batch imported (and so completable) with lines missing
        raise errors.ConflictError(f"Batch {batch.id}: imported {imported} of {total} lines; importing again.")
    async with svc.sessions() as session:  # lines a pilot of this very file already ran are not run again
        stored = await session.get(FileRow, batch.input_file_id)
        if stored is not None and stored.sha256 and await pilots.adopt(session, batch.id, stored.sha256):
            await session.commit()
    first_url = None
    async with svc.sessions() as session:
        first_url = (await session.execute(
            select(col(RequestRow.url)).where(col(RequestRow.batch_id) == batch.id)
            .order_by(col(RequestRow.line)).limit(1)
        )).scalar()
    await _set(svc, batch, in_progress_at=int(svc.clock()), imported=True, total=total,
               endpoint=batch.endpoint or first_url or "")
    # Only a batch still validating moves on: a cancel requested meanwhile must not be overwritten.
    async with svc.sessions() as session:
        await session.execute(update(BatchRow).where(col(BatchRow.id) == batch.id,
                                                     col(BatchRow.status) == "validating").values(status="in_progress"))
        await session.commit()
    batch.status = (await reload(svc, batch.id)).status


async def _set(svc: Services, batch: BatchRow, **values: Any) -> None:
    """Write fields of a batch and mirror them on the object in hand."""
    async with svc.sessions() as session:
        await session.execute(update(BatchRow).where(col(BatchRow.id) == batch.id).values(**values))
        await session.commit()
    for key, value in values.items():
        setattr(batch, key, value)


async def reload(svc: Services, batch_id: str) -> BatchRow:
    async with svc.sessions() as session:
        return await repo.get_batch(session, batch_id)


# ------------------------------------------------------------------------------------------- results


def _outcome_row(outcome: Outcome) -> tuple[Any, ...]:
    """A finished request as ``repo.FINISH_COLUMNS``' values, then its line number."""
    job, result, error = outcome.job, outcome.result, outcome.error
    if result is not None:
        timings = result.timings
        usage = result.body.get("usage") or {}
        content, finish = response_content(result.body)
        prompt_tokens = usage.get("prompt_tokens", usage.get("input_tokens", timings.prompt_tokens))
        completion_tokens = usage.get("completion_tokens", usage.get("output_tokens", timings.completion_tokens))
        details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        return ("succeeded", _request_id(), result.status_code, orjson.dumps(result.body).decode(), None, None,
                content, finish, prompt_tokens, completion_tokens, details.get("reasoning_tokens"),
                outcome.latency_ms, timings.ttft_ms, timings.prompt_ms, timings.decode_ms, timings.load_ms,
                job.num_ctx, outcome.attempts,
                context.looks_truncated(prompt_tokens, job.num_ctx, job.prompt_estimate), outcome.finished_at,
                job.line)
    assert error is not None
    return ("failed", _request_id(), error.status or error.status_code, None, error.code, error.message, None, None,
            None, None, None, outcome.latency_ms, None, None, None, None, job.num_ctx, outcome.attempts, False,
            outcome.finished_at, job.line)


outcome_row = _outcome_row  # a finished request as the store keeps it (pilots store theirs the same way)


@dataclass
class ResultWriter:
    """Buffers outcomes and commits them together (every ``every`` results or ``interval`` seconds).

    Double-buffered: a full buffer is committed in the background while the next one fills, so the engine is not
    kept waiting on the store. Only when a second buffer is full before the first is committed does ``add`` wait
    (back-pressure: memory stays bounded however fast the engine is)."""

    svc: Services
    batch_id: str
    progress: Progress | None = None
    eta: LiveEta | None = None
    buffer: list[tuple[Any, ...]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _writes: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _last: asyncio.Task[None] | None = field(default=None, repr=False)
    _failed: BaseException | None = field(default=None, repr=False)

    async def add(self, outcome: Outcome) -> None:
        row = _outcome_row(outcome)
        self.buffer.append(row)
        if self.eta is not None:
            timings = outcome.result.timings if outcome.result is not None else None
            self.eta.observe(context.output_budget(outcome.job.body), row[repo.COMPLETION_AT],
                             prompt_ms=timings.prompt_ms if timings else None,
                             decode_ms=timings.decode_ms if timings else None)
        if self.progress is not None:
            self.progress.update(1)
        every = self.svc.settings.commit_every
        while len(self.buffer) >= every:
            last = self._last
            if last is None or last.done():
                self._start()
                return
            if len(self.buffer) < 2 * every:
                return  # the commit in flight ends soon; this buffer is next
            await asyncio.shield(last)

    async def flush(self) -> None:
        """Commit what is buffered, after any commit in flight (and raise its error, if it failed)."""
        if self._last is not None:
            await asyncio.shield(self._last)
        if self.buffer or self._failed is not None:
            await asyncio.shield(self._start())

    def _start(self) -> asyncio.Task[None]:
        """Commit the buffer in a task of its own. The write is never cancelled midway: a cancel (the run ending,
        expiry, cancellation) landing mid-transaction would leave the aiosqlite connection holding SQLite's write
        lock until garbage collection, stalling every other writer. Commits run one at a time, in order."""
        if self._failed is not None:
            raise self._failed  # a failed commit (any of them) fails the run
        rows, self.buffer = self.buffer, []
        write = asyncio.ensure_future(self._write(rows))
        self._writes.add(write)
        write.add_done_callback(self._written)
        self._last = write
        return write

    def _written(self, write: asyncio.Task[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None and self._failed is None:
            self._failed = write.exception()

    async def _write(self, rows: list[tuple[Any, ...]]) -> None:
        async with self._lock, self.svc.sessions() as session:
            await repo.finish_requests(session, self.batch_id, rows)
            await session.commit()


class _Cancelled(Exception):
    """Raised inside the run when the batch was asked to cancel (by any process, through the store)."""


async def _watch(svc: Services, writer: ResultWriter, done: asyncio.Event) -> None:
    """Flush on a timer, keep the concurrency story on the batch, and notice a cancel written to the store.

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
            status = (await session.execute(select(col(BatchRow.status)).where(col(BatchRow.id) == writer.batch_id))
                      ).scalar()
            await session.execute(update(BatchRow).where(col(BatchRow.id) == writer.batch_id)
                                  .values(concurrency_json=concurrency_json(svc.pool, writer.started),
                                          eta_json=orjson.dumps(writer.eta.as_dict()).decode() if writer.eta
                                          else None))
            await session.commit()
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


async def _jobs(svc: Services, batch_id: str, model: str, num_ctx: int | None) -> AsyncIterator[Job]:
    async for line, custom_id, url, text, prompt_estimate in repo.iter_pending(svc.sessions, batch_id, model):
        body = orjson.loads(text)
        yield Job(line, custom_id, url, body, context.explicit_num_ctx(body) or num_ctx, prompt_estimate)


async def _execute(svc: Services, batch: BatchRow, *, progress: Progress | None, stream: bool = False) -> None:
    """Run every pending row, one model group after another (fewest model swaps), resuming where rows stand."""
    async with svc.sessions() as session:
        groups = await repo.pending_groups(session, batch.id, context.DEFAULT_OUTPUT_BUDGET)
    writer = ResultWriter(svc, batch.id, progress, eta=await live_eta(svc, batch))
    pool = svc.pool
    for group in groups:
        try:
            info = await pool.route(group.model)
        except errors.PermanentError as exc:
            await _fail_group(svc, batch.id, group.model, exc, progress, group.pending)
            continue
        num_ctx = await _fit_group(svc, batch.id, group, info.context_length, progress)
        await pool.prepare(group.model, num_ctx=num_ctx, parallel=pool.fixed)
        try:
            async with asyncio.TaskGroup() as tasks:
                done = asyncio.Event()
                tasks.create_task(_watch(svc, writer, done))
                runner = tasks.create_task(run_jobs(
                    _jobs(svc, batch.id, group.model, num_ctx), pool, writer.add, policy=svc.policy,
                    model=group.model, stream=stream, cap=batch.concurrency))
                await runner
                done.set()
        finally:
            await asyncio.shield(writer.flush())
            await asyncio.shield(_set(svc, batch, concurrency_json=concurrency_json(pool, writer.started)))
        await _record_loaded_context(svc, batch.id, group.model)


async def live_eta(svc: Services, batch: BatchRow) -> LiveEta:
    """The remaining-time tracker of this run: the pending lines by cap, and the start estimate as its prior."""
    async with svc.sessions() as session:
        caps = await repo.pending_caps(session, batch.id)
    made = orjson.loads(batch.estimate_json) if batch.estimate_json else {}
    groups = made.get("groups") or []
    load = sum(float(g.get("load_seconds") or 0.0) for g in groups)
    lines = sum(int(g.get("num_requests") or 0) for g in groups)
    output = sum(float(g.get("output_tokens_mean") or 0.0) * int(g.get("num_requests") or 0) for g in groups)
    return LiveEta(caps, prior_seconds=max(0.0, float(made["seconds"]) - load) if made.get("seconds") else None,
                   prior_output=output / lines if lines else None)


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
        await repo.fail_pending(session, batch_id, exc.code, exc.message, col(RequestRow.model) == model,
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
        too_long = (col(RequestRow.model) == group.model) & (
            (col(RequestRow.prompt_estimate) >= context_length)
            | (col(RequestRow.prompt_estimate) + func.coalesce(col(RequestRow.max_tokens), 0) > context_length)
        )
        async with svc.sessions() as session:
            failed = await repo.fail_pending(session, batch_id, "context_length_exceeded",
                                    f"The request does not fit the model's context length of {context_length} "
                                    "tokens (prompt estimate plus max_tokens).", too_long)
            await session.commit()
        if progress is not None and failed:
            progress.update(failed)
        async with svc.sessions() as session:
            refreshed = [g for g in await repo.pending_groups(session, batch_id, context.DEFAULT_OUTPUT_BUDGET)
                         if g.model == group.model]
        if refreshed:
            group = refreshed[0]
    return context.fit_num_ctx(group.max_need, context_length).num_ctx


# ----------------------------------------------------------------------------------------- finalising


# What an output line needs of a row, in this order, then its line (not the request body nor the extracted content:
# plain values of these, read through the driver, cost a fraction of a mapped row on a path that runs once per line).
_OUTPUT_COLUMNS = ("custom_id", "state", "request_id", "status_code", "response", "error_code", "error_message",
                   "latency_ms", "ttft_ms", "attempts", "num_ctx", "loaded_context", "truncated")


def _line(row: tuple[Any, ...], pending_code: str | None) -> tuple[bool, bytes]:
    """(is_success, output line) for one row (``_OUTPUT_COLUMNS``' values and its line). A success is the common line
    of a big batch: it is written straight from the row, in ``OutputLine``'s shape and field order, with the body
    stored as JSON text passed through unparsed; the others go through ``OutputLine``."""
    (custom_id, state, request_id, status_code, response, error_code, error_message, latency_ms, ttft_ms, attempts,
     num_ctx, loaded_context, truncated, line) = row
    truncated = bool(truncated)  # SQLite keeps booleans as 0/1
    if state == "succeeded":
        request_id = request_id or _request_id()
        return True, orjson.dumps({
            "id": request_id, "custom_id": custom_id,
            "response": {"status_code": status_code or 200, "request_id": request_id,
                         "body": orjson.Fragment(response or "{}")},
            "error": None,
            "obatch": {"line": line, "latency_ms": latency_ms, "ttft_ms": ttft_ms, "attempts": attempts,
                       "num_ctx": num_ctx, "loaded_context": loaded_context, "truncated": truncated},
        }, option=orjson.OPT_APPEND_NEWLINE)
    if state == "pending":
        code = pending_code or "batch_cancelled"
        message = ("This request could not be executed before the completion window expired."
                   if code == "batch_expired" else "This request was not executed: the batch was cancelled.")
        return False, OutputLine(id=_request_id(), custom_id=custom_id, error=LineError(code=code, message=message),
                                 obatch=LineStats(line=line)).to_jsonl()
    response_body = None
    if status_code:
        kind = "invalid_request_error" if status_code < 500 else "server_error"
        detail = ErrorDetail(message=error_message or "", type=kind, code=error_code)
        response_body = ResponseBody(status_code=status_code, request_id=request_id or _request_id(),
                                     body=ErrorResponse(error=detail).model_dump())
    stats = LineStats(line=line, latency_ms=latency_ms, ttft_ms=ttft_ms, attempts=attempts, num_ctx=num_ctx,
                      loaded_context=loaded_context, truncated=truncated)
    return False, OutputLine(id=request_id or _request_id(), custom_id=custom_id, response=response_body,
                             error=LineError(code=error_code, message=error_message), obatch=stats).to_jsonl()


async def write_results(svc: Services, batch_id: str, output: Path, error: Path,
                        pending_code: str | None = None) -> tuple[int, int]:
    """Write the output and error files from the rows (atomically: temp file, then rename)."""
    await asyncio.to_thread(output.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(error.parent.mkdir, parents=True, exist_ok=True)
    part = f".{uuid.uuid4().hex[:8]}.part"  # unique: a process that lost the lease may still be writing its own
    tmp_out, tmp_err = output.with_suffix(output.suffix + part), error.with_suffix(error.suffix + part)
    out_handle = await asyncio.to_thread(tmp_out.open, "wb")
    err_handle = await asyncio.to_thread(tmp_err.open, "wb")
    counts = [0, 0]
    buffers: tuple[list[bytes], list[bytes]] = ([], [])
    try:
        async for row in repo.iter_values(svc.sessions, batch_id, _OUTPUT_COLUMNS):
            ok, data = _line(row, pending_code)
            buffers[0 if ok else 1].append(data)
            counts[0 if ok else 1] += 1
            if len(buffers[0]) + len(buffers[1]) >= WRITE_CHUNK:
                await asyncio.to_thread(_write_both, out_handle, err_handle, buffers)
        await asyncio.to_thread(_write_both, out_handle, err_handle, buffers)
    finally:
        await asyncio.to_thread(out_handle.close)
        await asyncio.to_thread(err_handle.close)
    await asyncio.to_thread(tmp_out.replace, output)
    await asyncio.to_thread(tmp_err.replace, error)
    return counts[0], counts[1]


def _write_both(out: Any, err: Any, buffers: tuple[list[bytes], list[bytes]]) -> None:
    out.write(b"".join(buffers[0]))
    err.write(b"".join(buffers[1]))
    buffers[0].clear()
    buffers[1].clear()


async def finalize(svc: Services, batch: BatchRow, status: str, *, output: Path | None = None,
                   error: Path | None = None) -> BatchRow:
    """Assemble the result files from the rows and close the batch as ``status``.

    With ``output``/``error`` paths (CLI), results are written there; otherwise they become stored files
    (purpose ``batch_output``) referenced by the batch, each only when it has lines.

    Idempotent, so a crash anywhere in it is repaired by running it again: the result files' ids follow from the
    batch id (a second run overwrites the same files rather than leaving orphans), and their rows are written in
    the same transaction as the batch's final status.
    """
    stamp = int(svc.clock())
    if status == "completed":
        await _set(svc, batch, status="finalizing", finalizing_at=stamp)
    pending_code = NOT_RUN_CODES.get(status)
    fields: dict[str, Any] = {}
    files: list[FileRow] = []
    unused: list[str] = []
    if output is not None and error is not None:
        await write_results(svc, batch.id, output, error, pending_code)
    else:
        out_id, err_id = result_file_id(batch.id, "output"), result_file_id(batch.id, "error")
        out_path, err_path = file_path(svc.settings, out_id), file_path(svc.settings, err_id)
        n_out, n_err = await write_results(svc, batch.id, out_path, err_path, pending_code)
        for file_id, path, n, kind in ((out_id, out_path, n_out, "output"), (err_id, err_path, n_err, "error")):
            if n:
                size = (await asyncio.to_thread(path.stat)).st_size
                expires = stamp + batch.output_expires_after if batch.output_expires_after else None
                files.append(FileRow(id=file_id, owner=batch.owner, filename=f"{batch.id}_{kind}.jsonl",
                                     purpose="batch_output", bytes=size, created_at=stamp, expires_at=expires))
                fields[f"{kind}_file_id"] = file_id
            else:
                unused.append(file_id)
                await asyncio.to_thread(path.unlink, missing_ok=True)
    async with svc.sessions() as session:
        fresh = await repo.get_batch(session, batch.id)
        await repo.recount(session, fresh)
        if pending_code:
            fresh.failed = fresh.total - fresh.completed
        fields.update(total=fresh.total, completed=fresh.completed, failed=fresh.failed,
                      input_tokens=fresh.input_tokens, output_tokens=fresh.output_tokens,
                      reasoning_tokens=fresh.reasoning_tokens)
        fields.update({"status": status, f"{status}_at": stamp})
        for row in files:
            await repo.upsert_file(session, row)
        if unused:
            await session.execute(delete(FileRow).where(col(FileRow.id).in_(unused)))
        await session.execute(update(BatchRow).where(col(BatchRow.id) == batch.id).values(**fields))
        await session.commit()
    for key, value in fields.items():
        setattr(batch, key, value)
    return await reload(svc, batch.id)


def result_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file: fixed by the batch, so finalising twice makes the same file."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------- wire views


def file_object(row: FileRow) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose, status="processed", expires_at=row.expires_at)


NOT_RUN_STATUSES = ("cancelling", "cancelled", "expired")  # whose pending lines will never run


def batch_object(row: BatchRow, *, not_run: int | None = None) -> Batch:
    """A stored batch as OpenAI's Batch object (request_counts and usage live while it runs).

    ``not_run`` (a cancelled or expired batch's lines that never ran, which OpenAI's ``request_counts.failed``
    includes) goes to the ``obatch`` field, so a client can tell them apart from real failures."""
    errors_list = orjson.loads(row.errors_json) if row.errors_json else None
    batch = Batch(
        id=row.id, endpoint=row.endpoint, input_file_id=row.input_file_id,
        completion_window=row.completion_window, created_at=row.created_at, status=row.status,
        errors=BatchErrors(data=[BatchErrorItem(**e) for e in errors_list]) if errors_list else None,
        output_file_id=row.output_file_id, error_file_id=row.error_file_id, in_progress_at=row.in_progress_at,
        expires_at=row.expires_at, finalizing_at=row.finalizing_at, completed_at=row.completed_at,
        failed_at=row.failed_at, expired_at=row.expired_at, cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        request_counts=RequestCounts(total=row.total, completed=row.completed, failed=row.failed),
        metadata=orjson.loads(row.metadata_json) if row.metadata_json else None, model=row.model,
        usage=BatchUsage(input_tokens=row.input_tokens, output_tokens=row.output_tokens,
                         output_tokens_details=OutputTokensDetails(reasoning_tokens=row.reasoning_tokens or 0),
                         total_tokens=row.input_tokens + row.output_tokens),
        obatch=_extension(row),
    )
    if not_run is not None:
        batch.obatch = (batch.obatch or BatchExtension()).model_copy(update={"not_run": not_run})
    return batch


def _extension(row: BatchRow) -> BatchExtension | None:
    """The batch object's ``obatch`` field: how it runs (concurrency), the estimate made at its start and, while it
    runs, the remaining time refined from the lines already finished."""
    extension = BatchExtension(
        concurrency=orjson.loads(row.concurrency_json) if row.concurrency_json else None,
        estimate=DurationEstimate.stored(row.estimate_json) if row.estimate_json else None,
        eta=BatchEta.model_validate_json(row.eta_json) if row.eta_json and row.status in ("in_progress",
                                                                                          "finalizing") else None)
    return extension if extension.model_dump() else None


# -------------------------------------------------------------------------------------------- driving


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
        await _validate_and_import(svc, batch)
        if batch.status == "failed":
            return batch
    if batch.status == "cancelling":
        return await finalize(svc, batch, "cancelled", output=output, error=error)
    if batch.status == "in_progress":
        if batch.started_at is None:  # the estimate is made before the clock starts, and kept to check it
            estimate = None
            if svc.estimator is not None:
                estimate = await svc.estimator(svc.sessions, batch, svc.pool, batch.concurrency or svc.pool.fixed)
            await _set(svc, batch, started_at=svc.clock(), estimate_json=estimate)
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
                await asyncio.shield(_set(svc, batch, run_seconds=batch.run_seconds + time.monotonic() - started))
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
        batch.status, batch.cancelling_at = "cancelling", int(svc.clock())
        session.add(batch)
        await session.commit()
        await session.refresh(batch)
    return batch
