"""Queries of the benchmark tables (``obatch.store.bench_tables``), each taking the session it runs in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.errors import NotFoundError
from obatch.store import finished
from obatch.store.bench_tables import BenchPointRow, BenchRunRow, BenchSampleRow, BenchSweepRow
from obatch.store.tables import BatchRow, FileRow, PilotRow, RequestRow

PointConfig = tuple[str, int, int, int, float | None, str | None]  # model, num_ctx, concurrency, repeat, rate, arrival


async def get_run(session: AsyncSession, run_id: str) -> BenchRunRow:
    row = await session.get(BenchRunRow, run_id)
    if row is None:
        raise NotFoundError(f"No such benchmark run: {run_id}", param="run_id")
    return row


async def find_unfinished_run(session: AsyncSession, signature: str) -> BenchRunRow | None:
    """The newest run with these parameters that did not finish (an interrupted sweep to resume)."""
    statement = (select(BenchRunRow).where(col(BenchRunRow.signature) == signature,
                                           col(BenchRunRow.status) == "running")
                 .order_by(col(BenchRunRow.created_at).desc()).limit(1))
    return (await session.execute(statement)).scalars().first()


async def done_points(session: AsyncSession, run_id: str) -> set[PointConfig]:
    statement = select(col(BenchPointRow.model), col(BenchPointRow.num_ctx), col(BenchPointRow.concurrency),
                       col(BenchPointRow.repeat), col(BenchPointRow.rate), col(BenchPointRow.arrival)
                       ).where(col(BenchPointRow.run_id) == run_id)
    return {(m, n, c, r, rate, a) for m, n, c, r, rate, a in (await session.execute(statement)).all()}


async def add_point(session: AsyncSession, point: BenchPointRow, samples: Sequence[dict[str, Any]]) -> int:
    """Insert a point and its samples (one transaction, committed by the caller); returns the point id."""
    session.add(point)
    await session.flush()
    assert point.id is not None
    if samples:
        await session.execute(insert(BenchSampleRow), [dict(s, point_id=point.id) for s in samples])
    return point.id


async def list_runs(session: AsyncSession) -> list[BenchRunRow]:
    statement = select(BenchRunRow).order_by(col(BenchRunRow.created_at))
    return list((await session.execute(statement)).scalars().all())


async def list_points(session: AsyncSession, *, run_id: str | None = None, models: Sequence[str] | None = None,
                      num_ctx: int | None = None, concurrency: int | None = None, backend: str | None = None,
                      include_excluded: bool = True) -> list[BenchPointRow]:
    """Points in measurement order, filtered by any of run, models, num_ctx, concurrency, backend."""
    statement = select(BenchPointRow)
    if run_id is not None:
        statement = statement.where(col(BenchPointRow.run_id) == run_id)
    if models:
        statement = statement.where(col(BenchPointRow.model).in_(list(models)))
    if num_ctx is not None:
        statement = statement.where(col(BenchPointRow.num_ctx) == num_ctx)
    if concurrency is not None:
        statement = statement.where(col(BenchPointRow.concurrency) == concurrency)
    if backend is not None:
        statement = statement.where(col(BenchPointRow.backend) == backend)
    if not include_excluded:
        statement = statement.where(col(BenchPointRow.excluded).is_(False))
    statement = statement.order_by(col(BenchPointRow.created_at), col(BenchPointRow.id))
    return list((await session.execute(statement)).scalars().all())


async def samples_of(session: AsyncSession, point_ids: Sequence[int]) -> list[BenchSampleRow]:
    statement = (select(BenchSampleRow).where(col(BenchSampleRow.point_id).in_(list(point_ids)))
                 .order_by(col(BenchSampleRow.point_id), col(BenchSampleRow.idx)))
    return list((await session.execute(statement)).scalars().all())


async def batch_token_pairs(session: AsyncSession, model: str, limit: int = 5000, *, exclude: str | None = None
                            ) -> list[tuple[int, int, int | None, int]]:
    """(prompt_estimate, prompt_tokens, max_tokens, completion_tokens) of recent succeeded batch requests of a
    model: what real runs say about obatch's prompt estimate and about how much of max_tokens answers use."""
    statement = (
        select(col(RequestRow.prompt_estimate), col(RequestRow.prompt_tokens), col(RequestRow.max_tokens),
               col(RequestRow.completion_tokens))
        .where(col(RequestRow.model) == model, col(RequestRow.state) == "succeeded",
               col(RequestRow.prompt_tokens).is_not(None), col(RequestRow.completion_tokens).is_not(None),
               col(RequestRow.batch_id) != (exclude or ""))
        .order_by(col(RequestRow.finished_at).desc()).limit(limit)
    )
    return [(int(e), int(p or 0), m, int(c or 0)) for e, p, m, c in (await session.execute(statement)).all()]


async def prompt_timings(session: AsyncSession, model: str, limit: int = 400, *, exclude: str | None = None
                         ) -> list[tuple[str, int, str, str, int, float]]:
    """(batch_id, line, url, body JSON, prompt_estimate, engine prompt ms) of a model's newest succeeded batch
    requests that the engine timed: how long their prompts really took, against what the prefix cache promised."""
    statement = (
        select(col(RequestRow.batch_id), col(RequestRow.line), col(RequestRow.url), col(RequestRow.body),
               col(RequestRow.prompt_estimate), col(RequestRow.engine_prompt_ms))
        .where(col(RequestRow.model) == model, col(RequestRow.state) == "succeeded",
               col(RequestRow.engine_prompt_ms).is_not(None), col(RequestRow.batch_id) != (exclude or ""),
               col(RequestRow.body) != "")  # a compacted row keeps no body (obatch.batches.compact)
        .order_by(col(RequestRow.finished_at).desc()).limit(limit)
    )
    return [(b, int(n), u, body, int(e or 0), float(ms or 0.0))
            for b, n, u, body, e, ms in (await session.execute(statement)).all()]


async def batch_schedules(session: AsyncSession, batch_ids: Sequence[str]) -> dict[str, str | None]:
    """The schedule each batch asked for ("auto", "file"; None: the settings' default), by id."""
    if not batch_ids:
        return {}
    statement = select(col(BatchRow.id), col(BatchRow.schedule)).where(col(BatchRow.id).in_(list(batch_ids)))
    return {str(i): s for i, s in (await session.execute(statement)).all()}


async def decode_timings(session: AsyncSession, model: str, limit: int = 2000, *, exclude: str | None = None
                         ) -> list[tuple[str, str, int, int, float, float, float]]:
    """(backend, batch_id, prompt_tokens, completion_tokens, engine decode ms, latency ms, finished at) of a
    model's newest succeeded batch requests the engine timed: how decoding slows down as the context of the
    sequences in flight grows, at lengths a sweep never reached."""
    statement = (
        select(col(BatchRow.backend), col(RequestRow.batch_id), col(RequestRow.prompt_tokens),
               col(RequestRow.completion_tokens), col(RequestRow.engine_decode_ms), col(RequestRow.latency_ms),
               col(RequestRow.finished_at))
        .join(BatchRow, col(BatchRow.id) == col(RequestRow.batch_id))
        .where(col(RequestRow.model) == model, col(RequestRow.state) == "succeeded",
               col(RequestRow.engine_decode_ms).is_not(None), col(RequestRow.prompt_tokens).is_not(None),
               col(RequestRow.latency_ms).is_not(None), col(RequestRow.finished_at).is_not(None),
               col(RequestRow.completion_tokens) > 0, col(RequestRow.batch_id) != (exclude or ""))
        .order_by(col(RequestRow.finished_at).desc()).limit(limit)
    )
    return [(b or "", i, int(p or 0), int(c or 0), float(ms or 0.0), float(lat or 0.0), float(end or 0.0))
            for b, i, p, c, ms, lat, end in (await session.execute(statement)).all()]


async def run_lines(session: AsyncSession, batch_id: str, model: str, limit: int
                    ) -> tuple[int, list[tuple[str, str, int, int]]]:
    """How many succeeded lines of one model a finished batch ran itself (not those a pilot had run before it),
    and (url, body JSON, prompt tokens, completion tokens) of the first ``limit`` of them, in line order: what the
    batch's running time was spent on."""
    piloted = select(col(PilotRow.custom_id)).where(col(PilotRow.used_by) == batch_id)
    ran = (col(RequestRow.batch_id) == batch_id, col(RequestRow.model) == model,
           col(RequestRow.state) == "succeeded", col(RequestRow.prompt_tokens).is_not(None),
           col(RequestRow.completion_tokens).is_not(None), col(RequestRow.custom_id).not_in(piloted))
    count = (await session.execute(select(func.count()).select_from(RequestRow).where(*ran))).scalar_one()
    count += await finished.ran_lines(session, batch_id, model)
    statement = (select(col(RequestRow.url), col(RequestRow.body), col(RequestRow.prompt_tokens),
                        col(RequestRow.completion_tokens)).where(*ran, col(RequestRow.body) != "")
                 .order_by(col(RequestRow.line)).limit(limit))
    return int(count), [(u, b, int(p or 0), int(c or 0)) for u, b, p, c in (await session.execute(statement)).all()]


async def stored_file_sha256(session: AsyncSession, file_id: str) -> str | None:
    """The sha256 of a stored file's bytes (what its pilot lines are kept under); None when the file is gone or has
    none."""
    row = await session.get(FileRow, file_id)
    return row.sha256 if row is not None and row.sha256 else None


async def pending_bodies(session: AsyncSession, batch_id: str, model: str, limit: int) -> list[tuple[str, str]]:
    """(url, body JSON) of the first ``limit`` pending requests of one model of a batch, in line order."""
    statement = (select(col(RequestRow.url), col(RequestRow.body))
                 .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.model) == model,
                        col(RequestRow.state) == "pending")
                 .order_by(col(RequestRow.line)).limit(limit))
    return [(u, b) for u, b in (await session.execute(statement)).all()]


async def estimated_batches(session: AsyncSession, *, owner: str | None = None, limit: int = 500
                            ) -> list[BatchRow]:
    """Completed batches (an owner's, or all) that carry the estimate made before they ran, newest first."""
    statement = select(BatchRow).where(col(BatchRow.estimate_json).is_not(None), col(BatchRow.status) == "completed")
    if owner is not None:
        statement = statement.where(col(BatchRow.owner) == owner)
    statement = statement.order_by(col(BatchRow.seq).desc()).limit(limit)
    return list((await session.execute(statement)).scalars().all())


SWEEP_ACTIVE = ("queued", "in_progress", "cancelling")


def add(session: AsyncSession, row: BenchRunRow | BenchSweepRow) -> None:
    """Keep a new benchmark run or sweep row (written at the caller's commit)."""
    session.add(row)


async def get_sweep(session: AsyncSession, sweep_id: str, owner: str | None = None, *, fresh: bool = False
                    ) -> BenchSweepRow:
    """A sweep (the owner's, when ``owner`` is given: another key's sweep is not found); ``fresh`` reads it again
    from the database even when this session holds it already."""
    row = await session.get(BenchSweepRow, sweep_id, populate_existing=fresh)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(f"No such sweep: {sweep_id}", param="sweep_id")
    return row


async def list_sweeps(session: AsyncSession, owner: str | None = None, limit: int = 100) -> list[BenchSweepRow]:
    """Newest first."""
    statement = select(BenchSweepRow).order_by(col(BenchSweepRow.created_at).desc()).limit(limit)
    if owner is not None:
        statement = statement.where(col(BenchSweepRow.owner) == owner)
    return list((await session.execute(statement)).scalars().all())


async def active_sweep_ids(session: AsyncSession) -> list[str]:
    """Sweeps not yet in a final status, oldest first."""
    statement = (select(col(BenchSweepRow.id)).where(col(BenchSweepRow.status).in_(SWEEP_ACTIVE))
                 .order_by(col(BenchSweepRow.created_at)))
    return list((await session.execute(statement)).scalars().all())


async def update_sweep(session: AsyncSession, sweep_id: str, *, only_if: Sequence[str] | None = None,
                       **values: Any) -> bool:
    """Set columns of a sweep (only while its status is one of ``only_if``, when given); whether a row changed."""
    statement = update(BenchSweepRow).where(col(BenchSweepRow.id) == sweep_id)
    if only_if is not None:
        statement = statement.where(col(BenchSweepRow.status).in_(list(only_if)))
    result = await session.execute(statement.values(**values))
    return bool(getattr(result, "rowcount", 0))


async def answer_observations(session: AsyncSession, model: str, limit: int = 5000, *, exclude: str | None = None
                              ) -> list[tuple[str, int | None, int, str | None, str]]:
    """(url, max_tokens, completion_tokens, finish_reason, batch_id) of a model's newest succeeded batch requests
    (but those of the batch ``exclude``): what its answers really took, and which of them a cap cut."""
    statement = (
        select(col(RequestRow.url), col(RequestRow.max_tokens), col(RequestRow.completion_tokens),
               col(RequestRow.finish_reason), col(RequestRow.batch_id))
        .where(col(RequestRow.model) == model, col(RequestRow.state) == "succeeded",
               col(RequestRow.completion_tokens).is_not(None), col(RequestRow.batch_id) != (exclude or ""))
        .order_by(col(RequestRow.finished_at).desc()).limit(limit)
    )
    return [(u, m, int(c or 0), f, b) for u, m, c, f, b in (await session.execute(statement)).all()]


async def natural_bench_answers(session: AsyncSession, model: str, limit: int = 5000) -> list[tuple[int, str]]:
    """(completion_tokens, run_id) of a model's benchmark requests that ran without a cap: only file workloads
    send such requests (generated ones force their lengths), so these answers ended where the model chose."""
    statement = (
        select(col(BenchSampleRow.completion_tokens), col(BenchPointRow.run_id))
        .join(BenchPointRow, col(BenchPointRow.id) == col(BenchSampleRow.point_id))
        .where(col(BenchPointRow.model) == model, col(BenchSampleRow.ok).is_(True),
               col(BenchSampleRow.max_tokens).is_(None), col(BenchSampleRow.completion_tokens).is_not(None))
        .order_by(col(BenchSampleRow.point_id).desc()).limit(limit)
    )
    return [(int(c or 0), r) for c, r in (await session.execute(statement)).all()]


async def pending_lines(session: AsyncSession, batch_id: str, page: int = 10_000
                        ) -> AsyncIterator[tuple[str, str, int, int | None]]:
    """(model, url, prompt_estimate, max_tokens) of a batch's pending requests in line order, read ``page`` rows at
    a time (a server-side cursor: a million rows are never in memory together)."""
    statement = (select(col(RequestRow.model), col(RequestRow.url), col(RequestRow.prompt_estimate),
                        col(RequestRow.max_tokens))
                 .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.state) == "pending")
                 .order_by(col(RequestRow.line)).execution_options(yield_per=page))
    async for m, u, p, x in await session.stream(statement):
        yield m, u, int(p or 0), x
