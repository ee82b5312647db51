"""Quotas checked and written in one step: a row is inserted only when what its owner already holds, with it, stays
within the limit, so concurrent requests of one key can never together pass it. Two use it: the storage quota (a
file's bytes against the key's stored bytes) and the daily sweep budget (a sweep's engine requests against those of
the key's sweeps of the last 24 hours).

The insert is one ``INSERT … SELECT … WHERE used + size <= limit`` statement. SQLite runs a writing statement under
its database write lock, so the sum it reads cannot change before the row lands; PostgreSQL (read committed) would
let two such statements read the same sum, so there a transaction-scoped advisory lock on the owner and the quota
serialises one key's inserts first (other keys, and the other quota, are not held up)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ScalarSelect, func, insert, literal, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import SQLModel, col

from obatch.store.bench_tables import BenchSweepRow
from obatch.store.tables import FileRow


async def _insert_within(session: AsyncSession, row: SQLModel, lock: str, used: ScalarSelect[Any], size: int,
                         limit: int) -> bool:
    """Insert ``row`` if ``used`` (its owner's sum so far, read in the insert itself) plus ``size`` stays within
    ``limit``; whether it was inserted. The caller commits (which also releases PostgreSQL's lock)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(lock, 0))))
    values = row.model_dump()
    columns = type(row).__table__.columns  # type: ignore[attr-defined]
    source = select(*[literal(values[name], type_=columns[name].type) for name in values]).where(
        used + size <= limit)
    result = await session.execute(insert(type(row)).from_select(list(values), source))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def add_file_within(session: AsyncSession, row: FileRow, quota: int) -> bool:
    """Insert ``row`` if its owner's files, it included, hold at most ``quota`` bytes; whether it was inserted.
    The caller commits."""
    used = (select(func.coalesce(func.sum(col(FileRow.bytes)), 0))
            .where(col(FileRow.owner) == row.owner).scalar_subquery())
    return await _insert_within(session, row, row.owner, used, row.bytes, quota)


def _sweep_requests_since(owner: str | None, since: float) -> ScalarSelect[Any]:
    return (select(func.coalesce(func.sum(col(BenchSweepRow.requests)), 0))
            .where(col(BenchSweepRow.owner) == owner, col(BenchSweepRow.created_at) >= since).scalar_subquery())


async def add_sweep_within(session: AsyncSession, row: BenchSweepRow, budget: int, since: float) -> bool:
    """Insert ``row`` if the engine requests of its owner's sweeps started since ``since`` (epoch seconds, whatever
    became of them), it included, are at most ``budget``; whether it was inserted. The caller commits."""
    return await _insert_within(session, row, f"sweeps:{row.owner}", _sweep_requests_since(row.owner, since),
                                row.requests, budget)


async def sweep_requests_since(session: AsyncSession, owner: str | None, since: float) -> int:
    """The engine requests of the sweeps ``owner`` started since ``since``: what counts against its budget."""
    return int((await session.execute(select(_sweep_requests_since(owner, since)))).scalar_one())
