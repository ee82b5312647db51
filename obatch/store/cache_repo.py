"""The response cache's queries (``obatch.batches.reuse``): answers are not copied, a key on each request row
points at the rows that hold them (docs/cache.md)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.store import finished
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
            break
        last = page[-1][0]
    async for moved in _moved_candidates(sessions, batch_id, model, identity_tag(identity)):
        yield moved


CANDIDATE_PAGE = 2000


async def _moved_candidates(sessions: Sessions, batch_id: str, model: str, tag: str
                            ) -> AsyncIterator[list[tuple[int, str]]]:
    """As ``iter_cache_candidates``, for answers held by moved lines (``finished_lines``, looked up by the digest of
    key and identity, which only Python makes): the batch's rows walked once by their primary key, a page of
    digests probed at a time. Nothing to walk while no moved line has a digest."""
    async with sessions() as session:
        connection = await session.connection()
        if (await connection.exec_driver_sql(
                "SELECT 1 FROM finished_lines WHERE cache_digest IS NOT NULL LIMIT 1")).first() is None:
            return
    sql = ("SELECT line, model, state, cache_key FROM requests WHERE batch_id={} AND line>{} ORDER BY line "
           f"LIMIT {CANDIDATE_PAGE}")
    last = 0
    while True:
        page = await _page(sessions, sql, batch_id, last)
        wanted = [(finished.digest(tag, key), int(line), str(key)) for line, group, state, key in page
                  if group == model and state == "pending" and key is not None]
        if wanted:
            async with sessions() as session:
                found = {row[0] for row in await finished.by_digest(session, sorted({w[0] for w in wanted}))}
            if hits := [(line, key) for digest, line, key in wanted if digest in found]:
                yield hits
        if len(page) < CANDIDATE_PAGE:
            return
        last = page[-1][0]


async def cached_answers(session: AsyncSession, owner: str, identity: str, keys: Sequence[str]
                         ) -> dict[str, tuple[Any, ...]]:
    """For each key that has one: a succeeded row of the owner's with that key and model identity, whose answer can
    still be read (its batch has no output file yet, or still has it: an expired or deleted output file takes its
    answers out of the cache), as (batch_id, custom_id, ``FINISH_COLUMNS``' values, then where a compacted row's line
    is: its ``out_offset``, ``out_length`` and its batch's ``results_files``). A moved line (``finished_lines``,
    found by the digest of its key and identity) gives no custom_id and only the values its narrow row keeps: its
    output line holds the rest."""
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
    tag = identity_tag(identity)
    candidates: list[Any] = list((await connection.exec_driver_sql(sql, (*keys, tag))).all())
    digests = {finished.digest(tag, key): key for key in keys}
    at = {name: i for i, name in enumerate(FINISH_COLUMNS)}
    for digest, batch_id, _, _, host, *tokens, offset, length in await finished.by_digest(session, list(digests)):
        values: list[Any] = [None] * len(FINISH_COLUMNS)  # a moved line: the rest is read from its output line
        values[at["state"]], values[at["host"]] = "succeeded", host
        values[at["prompt_tokens"]], values[at["completion_tokens"]], values[at["reasoning_tokens"]] = tokens
        candidates.append((digests[digest], batch_id, None, *values, offset, length))
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
