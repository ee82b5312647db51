"""Input files: their bytes stored under ids of ours, their expiry, and a batch's import of its input.

A stored file is bytes on disk (``file_path``) plus a row in the store. Importing checks every line of a batch's
input (``obatch.jsonl``) and writes one pending request row per line, in one pass and off the event loop; a file
with any problem is refused with every problem listed by line, and leaves no rows behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson

from obatch import cache, context, errors, prefix
from obatch.batches.provenance import seed_of
from obatch.batches.services import Services, reload, update_batch
from obatch.config import Settings
from obatch.jsonl import MAX_PROBLEMS, Limits, Request, iter_file
from obatch.store import pilots, repo
from obatch.store.quota import add_file_within
from obatch.store.tables import BatchRow, FileRow

MAX_EXPIRY = 30 * 86400  # OpenAI's longest file expiry
IMPORT_CHUNK = 2000
_ID = re.compile(r"^(file|batch)-[0-9a-f]{24}$")


def file_path(settings: Settings, file_id: str) -> Path:
    """Where a stored file's bytes live. Ids are ours and checked, so no caller text ever reaches the path."""
    if not _ID.match(file_id):
        raise errors.NotFoundError(f"No such file: {file_id}", param="file_id")
    return settings.files_dir / f"{file_id}.jsonl"


def quota_exceeded(quota: int) -> errors.ConfigError:
    return errors.ConfigError(f"This upload would exceed the storage quota of {quota} bytes per API key; delete "
                              "files you no longer need.", code="storage_quota_exceeded", param="file")


def _file_id() -> str:
    """``file-`` and 24 hex digits: 13 of the creation time in microseconds, so that files made within one second
    (``created_at`` is in whole seconds) list in the order they were made, and 11 random ones."""
    return f"file-{time.time_ns() // 1000:013x}{os.urandom(6).hex()[:11]}"


async def store_file(svc: Services, chunks: AsyncIterator[bytes], *, filename: str, purpose: str,
                     owner: str = "", expires_after: int | None = None, quota: int = 0) -> FileRow:
    """Stream bytes to the files folder (size limit enforced while streaming), then record the file; with a
    ``quota``, only if the owner's files stay within it (checked and recorded in one step, see store/quota.py)."""
    file_id = _file_id()
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
        if quota and not await add_file_within(session, row, quota):
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise quota_exceeded(quota)
        if not quota:
            repo.add(session, row)
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
        await repo.delete_file(session, file_id, owner)
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


def _request_row(batch_id: str, request: Request) -> tuple[Any, ...]:
    """A valid line as ``repo.REQUEST_COLUMNS``' values."""
    body = request.body
    return (batch_id, request.line, request.custom_id, request.url, str(body["model"]), orjson.dumps(body).decode(),
            context.estimate_prompt_tokens(request.url, body), context.output_budget(body),
            prefix.prefix_key(request.url, body), context.explicit_num_ctx(body), "pending", 0, False, seed_of(body),
            cache.key(request.url, body))


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


async def validate_and_import(svc: Services, batch: BatchRow) -> None:
    """validating → failed (with every problem) or in_progress with one pending row per line.

    One pass over the file: lines are checked and imported together, and a file with any problem is refused with
    every problem listed and its rows removed. Until the batch is marked imported its rows are not run, so a crash
    mid-import only means importing again."""
    path = file_path(svc.settings, batch.input_file_id)
    limits = Limits.for_clients(svc.settings)
    if batch.source != "api":
        limits.policy = None  # the operator's own runs (CLI, notebook) may tune the engine
    endpoint = batch.endpoint or None
    async with svc.sessions() as session:
        await repo.replace_requests(session, batch.id)
        await repo.set_batch(session, batch.id,  # pilot lines counted by an import cut short
                             completed=0, failed=0, input_tokens=0, output_tokens=0, reasoning_tokens=0)
        await session.commit()
    try:
        handle = await asyncio.to_thread(path.open, "rb")
    except FileNotFoundError:
        gone = errors.LineProblem(None, "file_missing", "The input file is gone.")
        await update_batch(svc, batch, status="failed", failed_at=int(svc.clock()),
                           errors_json=errors.problems_json([gone]))
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
        await update_batch(svc, batch, status="failed", failed_at=int(svc.clock()),
                           errors_json=errors.problems_json(problems))
        return
    async with svc.sessions() as session:
        imported = await repo.count_requests(session, batch.id)
    if imported != total:  # never mark a batch imported (and so completable) with lines missing
        raise errors.ConflictError(f"Batch {batch.id}: imported {imported} of {total} lines; importing again.")
    async with svc.sessions() as session:  # lines a pilot of this very file already ran are not run again
        stored = await repo.find_file(session, batch.input_file_id)
        if stored is not None and stored.sha256 and await pilots.adopt(session, batch.id, batch.owner, stored.sha256):
            await session.commit()
    async with svc.sessions() as session:
        first_url = await repo.first_url(session, batch.id)
    await update_batch(svc, batch, in_progress_at=int(svc.clock()), imported=True, total=total,
                       endpoint=batch.endpoint or first_url or "")
    # Only a batch still validating moves on: a cancel requested meanwhile must not be overwritten.
    async with svc.sessions() as session:
        await repo.start_batch(session, batch.id)
        await session.commit()
    batch.status = (await reload(svc, batch.id)).status

