"""Queries of retry chains and of results read while a batch runs.

A retry is a batch whose ``parent_id`` names the batch it was made from; a chain is a root batch and every batch
made from it, directly or not. Reading results touches only indexed ranges: a batch's rows by the primary key
(``batch_id``, ``line``) from a cursor, a small page at a time, and a chain's later outcomes of given lines by the
unique key (``batch_id``, ``custom_id``); the batches by their primary key and ``ix_batches_parent_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.store import finished, repo
from obatch.store.tables import BatchRow, RequestRow

MAX_DEPTH = 1000  # parents followed at most (a chain is a handful of retries; this only stops a cycle)


async def chain(session: AsyncSession, batch_id: str, owner: str | None = None, *, fresh: bool = False
                ) -> list[BatchRow]:
    """The chain a batch belongs to, root first, then every batch made from it in creation order. ``NotFoundError``
    when the batch is not there (or not the owner's)."""
    root = await repo.get_batch(session, batch_id, owner, fresh=fresh)
    for _ in range(MAX_DEPTH):
        if root.parent_id is None:
            break
        root = await repo.get_batch(session, root.parent_id, fresh=fresh)
    rows, level = [root], [root.id]
    while level:
        statement = select(BatchRow).where(col(BatchRow.parent_id).in_(level)).order_by(col(BatchRow.seq))
        if fresh:
            statement = statement.execution_options(populate_existing=True)
        found = list((await session.execute(statement)).scalars().all())
        rows += found
        level = [r.id for r in found]
    return sorted(rows, key=lambda r: r.seq)


async def retry_ids(session: AsyncSession, batch_ids: Sequence[str]) -> dict[str, list[str]]:
    """The retries made from each of these batches, oldest first (only batches that have any)."""
    if not batch_ids:
        return {}
    statement = (select(col(BatchRow.parent_id), col(BatchRow.id)).where(col(BatchRow.parent_id).in_(list(batch_ids)))
                 .order_by(col(BatchRow.seq)))
    found: dict[str, list[str]] = {}
    for parent, child in (await session.execute(statement)).all():
        found.setdefault(str(parent), []).append(child)
    return found


async def rows_after(session: AsyncSession, batch_id: str, columns: Sequence[str], after: int, limit: int
                     ) -> list[tuple[Any, ...]]:
    """Up to ``limit`` rows of a batch after line ``after``, in line order: ``columns`` then the line (moved lines
    among them: ``finished.rows_sql``). A range of each table's primary key: its cost is the page's, however large
    the batch. Plain tuples from the driver, like the output writer's reads (a mapped row per line costs more than
    the query)."""
    known = set(RequestRow.model_fields)
    if not set(columns) <= known:
        raise ValueError(f"not columns of requests: {sorted(set(columns) - known)}")
    sql = finished.rows_sql(columns, int(limit)).format(*repo._marks(repo._dialect(session).paramstyle, 4))
    connection = await session.connection()
    return [tuple(row) for row in (await connection.exec_driver_sql(sql, finished.rows_params(batch_id, after))).all()]


async def rows_of(session: AsyncSession, batch_ids: Sequence[str], custom_ids: Sequence[str],
                  columns: Sequence[str]) -> list[tuple[Any, ...]]:
    """The rows of these batches for these custom_ids, run or not: the batch id, ``columns``, then the line. Looked
    up by the unique key (batch_id, custom_id)."""
    if not batch_ids or not custom_ids:
        return []
    cols = [getattr(RequestRow, name) for name in columns]
    statement = (select(col(RequestRow.batch_id), *cols, col(RequestRow.line))
                 .where(col(RequestRow.batch_id).in_(list(batch_ids)), col(RequestRow.custom_id).in_(list(custom_ids))))
    return [tuple(row) for row in (await session.execute(statement)).all()]
