"""The storage quota, checked and written in one step: a file row is inserted only when its owner's stored bytes
with it stay within the quota, so concurrent uploads of one key can never together pass it.

The insert is one ``INSERT … SELECT … WHERE used + size <= quota`` statement. SQLite runs a writing statement under
its database write lock, so the sum it reads cannot change before the row lands; PostgreSQL (read committed) would
let two such statements read the same sum, so there a transaction-scoped advisory lock on the owner serialises one
key's inserts first (other keys are not held up)."""

from __future__ import annotations

from sqlalchemy import func, insert, literal, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.store.bench_tables import BenchSweepRow
from obatch.store.tables import FileRow


async def add_file_within(session: AsyncSession, row: FileRow, quota: int) -> bool:
    """Insert ``row`` if its owner's files, it included, hold at most ``quota`` bytes; whether it was inserted.
    The caller commits (which also releases PostgreSQL's lock)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(row.owner, 0))))
    used = (select(func.coalesce(func.sum(col(FileRow.bytes)), 0))
            .where(col(FileRow.owner) == row.owner).scalar_subquery())
    values = row.model_dump()
    columns = FileRow.__table__.columns  # type: ignore[attr-defined]
    source = select(*[literal(values[name], type_=columns[name].type) for name in values]).where(
        used + row.bytes <= quota)
    result = await session.execute(insert(FileRow).from_select(list(values), source))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def sweep_params_since(session: AsyncSession, owner: str, since: float) -> list[str]:
    """The parameters (``params_json``) of the sweeps ``owner`` started since ``since`` (epoch seconds), whatever
    became of them: what counts against a key's sweep budget."""
    statement = select(col(BenchSweepRow.params_json)).where(col(BenchSweepRow.owner) == owner,
                                                             col(BenchSweepRow.created_at) >= since)
    return list((await session.execute(statement)).scalars().all())
