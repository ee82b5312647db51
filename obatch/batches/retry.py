"""Retry only what failed: a new batch of the lines whose latest outcome is a failure a retry can change.

The lines are those of the whole chain the batch belongs to, each at its latest outcome (``reading``), so retrying
again after a retry takes only what still fails. By default that is what the engine side caused (errors, timeouts,
refused connections, a busy or rate-limited engine: ``errors.TransientError``'s codes) and what a cancel or an
expiry left unrun; a line the engine refused (an invalid request, an unknown model, a context too long) stays as it
is unless its code is asked for. The new batch is an ordinary batch with its own input file, linked to the batch
it was made from (``parent_id``); it runs with the parent's options.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import orjson

from obatch import errors
from obatch.batches import reading
from obatch.batches.files import delete_file, store_file
from obatch.batches.lifecycle import create_batch
from obatch.batches.services import Services
from obatch.protocol import FINAL_STATUSES, NOT_RUN_CODES
from obatch.store import chains
from obatch.store.tables import BatchRow

RETRYABLE_CODES: frozenset[str] = frozenset({
    errors.TransientError.code, errors.ServerBusyError.code, errors.BackendTimeout.code, *NOT_RUN_CODES.values()})
"""What a retry takes by default: engine errors, connection faults, a busy or rate-limited engine, timeouts, and
lines never run (batch_cancelled, batch_expired)."""
MAX_CODES, MAX_CODE_LENGTH = 32, 64
_COLUMNS = ("custom_id", "state", "error_code", "url", "body")
_CHUNK = 1000


def retry_codes(codes: Iterable[str] | None) -> frozenset[str]:
    """The error codes to retry: ``codes`` (checked) instead of the default ``RETRYABLE_CODES``."""
    if codes is None:
        return RETRYABLE_CODES
    chosen = [c.strip() for c in codes]
    if not chosen or len(chosen) > MAX_CODES or any(not c or len(c) > MAX_CODE_LENGTH or not c.isprintable()
                                                    for c in chosen):
        raise errors.ConfigError(f"codes must hold 1 to {MAX_CODES} error codes of at most {MAX_CODE_LENGTH} "
                                 "printable characters.", code="invalid_value", param="codes")
    return frozenset(chosen)


async def unfinished_retry(svc: Services, batch_id: str, owner: str | None = None) -> BatchRow | None:
    """A retry in the batch's chain that has not reached a final status (a run interrupted midway), if any."""
    async with svc.sessions() as session:
        family = await chains.chain(session, batch_id, owner, fresh=True)
    return next((b for b in family if b.parent_id is not None and b.status not in FINAL_STATUSES), None)


async def create_retry(svc: Services, batch_id: str, *, owner: str | None = None,
                       codes: Iterable[str] | None = None) -> BatchRow:
    """A new batch of the chain's lines whose latest outcome failed with one of ``codes`` (default: those a retry
    can change), made from ``batch_id`` and run with its options. ``NotFoundError`` for a batch that is not there
    (or not the owner's); ``ConflictError`` while a batch of its chain is not final, or when no line qualifies."""
    wanted = retry_codes(codes)
    async with svc.sessions() as session:
        family = await chains.chain(session, batch_id, owner, fresh=True)
    running = [b for b in family if b.status not in FINAL_STATUSES]
    if running:
        raise errors.ConflictError(f"Batch {running[0].id} of this chain is {running[0].status}; a retry is made once "
                                   "every batch of the chain is final.")
    parent = next(b for b in family if b.id == batch_id)
    count = 0

    async def lines() -> AsyncIterator[bytes]:
        nonlocal count
        chunk: list[bytes] = []
        async for batch, (custom_id, state, error_code, url, body, _line) in reading.iter_finished(
                svc.sessions, batch_id, _COLUMNS, owner=owner, merged=True):
            code = error_code if state == "failed" else reading.not_run_code(batch) if state == "pending" else None
            if code in wanted:
                chunk.append(orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                                           "body": orjson.Fragment(body)}, option=orjson.OPT_APPEND_NEWLINE))
                count += 1
            if len(chunk) >= _CHUNK:
                yield b"".join(chunk)
                chunk.clear()
        if chunk:
            yield b"".join(chunk)

    stored = await store_file(svc, lines(), filename=f"{parent.id}_retry.jsonl", purpose="batch", owner=parent.owner)
    if not count:
        await delete_file(svc, stored.id)
        asked = ", ".join(sorted(wanted))
        raise errors.ConflictError(f"Batch {batch_id} has no line whose latest outcome failed with {asked}; "
                                   "nothing to retry.")
    return await create_batch(
        svc, input_file_id=stored.id, endpoint=parent.endpoint or None, completion_window=parent.completion_window,
        metadata=orjson.loads(parent.metadata_json) if parent.metadata_json else None, owner=parent.owner,
        model=parent.model, source=parent.source, concurrency=parent.concurrency,
        output_expires_after=parent.output_expires_after, output_retries=parent.output_retries, parent_id=parent.id)
