"""The slots auto concurrency read per engine host and model (``obatch.batches.slots``): one row each."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.store.repo import _upsert
from obatch.store.tables import EngineSlotsRow


async def remembered_slots(session: AsyncSession, hosts: Sequence[str], model: str) -> dict[str, tuple[int, float]]:
    """For each of ``hosts`` that has one: the slots last read from it for ``model``, and when (Unix seconds)."""
    rows = await session.execute(select(EngineSlotsRow).where(col(EngineSlotsRow.host).in_(list(hosts)),
                                                              col(EngineSlotsRow.model) == model))
    return {row.host: (row.slots, row.updated_at) for row in rows.scalars()}


async def remember_slots(session: AsyncSession, host: str, model: str, slots: int, now: float) -> None:
    """Keep ``slots`` as what ``host`` runs of ``model`` at once (replacing what was kept). The caller commits."""
    values = {"host": host, "model": model, "slots": slots, "updated_at": now}
    await session.execute(_upsert(session)(EngineSlotsRow).values(**values).on_conflict_do_update(
        index_elements=["host", "model"], set_={"slots": slots, "updated_at": now}))
