"""A batch's results: each finished request recorded on its row, the output and error files written from the rows,
the batch closed with its final counts, and the wire views (OpenAI's File and Batch objects) of what is stored.

Results are recorded in buffered commits (``ResultWriter``) and a row takes a result only while it is pending;
the output and error files are written from the rows, atomically, so each input line ends in exactly one of the two
files, once, however often ``finalize`` runs after a crash.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from obatch import context, structured
from obatch.batches import compact, provenance
from obatch.batches.files import file_path
from obatch.batches.services import Progress, Services, reload, update_batch
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
    DeadlinePlan,
    DurationEstimate,
    EngineEntry,
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
from obatch.runner import Outcome
from obatch.store import repo
from obatch.store.tables import BatchRow, FileRow

WRITE_CHUNK = 1000
NOT_RUN_STATUSES = ("cancelling", "cancelled", "expired")  # whose pending lines will never run


def _request_id() -> str:
    return new_id("batch_req", sep="_", length=32, secret=False)


# ------------------------------------------------------------------------------------------- results


def outcome_row(outcome: Outcome, hosts: Mapping[str, int] | None = None) -> tuple[Any, ...]:
    """A finished request as ``repo.FINISH_COLUMNS``' values, then its line number: as the store keeps it (pilots
    store theirs the same way). ``hosts`` numbers the engine hosts (the batch's ``engines_json`` entries)."""
    job, result, error = outcome.job, outcome.result, outcome.error
    if isinstance(error, structured.InvalidOutput):  # an answer, kept, that is not the JSON the line asked for
        result = error.answer
    if result is not None:
        timings = result.timings
        usage = result.body.get("usage") or {}
        content, finish = response_content(result.body)
        prompt_tokens = usage.get("prompt_tokens", usage.get("input_tokens", timings.prompt_tokens))
        completion_tokens = usage.get("completion_tokens", usage.get("output_tokens", timings.completion_tokens))
        details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        refused = error.refused if isinstance(error, structured.InvalidOutput) else result.refused
        return ("succeeded" if error is None else "failed", _request_id(), result.status_code,
                orjson.dumps(result.body).decode(), error and error.code, error and error.message,
                content, finish, prompt_tokens, completion_tokens, details.get("reasoning_tokens"),
                outcome.latency_ms, timings.ttft_ms, timings.prompt_ms, timings.decode_ms, timings.load_ms,
                job.num_ctx, outcome.attempts,
                context.looks_truncated(prompt_tokens, job.num_ctx, job.prompt_estimate), outcome.finished_at,
                _host(hosts, result.host), refused or None, job.line)
    assert error is not None
    return ("failed", _request_id(), error.status or error.status_code, None, error.code, error.message, None, None,
            None, None, None, outcome.latency_ms, None, None, None, None, job.num_ctx, outcome.attempts, False,
            outcome.finished_at, _host(hosts, getattr(error, "host", None)), None, job.line)


def _host(hosts: Mapping[str, int] | None, url: str | None) -> int | None:
    return hosts.get(url) if hosts is not None and url is not None else None


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
    hosts: dict[str, int] = field(default_factory=dict)  # engine host URL -> its entry in the batch's engines_json
    buffer: list[tuple[Any, ...]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _writes: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _last: asyncio.Task[None] | None = field(default=None, repr=False)
    _failed: BaseException | None = field(default=None, repr=False)

    async def add(self, outcome: Outcome) -> None:
        row = outcome_row(outcome, self.hosts)
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



# ----------------------------------------------------------------------------------------- finalising


# What an output line needs of a row, in this order, then its line (not the request body nor the extracted content:
# plain values of these, read through the driver, cost a fraction of a mapped row on a path that runs once per line).
_OUTPUT_COLUMNS = ("custom_id", "state", "request_id", "status_code", "response", "error_code", "error_message",
                   "latency_ms", "ttft_ms", "attempts", "num_ctx", "loaded_context", "truncated", "model", "host",
                   "seed", "refused", "cached_from")


_NO_FACTS = provenance.LineFacts(())


def _line(row: tuple[Any, ...], pending_code: str | None, facts: provenance.LineFacts = _NO_FACTS
          ) -> tuple[bool, bytes]:
    """(is_success, output line) for one row (``_OUTPUT_COLUMNS``' values and its line). A success is the common line
    of a big batch: it is written straight from the row, in ``OutputLine``'s shape and field order, with the body
    stored as JSON text passed through unparsed; the others go through ``OutputLine``. ``facts`` joins in the
    provenance of the host that answered (kept once per batch, not per line)."""
    (custom_id, state, request_id, status_code, response, error_code, error_message, latency_ms, ttft_ms, attempts,
     num_ctx, loaded_context, truncated, model, host, seed, refused, cached_from, line) = row
    truncated = bool(truncated)  # SQLite keeps booleans as 0/1
    host_url, engine, engine_version, model_digest = facts(host, model)
    if state == "succeeded":
        request_id = request_id or _request_id()
        return True, orjson.dumps({
            "id": request_id, "custom_id": custom_id,
            "response": {"status_code": status_code or 200, "request_id": request_id,
                         "body": orjson.Fragment(response or "{}")},
            "error": None,
            "obatch": {"line": line, "latency_ms": latency_ms, "ttft_ms": ttft_ms, "attempts": attempts,
                       "num_ctx": num_ctx, "loaded_context": loaded_context, "truncated": truncated,
                       "host": host_url, "engine": engine, "engine_version": engine_version,
                       "model_digest": model_digest, "seed": seed, "refused_answers": refused,
                       "cached_from": orjson.Fragment(cached_from) if cached_from else None},
        }, option=orjson.OPT_APPEND_NEWLINE)
    if state == "pending":
        code = pending_code or "batch_cancelled"
        message = ("This request could not be executed before the completion window expired."
                   if code == "batch_expired" else "This request was not executed: the batch was cancelled.")
        return False, OutputLine(id=_request_id(), custom_id=custom_id, error=LineError(code=code, message=message),
                                 obatch=LineStats(line=line, seed=seed)).to_jsonl()
    response_body = None
    if response is not None:  # an answer kept with its error (invalid_output): as the engine gave it
        response_body = ResponseBody(status_code=status_code or 200, request_id=request_id or _request_id(),
                                     body=orjson.Fragment(response))
    elif status_code:
        kind = "invalid_request_error" if status_code < 500 else "server_error"
        detail = ErrorDetail(message=error_message or "", type=kind, code=error_code)
        response_body = ResponseBody(status_code=status_code, request_id=request_id or _request_id(),
                                     body=ErrorResponse(error=detail).model_dump())
    stats = LineStats(line=line, latency_ms=latency_ms, ttft_ms=ttft_ms, attempts=attempts, num_ctx=num_ctx,
                      loaded_context=loaded_context, truncated=truncated, host=host_url, engine=engine,
                      engine_version=engine_version, model_digest=model_digest, seed=seed, refused_answers=refused)
    return False, OutputLine(id=request_id or _request_id(), custom_id=custom_id, response=response_body,
                             error=LineError(code=error_code, message=error_message), obatch=stats).to_jsonl()


OUTPUT_COLUMNS = _OUTPUT_COLUMNS  # what ``line_bytes`` takes of a row (then its line), for readers of live results


def line_bytes(batch_id: str, row: tuple[Any, ...], pending_code: str | None,
               facts: provenance.LineFacts = _NO_FACTS) -> tuple[bool, bytes]:
    """(is_success, output line) for one row (``OUTPUT_COLUMNS``' values and its line), the same bytes each time it
    is made: a line without an id of its own (never run, or failed before it reached an engine) takes one that
    follows from its batch and line, so a line read while the batch runs is the line its file later holds."""
    if row[2] is None:
        digest = hashlib.sha256(f"{batch_id}:{row[-1]}".encode()).hexdigest()[:32]
        row = (*row[:2], f"batch_req_{digest}", *row[3:])
    return _line(row, pending_code, facts)


READ_COLUMNS = (*_OUTPUT_COLUMNS, *compact.INDEX)  # what ``output_lines`` takes of a row (then its line)


async def output_lines(batch: BatchRow, rows: Sequence[tuple[Any, ...]], pending_code: str | None,
                       facts: provenance.LineFacts = _NO_FACTS) -> list[tuple[bool, bytes]]:
    """(is_success, output line) for rows of ``READ_COLUMNS`` (then the line): a compacted row's line as its file
    holds it (``compact.stored_lines``), the others made by ``line_bytes``."""
    size = len(_OUTPUT_COLUMNS)
    stored = await compact.stored_lines(batch, rows, state=1, custom_id=0, offset=size)
    return [(row[1] == "succeeded", data) if data is not None
            else line_bytes(batch.id, (*row[:size], row[-1]), pending_code, facts)
            for row, data in zip(rows, stored, strict=True)]


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
    async with svc.sessions() as session:
        batch = await repo.get_batch(session, batch_id)
    facts = provenance.LineFacts(provenance.entries_of(batch))
    rows: list[tuple[Any, ...]] = []

    async def write(rows: list[tuple[Any, ...]]) -> None:
        for ok, data in await output_lines(batch, rows, pending_code, facts):
            buffers[0 if ok else 1].append(data)
            counts[0 if ok else 1] += 1
        rows.clear()
        await asyncio.to_thread(_write_both, out_handle, err_handle, buffers)

    try:
        async for row in repo.iter_values(svc.sessions, batch_id, READ_COLUMNS):
            rows.append(row)
            if len(rows) >= WRITE_CHUNK:
                await write(rows)
        await write(rows)
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
        await update_batch(svc, batch, status="finalizing", finalizing_at=stamp)
    pending_code = NOT_RUN_CODES.get(status)
    fields: dict[str, Any] = {}
    files: list[FileRow] = []
    unused: list[str] = []
    if output is not None and error is not None:
        await write_results(svc, batch.id, output, error, pending_code)
        if compact.owned(svc.settings.data_dir, output, error):
            await compact.compact(svc, batch.id, output, error)
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
        await compact.compact(svc, batch.id, out_path, err_path)
    async with svc.sessions() as session:
        fresh = await repo.get_batch(session, batch.id)
        await repo.recount(session, fresh)
        if pending_code:
            fresh.failed = fresh.total - fresh.completed
        invalid_output, refused_answers = await repo.structured_counts(session, batch.id)
        fields.update(total=fresh.total, completed=fresh.completed, failed=fresh.failed,
                      input_tokens=fresh.input_tokens, output_tokens=fresh.output_tokens,
                      reasoning_tokens=fresh.reasoning_tokens, invalid_output=invalid_output,
                      refused_answers=refused_answers)
        fields.update({"status": status, f"{status}_at": stamp})
        for row in files:
            await repo.upsert_file(session, row)
        if unused:
            await repo.delete_files(session, unused)
        await repo.set_batch(session, batch.id, **fields)
        await session.commit()
    await compact.release(svc)
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


def batch_object(row: BatchRow, *, not_run: int | None = None, retries: list[str] | None = None) -> Batch:
    """A stored batch as OpenAI's Batch object (request_counts and usage live while it runs).

    ``not_run`` (a cancelled or expired batch's lines that never ran, which OpenAI's ``request_counts.failed``
    includes) goes to the ``obatch`` field, so a client can tell them apart from real failures; so do ``retries``,
    the batches made of this one's failed lines."""
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
    if retries:
        batch.obatch = (batch.obatch or BatchExtension()).model_copy(update={"retries": retries})
    return batch


def _extension(row: BatchRow) -> BatchExtension:
    """The batch object's ``obatch`` field: how it runs (concurrency), the estimate made at its start and, while it
    runs, the remaining time refined from the lines already finished; obatch's version, the engine hosts it ran on
    (``engines``: version and model digests, what a line's ``obatch.host`` refers to), and once final the
    structured-output counts."""
    final = row.status in FINAL_STATUSES
    return BatchExtension(
        version=provenance.obatch_version(),
        engines=[EngineEntry.model_validate(e) for e in provenance.entries_of(row)] or None,
        invalid_output=row.invalid_output if final else None,
        refused_answers=row.refused_answers if final else None,
        concurrency=orjson.loads(row.concurrency_json) if row.concurrency_json else None,
        schedule=orjson.loads(row.schedule_json) if row.schedule_json else None,
        deadline=DeadlinePlan.model_validate_json(row.plan_json) if row.plan_json else None,
        estimate=DurationEstimate.stored(row.estimate_json) if row.estimate_json else None,
        eta=BatchEta.model_validate_json(row.eta_json) if row.eta_json and row.status in ("in_progress",
                                                                                          "finalizing") else None,
        parent=row.parent_id, cached=row.cached)
