"""The batch leases' queries (``obatch.lease``): which process drives a batch, atomic on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import CursorResult, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.store.repo import _dialect, _upsert
from obatch.store.tables import LeaseRow


async def claim_lease(session: AsyncSession, batch_id: str, owner: str, now: float, ttl: float) -> LeaseRow | None:
    """Take the lease of a batch when it is free, expired or already ours; else return the holder's lease.

    Atomic on both databases: a new lease is an INSERT … ON CONFLICT DO NOTHING; an existing one is taken with
    ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL (a row another claimer has locked counts as held) and with a
    conditional UPDATE on SQLite (whose writers are serialised by the database lock). The caller commits.
    """
    values = {"batch_id": batch_id, "owner": owner, "claimed_at": now, "heartbeat": now, "expires_at": now + ttl}
    inserted: CursorResult[Any] = await session.execute(  # type: ignore[assignment]
        _upsert(session)(LeaseRow).values(**values).on_conflict_do_nothing(index_elements=["batch_id"]))
    if inserted.rowcount == 1:
        return None
    if _dialect(session).name == "postgresql":
        current = (await session.execute(
            select(LeaseRow).where(col(LeaseRow.batch_id) == batch_id)
            .with_for_update(skip_locked=True).execution_options(populate_existing=True))).scalars().first()
        if current is None:  # another process is claiming it this instant
            return LeaseRow(batch_id=batch_id, owner="(being claimed)", claimed_at=now, heartbeat=now,
                            expires_at=now + ttl)
        if current.owner != owner and current.expires_at >= now:
            return current
        if current.owner == owner:
            values.pop("claimed_at")
        await session.execute(update(LeaseRow).where(col(LeaseRow.batch_id) == batch_id).values(**values))
        return None
    taken: CursorResult[Any] = await session.execute(  # type: ignore[assignment]
        update(LeaseRow).where(col(LeaseRow.batch_id) == batch_id,
                               or_(col(LeaseRow.owner) == owner, col(LeaseRow.expires_at) < now))
        .values(owner=owner, heartbeat=now, expires_at=now + ttl))
    if taken.rowcount == 1:
        return None
    return (await session.execute(
        select(LeaseRow).where(col(LeaseRow.batch_id) == batch_id).execution_options(populate_existing=True)
    )).scalars().first()


async def renew_lease(session: AsyncSession, batch_id: str, owner: str, now: float, ttl: float) -> bool:
    """Push the expiry of our lease forward; False when the lease is no longer ours (taken over)."""
    renewed: CursorResult[Any] = await session.execute(  # type: ignore[assignment]
        update(LeaseRow).where(col(LeaseRow.batch_id) == batch_id, col(LeaseRow.owner) == owner)
        .values(heartbeat=now, expires_at=now + ttl))
    return renewed.rowcount == 1


async def release_lease(session: AsyncSession, batch_id: str, owner: str) -> None:
    await session.execute(delete(LeaseRow).where(col(LeaseRow.batch_id) == batch_id, col(LeaseRow.owner) == owner))
