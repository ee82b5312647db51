"""The response cache's queries (``obatch.batches.reuse``): answers are not copied, a key on each request row
points at the rows that hold them (docs/cache.md)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.store.db import Sessions
from obatch.store.repo import FINISH_COLUMNS, _dialect, _marks, _page
from obatch.store.tables import BatchRow, FileRow, RequestRow


def identity_tag(identity: str) -> str:
    """What a row keeps of the identity of the model that answered it: a 64-bit hash of it, in hex (16 characters
    on every row rather than the digests, 64 characters or more; the few identities of a store do not collide)."""
    return hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()


async def set_cache_identity(session: AsyncSession, batch_id: str, model: str, identity: str) -> None:
    """Name the model that will answer a group's pending rows (what their answers are reused under)."""
    await session.execute(update(RequestRow).where(
        col(RequestRow.batch_id) == batch_id, col(RequestRow.model) == model, col(RequestRow.state) == "pending",
        col(RequestRow.cache_key).is_not(None)).values(cache_identity=identity_tag(identity)))


async def iter_cache_candidates(sessions: Sessions, batch_id: str, model: str, identity: str
                                ) -> AsyncIterator[list[tuple[int, str]]]:
    """Pages of (line, cache_key) of a group's pending rows for which some succeeded row has the same key and model
    identity, in line order. One probe of the key index per row, inside the database: a group with nothing to reuse
    costs one query."""
    sql = ("SELECT p.line, p.cache_key FROM requests p WHERE p.batch_id={} AND p.model={} AND p.state='pending' "
           "AND p.cache_key IS NOT NULL AND p.line>{} AND EXISTS (SELECT 1 FROM requests s WHERE "
           "s.cache_key=p.cache_key AND s.cache_identity={} AND s.state='succeeded') "
           f"ORDER BY p.line LIMIT {CANDIDATE_PAGE}")
    last = 0
    while True:
        page = await _page(sessions, sql, batch_id, model, last, identity_tag(identity))
        if page:
            yield [(int(line), str(key)) for line, key in page]
        if len(page) < CANDIDATE_PAGE:
            return
        last = page[-1][0]


CANDIDATE_PAGE = 2000


async def cached_answers(session: AsyncSession, owner: str, identity: str, keys: Sequence[str]
                         ) -> dict[str, tuple[Any, ...]]:
    """For each key that has one: a succeeded row of the owner's with that key and model identity, whose answer can
    still be read (its batch has no output file yet, or still has it: an expired or deleted output file takes its
    answers out of the cache), as (batch_id, custom_id, ``FINISH_COLUMNS``' values, then where a compacted row's line
    is: its ``out_offset``, ``out_length`` and its batch's ``results_files``)."""
    if not keys:
        return {}
    # Two steps, so each query has its own index to go by: the rows by key (ix_requests_cache_key; joined to the
    # batches, a planner may walk every row of the owner's batches instead), then which of their batches count.
    # Plain tuples through the driver: a rerun reads thousands of answers here, and SQLAlchemy's rows cost more.
    dialect = _dialect(session)
    marks = _marks(dialect.paramstyle, len(keys) + 1)
    sql = (f"SELECT cache_key, batch_id, custom_id, {', '.join(FINISH_COLUMNS)}, out_offset, out_length FROM requests "
           "WHERE cache_key IN "
           f"({', '.join(marks[:-1])}) AND cache_identity={marks[-1]} AND state='succeeded'")
    connection = await session.connection()
    candidates: list[Any] = list((await connection.exec_driver_sql(sql, (*keys, identity_tag(identity)))).all())
    if not candidates:
        return {}
    readable: dict[str, str | None] = dict((await session.execute(
        select(col(BatchRow.id), col(BatchRow.results_files))
        .outerjoin(FileRow, col(FileRow.id) == col(BatchRow.output_file_id))
        .where(col(BatchRow.id).in_({row[1] for row in candidates}), col(BatchRow.owner) == owner,
               or_(col(BatchRow.output_file_id).is_(None), col(FileRow.id).is_not(None))))).all())
    found: dict[str, tuple[Any, ...]] = {}
    for key, *values in candidates:
        if values[0] in readable:
            found.setdefault(key, (*values, readable[values[0]]))
    return found


async def cache_followers(session: AsyncSession, batch_id: str, model: str, kinds: Sequence[str]) -> list[int]:
    """The group's pending rows whose key an earlier pending row of the batch shares: they wait for its answer."""
    key = col(RequestRow.cache_key)
    first = (select(key.label("key"), func.min(col(RequestRow.line)).label("first"))
             .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.model) == model,
                    col(RequestRow.state) == "pending", or_(*(key.startswith(f"{kind}:") for kind in kinds)))
             .group_by(key).having(func.count() > 1).subquery())
    statement = (select(col(RequestRow.line)).join(first, key == first.c.key)
                 .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.state) == "pending",
                        col(RequestRow.line) > first.c.first))
    return list((await session.execute(statement)).scalars().all())
