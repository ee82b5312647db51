"""Repository functions: every query of the batch tables, each taking the session (or session factory) it runs in.

The rest of obatch asks the store through these functions and never builds SQL itself (a test holds the layers to
it); the benchmark tables' queries are in ``bench_repo``, the pilot lines' in ``pilots``, the response cache's in
``cache_repo``, the batch leases' in ``leases`` and the storage quota's in ``quota``. Functions that write
leave the commit to the caller, which decides what one transaction holds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.errors import LineProblem, NotFoundError, problems_json
from obatch.store.db import Sessions
from obatch.store.tables import BatchRow, FileRow, RequestRow

PAGE = 500


async def get_file(session: AsyncSession, file_id: str, owner: str | None = None) -> FileRow:
    row = await session.get(FileRow, file_id)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(f"No such file: {file_id}", param="file_id")
    return row


async def find_file(session: AsyncSession, file_id: str) -> FileRow | None:
    return await session.get(FileRow, file_id)


def add(session: AsyncSession, row: FileRow | BatchRow) -> None:
    """Keep a new file or batch row (written at the caller's commit)."""
    session.add(row)


async def delete_file(session: AsyncSession, file_id: str, owner: str | None = None) -> None:
    """Remove a file's row (``NotFoundError`` when it is not there, or not the owner's)."""
    await session.delete(await get_file(session, file_id, owner))


async def delete_files(session: AsyncSession, file_ids: Sequence[str]) -> None:
    """Remove these files' rows, those that exist."""
    await session.execute(delete(FileRow).where(col(FileRow.id).in_(list(file_ids))))


async def stored_bytes(session: AsyncSession, owner: str) -> int:
    """The bytes of every file an owner keeps (inputs and batch outputs): what counts against a storage quota."""
    statement = select(func.coalesce(func.sum(col(FileRow.bytes)), 0)).where(col(FileRow.owner) == owner)
    return int((await session.execute(statement)).scalar() or 0)


async def get_batch(session: AsyncSession, batch_id: str, owner: str | None = None, *, fresh: bool = False
                    ) -> BatchRow:
    """A batch's row; ``fresh`` reads it again from the database even when this session holds it already."""
    row = await session.get(BatchRow, batch_id, populate_existing=fresh)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(f"No such batch: {batch_id}", param="batch_id")
    return row


async def find_batch(session: AsyncSession, batch_id: str) -> BatchRow | None:
    """A batch's row, or None when there is none."""
    return await session.get(BatchRow, batch_id)


async def next_seq(session: AsyncSession) -> int:
    """The next creation number. On PostgreSQL, servers creating batches at once take turns (a transaction lock held
    until the caller commits), so no two batches share a number."""
    if _dialect(session).name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(4242424243)"))
    current = (await session.execute(select(func.max(col(BatchRow.seq))))).one()
    return int(current[0] or 0) + 1


async def set_batch(session: AsyncSession, batch_id: str, **values: Any) -> None:
    """Write fields of a batch's row."""
    await session.execute(update(BatchRow).where(col(BatchRow.id) == batch_id).values(**values))


async def batch_status(session: AsyncSession, batch_id: str) -> str | None:
    """A batch's status as stored now (None when there is no such batch)."""
    return (await session.execute(select(col(BatchRow.status)).where(col(BatchRow.id) == batch_id))).scalar()


async def start_batch(session: AsyncSession, batch_id: str) -> None:
    """validating → in_progress; a batch in any other status (a cancel requested meanwhile) keeps it."""
    await session.execute(update(BatchRow).where(col(BatchRow.id) == batch_id, col(BatchRow.status) == "validating")
                          .values(status="in_progress"))


async def delete_batch(session: AsyncSession, batch_id: str) -> None:
    from obatch.store import finished

    await finished.forget(session, batch_id)
    await session.execute(delete(BatchRow).where(col(BatchRow.id) == batch_id))


async def find_resumable(session: AsyncSession, signature: str) -> BatchRow | None:
    """The newest unfinished batch started with the same input and options (CLI / notebook resume)."""
    statement = (
        select(BatchRow)
        .where(col(BatchRow.signature) == signature)
        .where(col(BatchRow.status).in_(("validating", "in_progress", "finalizing", "cancelling")))
        .order_by(col(BatchRow.seq).desc())
        .limit(1)
    )
    return (await session.execute(statement)).scalars().first()


async def replace_requests(session: AsyncSession, batch_id: str) -> None:
    """Forget a partial import (a crash mid-import) before importing again."""
    await session.execute(delete(RequestRow).where(col(RequestRow.batch_id) == batch_id))


async def count_requests(session: AsyncSession, batch_id: str) -> int:
    """How many request rows a batch has (what its import wrote)."""
    statement = select(func.count()).select_from(RequestRow).where(col(RequestRow.batch_id) == batch_id)
    return int((await session.execute(statement)).scalar() or 0)


async def first_url(session: AsyncSession, batch_id: str) -> str | None:
    """The endpoint of a batch's first line (a batch created without one takes it)."""
    statement = (select(col(RequestRow.url)).where(col(RequestRow.batch_id) == batch_id)
                 .order_by(col(RequestRow.line)).limit(1))
    return (await session.execute(statement)).scalar()


# The columns a new request row is written with, in the order ``insert_requests`` takes its values.
REQUEST_COLUMNS = ("batch_id", "line", "custom_id", "url", "model", "body", "prompt_estimate", "max_tokens",
                   "prefix_key", "own_num_ctx", "state", "attempts", "truncated", "seed", "cache_key")


async def insert_requests(session: AsyncSession, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert request rows (``REQUEST_COLUMNS``' values each) through the driver's executemany."""
    if rows:
        connection = await session.connection()
        await connection.exec_driver_sql(_insert_sql(_dialect(session).paramstyle), list(rows))


def _marks(paramstyle: str, n: int) -> list[str]:
    """``n`` parameter placeholders in the driver's own style (SQLite's ``?``, asyncpg's ``$1``…)."""
    if paramstyle == "numeric_dollar":
        return [f"${i}" for i in range(1, n + 1)]
    if paramstyle == "numeric":
        return [f":{i}" for i in range(1, n + 1)]
    return ["%s"] * n if paramstyle in ("format", "pyformat") else ["?"] * n


@functools.cache
def _insert_sql(paramstyle: str) -> str:
    marks = ", ".join(_marks(paramstyle, len(REQUEST_COLUMNS)))
    return f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({marks})"


@dataclass(slots=True)
class Group:
    model: str
    pending: int
    max_prompt_estimate: int
    max_need: int


async def pending_groups(session: AsyncSession, batch_id: str, default_budget: int) -> list[Group]:
    """Pending requests per model, with the longest prompt + output budget: one num_ctx per group."""
    need = col(RequestRow.prompt_estimate) + func.coalesce(col(RequestRow.max_tokens), default_budget)
    statement = (
        select(col(RequestRow.model), func.count(), func.max(col(RequestRow.prompt_estimate)), func.max(need))
        .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.state) == "pending")
        .group_by(col(RequestRow.model))
        .order_by(col(RequestRow.model))
    )
    rows = (await session.execute(statement)).all()
    return [Group(model=m, pending=n, max_prompt_estimate=p or 0, max_need=x or 0) for m, n, p, x in rows]


# What a job needs of a pending row, in this order: line, custom_id, url, body (JSON text), prompt_estimate.
PendingRow = tuple[int, str, str, str, int]


async def iter_pending(sessions: Sessions, batch_id: str, model: str) -> AsyncIterator[PendingRow]:
    """Pending rows of one model in line order, a page at a time (keyset pagination, one short session each).

    Plain tuples from the driver, not ORM objects nor SQLAlchemy's named rows: this is the hot path of a batch, and
    building and reading a mapped row per line cost more than the query."""
    async for row in _keyset(sessions, _PENDING_SQL, PAGE, batch_id, model):
        yield row


async def _keyset(sessions: Sessions, sql: str, size: int, *params: Any) -> AsyncIterator[Any]:
    """The rows of ``sql`` (its last parameter: the line after which a page starts; the line its rows' first
    column), ``size`` at a time."""
    last = 0
    while True:
        page: list[Any] = await _page(sessions, sql, *params, last)
        for row in page:
            yield row
        if len(page) < size:
            return
        last = page[-1][0]


_PENDING_SQL = ("SELECT line, custom_id, url, body, prompt_estimate FROM requests WHERE batch_id={} AND model={} "
                "AND state='pending' AND line>{} ORDER BY line LIMIT " + str(PAGE))


# What the scheduler knows of a pending row before it is picked: line, prefix_key, prompt_estimate, max_tokens,
# own_num_ctx.
PendingKey = tuple[int, int | None, int, int | None, int | None]


async def iter_pending_keys(sessions: Sessions, batch_id: str, model: str) -> AsyncIterator[PendingKey]:
    """Pending rows of one model in line order, without their bodies (``obatch.schedule``'s lookahead)."""
    async for row in _keyset(sessions, _PENDING_KEYS_SQL, KEY_PAGE, batch_id, model):
        yield row


KEY_PAGE = 20_000
_PENDING_KEYS_SQL = ("SELECT line, prefix_key, prompt_estimate, max_tokens, own_num_ctx FROM requests WHERE "
                     "batch_id={} AND model={} AND state='pending' AND line>{} ORDER BY line LIMIT " + str(KEY_PAGE))


async def pending_rows(sessions: Sessions, batch_id: str, lines: Sequence[int]) -> list[PendingRow]:
    """The rows of ``lines`` that are still pending (``PendingRow``s, in line order): the bodies of picked lines."""
    if not lines:
        return []
    marks = ", ".join(["{}"] * len(lines))
    sql = ("SELECT line, custom_id, url, body, prompt_estimate FROM requests WHERE batch_id={} AND state='pending' "
           f"AND line IN ({marks}) ORDER BY line")
    return await _page(sessions, sql, batch_id, *lines)


async def prefix_group_counts(session: AsyncSession, batch_id: str) -> tuple[int, int]:
    """(groups, lines in them): the prefix keys a batch's rows share with at least one other row."""
    shared = (select(func.count().label("n")).where(col(RequestRow.batch_id) == batch_id,
                                                     col(RequestRow.prefix_key).is_not(None))
              .group_by(col(RequestRow.prefix_key)).having(func.count() > 1).subquery())
    statement = select(func.count(), func.coalesce(func.sum(shared.c.n), 0)).select_from(shared)
    row = (await session.execute(statement)).one()
    return int(row[0] or 0), int(row[1] or 0)


async def iter_values(sessions: Sessions, batch_id: str, columns: Sequence[str]) -> AsyncIterator[tuple[Any, ...]]:
    """Every row of a batch in line order as plain tuples of ``columns`` (names of ``requests``' columns), then the
    line number; a page at a time. The values are the driver's own (SQLite gives booleans as 0/1). A finished
    line moved out of ``requests`` is among them, with only what its narrow row keeps (``finished.rows_sql``)."""
    from obatch.store import finished

    sql = finished.rows_sql(columns, PAGE)
    last = 0
    while True:
        page = await _page(sessions, sql, *finished.rows_params(batch_id, last))
        for row in page:
            yield row
        if len(page) < PAGE:
            return
        last = page[-1][-1]


async def _page(sessions: Sessions, sql: str, *params: Any) -> list[Any]:
    """One page of ``sql`` (``{}`` where its parameters go) run through the driver in a short session of its own."""
    async with sessions() as session:
        dialect = _dialect(session)
        connection = await session.connection()
        statement = sql.format(*_marks(dialect.paramstyle, len(params)))
        return list((await connection.exec_driver_sql(statement, params)).all())


async def iter_rows(sessions: Sessions, batch_id: str, columns: Sequence[str] | None = None
                    ) -> AsyncIterator[Any]:
    """Every row of a batch in line order, a page at a time: the named ``columns`` of ``requests`` then the line
    (``iter_values``: moved lines among them), or the mapped row then the line (rows still in ``requests``)."""
    if columns:
        async for values in iter_values(sessions, batch_id, columns):
            yield values
        return
    last = 0
    cols = [getattr(RequestRow, name) for name in columns] if columns else [RequestRow]
    while True:
        async with sessions() as session:
            statement = (select(*cols, col(RequestRow.line))
                         .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.line) > last)
                         .order_by(col(RequestRow.line)).limit(PAGE))
            page = list((await session.execute(statement)).all())
        for row in page:
            yield row
        if len(page) < PAGE:
            return
        last = page[-1][-1]


# The columns a finished request writes, in the order ``finish_requests`` takes its values.
FINISH_COLUMNS = (
    "state", "request_id", "status_code", "response", "error_code", "error_message", "content", "finish_reason",
    "prompt_tokens", "completion_tokens", "reasoning_tokens", "latency_ms", "ttft_ms", "engine_prompt_ms",
    "engine_decode_ms", "engine_load_ms", "num_ctx", "attempts", "truncated", "finished_at", "host", "refused",
)
_STATE, _PROMPT, _COMPLETION, _REASONING = (FINISH_COLUMNS.index(c) for c in (
    "state", "prompt_tokens", "completion_tokens", "reasoning_tokens"))
COMPLETION_AT = _COMPLETION  # where a finished row (``FINISH_COLUMNS`` order) holds its completion tokens
REUSED_COLUMNS = (*FINISH_COLUMNS, "cached_from")  # a result that is another line's stored answer


@functools.cache
def _finish_sql(paramstyle: str, columns: tuple[str, ...] = FINISH_COLUMNS) -> str:
    """The UPDATE that records a result, in the driver's own parameter style: the values go to the driver's
    executemany as plain tuples (SQLAlchemy's per-row processing of named parameters cost more than the write)."""
    marks = _marks(paramstyle, len(columns) + 2)
    sets = ", ".join(f"{column}={mark}" for column, mark in zip(columns, marks, strict=False))
    return f"UPDATE requests SET {sets} WHERE batch_id={marks[-2]} AND line={marks[-1]} AND state='pending'"


async def finish_requests(session: AsyncSession, batch_id: str, results: Sequence[tuple[Any, ...]], *,
                          reused: bool = False) -> None:
    """Record finished requests: each result is ``FINISH_COLUMNS``' values, then the line number. Only a
    still-pending row takes a result, so a line is never finished twice; the batch's live counters move by the rows
    that actually changed. ``reused``: each result has the ``cached_from`` of an answer taken from another line
    before its line number (``REUSED_COLUMNS``)."""
    succeeded = [r for r in results if r[_STATE] == "succeeded"]
    failed = [r for r in results if r[_STATE] != "succeeded"]
    done = {"succeeded": 0, "failed": 0}
    dialect = _dialect(session)
    exact_rowcount = dialect.supports_sane_multi_rowcount
    connection = await session.connection()
    for state, group in (("succeeded", succeeded), ("failed", failed)):
        if group and not exact_rowcount:
            group = await _still_pending(session, batch_id, group)
        if group:
            params = [(*r[:-1], batch_id, r[-1]) for r in group]
            sql = _finish_sql(dialect.paramstyle, REUSED_COLUMNS if reused else FINISH_COLUMNS)
            outcome = await connection.exec_driver_sql(sql, params)
            done[state] = max(outcome.rowcount, 0) if exact_rowcount else len(group)
    tokens_in = sum(r[_PROMPT] or 0 for r in succeeded)
    tokens_out = sum(r[_COMPLETION] or 0 for r in succeeded)
    tokens_reasoning = sum(r[_REASONING] or 0 for r in succeeded)
    await session.execute(
        update(BatchRow).where(col(BatchRow.id) == batch_id).values(
            completed=col(BatchRow.completed) + done["succeeded"], failed=col(BatchRow.failed) + done["failed"],
            input_tokens=col(BatchRow.input_tokens) + tokens_in, output_tokens=col(BatchRow.output_tokens) + tokens_out,
            reasoning_tokens=col(BatchRow.reasoning_tokens) + tokens_reasoning,
            **({"cached": col(BatchRow.cached) + done["succeeded"] + done["failed"]} if reused else {}),
        )
    )


def _dialect(session: AsyncSession) -> Any:
    bind = session.get_bind()
    return bind.dialect


async def _still_pending(session: AsyncSession, batch_id: str, group: list[tuple[Any, ...]]
                         ) -> list[tuple[Any, ...]]:
    """The results whose rows are still pending, their rows locked until commit. For drivers that cannot count the
    rows an executemany changed (asyncpg), so the live counters still move by what really changed."""
    lines = [r[-1] for r in group]
    statement = (select(col(RequestRow.line))
                 .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.line).in_(lines),
                        col(RequestRow.state) == "pending")
                 .with_for_update())
    pending = set((await session.execute(statement)).scalars().all())
    return [r for r in group if r[-1] in pending]


async def fail_pending(session: AsyncSession, batch_id: str, code: str, message: str, *, model: str,
                       status: int = 400, context_length: int | None = None) -> int:
    """Fail a model's pending rows at once (the model is unknown), or with ``context_length`` only those that cannot
    fit it (prompt estimate, plus max_tokens when set, past it); returns how many."""
    where = [col(RequestRow.model) == model]
    if context_length is not None:
        estimate = col(RequestRow.prompt_estimate)
        where.append((estimate >= context_length)
                     | (estimate + func.coalesce(col(RequestRow.max_tokens), 0) > context_length))
    statement = update(RequestRow).where(
        col(RequestRow.batch_id) == batch_id, col(RequestRow.state) == "pending", *where
    ).values(state="failed", error_code=code, error_message=message, status_code=status, finished_at=time.time())
    outcome: CursorResult[Any] = await session.execute(statement)  # type: ignore[assignment]
    count = int(max(outcome.rowcount, 0))
    await session.execute(
        update(BatchRow).where(col(BatchRow.id) == batch_id).values(failed=col(BatchRow.failed) + count)
    )
    return count


async def recount(session: AsyncSession, batch: BatchRow) -> None:
    """Exact counters and usage from the rows (at finalisation), the lines answered by reuse included."""
    statement = (
        select(col(RequestRow.state), func.count(), func.sum(col(RequestRow.prompt_tokens)),
               func.sum(col(RequestRow.completion_tokens)), func.sum(col(RequestRow.reasoning_tokens)),
               func.count(col(RequestRow.cached_from)))
        .where(col(RequestRow.batch_id) == batch.id).group_by(col(RequestRow.state))
    )
    from obatch.store import finished

    found = (await session.execute(statement)).all()
    counts = {state: (n, p or 0, c or 0, r or 0) for state, n, p, c, r, _ in found}
    moved = await finished.counts(session, batch.id)  # succeeded lines moved out of requests
    batch.cached = sum(int(reused) for *_, reused in found) + moved[4]
    kept = counts.get("succeeded", (0, 0, 0, 0))
    succeeded = counts["succeeded"] = (kept[0] + moved[0], kept[1] + moved[1], kept[2] + moved[2], kept[3] + moved[3])
    batch.completed = succeeded[0]
    batch.failed = counts.get("failed", (0, 0, 0, 0))[0]
    batch.input_tokens = succeeded[1]
    batch.output_tokens = succeeded[2]
    batch.reasoning_tokens = succeeded[3]
    batch.total = sum(v[0] for v in counts.values())


async def structured_counts(session: AsyncSession, batch_id: str) -> tuple[int, int]:
    """(lines that ended as invalid_output, answers the structured-output check refused) of a batch."""
    statement = select(func.count().filter(col(RequestRow.error_code) == "invalid_output"),
                       func.coalesce(func.sum(col(RequestRow.refused)), 0)).where(col(RequestRow.batch_id) == batch_id)
    invalid, refused = (await session.execute(statement)).one()
    return int(invalid or 0), int(refused or 0)


# ------------------------------------------------------------------------------- server: lists, worker, metrics

ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


async def list_batches(session: AsyncSession, *, owner: str | None = None, after: str | None = None,
                       limit: int = 20) -> tuple[list[BatchRow], bool]:
    """A page of batches, newest first (by ``seq``), starting after the batch ``after``; and whether more follow."""
    statement = select(BatchRow).order_by(col(BatchRow.seq).desc()).limit(limit + 1)
    if owner is not None:
        statement = statement.where(col(BatchRow.owner) == owner)
    if after:
        cursor = await get_batch(session, after, owner)
        statement = statement.where(col(BatchRow.seq) < cursor.seq)
    rows = list((await session.execute(statement)).scalars().all())
    return rows[:limit], len(rows) > limit


async def list_files(session: AsyncSession, *, owner: str | None = None, after: str | None = None,
                     limit: int = 100, purpose: str | None = None, ascending: bool = False
                     ) -> tuple[list[FileRow], bool]:
    """A page of files ordered by (created_at, id), newest first unless ``ascending``; and whether more follow."""
    created, ident = col(FileRow.created_at), col(FileRow.id)
    order = (created.asc(), ident.asc()) if ascending else (created.desc(), ident.desc())
    statement = select(FileRow).order_by(*order).limit(limit + 1)
    if owner is not None:
        statement = statement.where(col(FileRow.owner) == owner)
    if purpose:
        statement = statement.where(col(FileRow.purpose) == purpose)
    if after:
        cursor = await get_file(session, after, owner)
        if ascending:
            statement = statement.where((created > cursor.created_at)
                                        | ((created == cursor.created_at) & (ident > cursor.id)))
        else:
            statement = statement.where((created < cursor.created_at)
                                        | ((created == cursor.created_at) & (ident < cursor.id)))
    rows = list((await session.execute(statement)).scalars().all())
    return rows[:limit], len(rows) > limit


async def set_file_purpose(session: AsyncSession, file_id: str, purpose: str) -> None:
    await session.execute(update(FileRow).where(col(FileRow.id) == file_id).values(purpose=purpose))


async def set_file_expiry(session: AsyncSession, file_id: str, expires_at: int) -> None:
    await session.execute(update(FileRow).where(col(FileRow.id) == file_id).values(expires_at=expires_at))


async def active_batch_ids(session: AsyncSession, *, source: str | None = "api") -> list[str]:
    """Batches not yet in a final status, oldest first (what a server's worker must drive)."""
    statement = (select(col(BatchRow.id)).where(col(BatchRow.status).in_(ACTIVE_STATUSES))
                 .order_by(col(BatchRow.seq)))
    if source is not None:
        statement = statement.where(col(BatchRow.source) == source)
    return list((await session.execute(statement)).scalars().all())


async def mark_failed(session: AsyncSession, batch_id: str, code: str, message: str, at: int) -> None:
    """Give up on a batch that cannot be driven (it must not stay active for ever)."""
    problems = problems_json([LineProblem(None, code, message)])
    await session.execute(update(BatchRow).where(col(BatchRow.id) == batch_id).values(
        status="failed", failed_at=at, errors_json=problems))


async def batch_status_counts(session: AsyncSession, owner: str | None = None) -> dict[str, int]:
    """Batches by status: all of them, or one owner's."""
    statement = select(col(BatchRow.status), func.count()).group_by(col(BatchRow.status))
    if owner is not None:
        statement = statement.where(col(BatchRow.owner) == owner)
    return {status: int(n) for status, n in (await session.execute(statement)).all()}


async def line_state_counts(session: AsyncSession, owner: str | None = None) -> dict[str, int]:
    """Request rows by state: all of them, or those of one owner's batches."""
    statement = select(col(RequestRow.state), func.count()).group_by(col(RequestRow.state))
    if owner is not None:
        statement = statement.join(BatchRow, col(BatchRow.id) == col(RequestRow.batch_id)).where(
            col(BatchRow.owner) == owner)
    from obatch.store import finished

    found = {state: int(n) for state, n in (await session.execute(statement)).all()}
    if moved := await finished.moved_lines(session, owner):
        found["succeeded"] = found.get("succeeded", 0) + moved
    return found


async def not_run_counts(session: AsyncSession, batch_ids: Sequence[str]) -> dict[str, int]:
    """Lines of these batches that never ran (still pending): what a cancelled or expired batch reports as failed,
    told apart from the lines that really failed."""
    if not batch_ids:
        return {}
    statement = (select(col(RequestRow.batch_id), func.count()).where(col(RequestRow.batch_id).in_(list(batch_ids)),
                                                                      col(RequestRow.state) == "pending")
                 .group_by(col(RequestRow.batch_id)))
    return {batch_id: int(n) for batch_id, n in (await session.execute(statement)).all()}


async def queued_lines(session: AsyncSession, owner: str | None = None) -> int:
    """Pending lines of batches that are still to run (the work queue's depth): all of them, or one owner's."""
    statement = (select(func.count()).select_from(RequestRow)
                 .join(BatchRow, col(BatchRow.id) == col(RequestRow.batch_id))
                 .where(col(RequestRow.state) == "pending",
                        col(BatchRow.status).in_(("validating", "in_progress"))))
    if owner is not None:
        statement = statement.where(col(BatchRow.owner) == owner)
    return int((await session.execute(statement)).scalar() or 0)


# ------------------------------------------------------------------------------- expiry, loaded context


async def ping(session: AsyncSession) -> None:
    """A round trip to the database (a health check)."""
    await session.execute(text("SELECT 1"))


async def expired_files(session: AsyncSession, now: int, limit: int = 1000) -> list[str]:
    """Ids of files whose ``expires_at`` has passed (a file without one never expires)."""
    statement = (select(col(FileRow.id)).where(col(FileRow.expires_at).is_not(None), col(FileRow.expires_at) <= now)
                 .order_by(col(FileRow.expires_at)).limit(limit))
    return list((await session.execute(statement)).scalars().all())


async def set_loaded_context(session: AsyncSession, batch_id: str, model: str, loaded_context: int) -> None:
    """Record the context the engine loaded for a model's group on the group's rows still to finish that have none
    yet: a finished row, and so its output line, never changes (it is read while the batch runs)."""
    await session.execute(update(RequestRow).where(
        col(RequestRow.batch_id) == batch_id, col(RequestRow.model) == model, col(RequestRow.state) == "pending",
        col(RequestRow.loaded_context).is_(None)).values(loaded_context=loaded_context))
def _upsert(session: AsyncSession) -> Any:
    """The dialect's INSERT, which has ON CONFLICT on both PostgreSQL and SQLite."""
    # imported here: the PostgreSQL dialect is a tenth of `obatch run`'s start-up, on a store that is SQLite
    if _dialect(session).name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


async def upsert_file(session: AsyncSession, row: FileRow) -> None:
    """Insert a file row or overwrite the one with its id (finalisation may run again after a crash)."""
    values = row.model_dump()
    statement = _upsert(session)(FileRow).values(**values)
    await session.execute(statement.on_conflict_do_update(
        index_elements=["id"], set_={k: v for k, v in values.items() if k != "id"}))


async def pending_caps(session: AsyncSession, batch_id: str) -> dict[int | None, int]:
    """A batch's pending lines counted by max_tokens (None: uncapped): the work a run has left."""
    statement = (select(col(RequestRow.max_tokens), func.count())
                 .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.state) == "pending")
                 .group_by(col(RequestRow.max_tokens)))
    return {m: int(n) for m, n in (await session.execute(statement)).all()}
