"""Pilot lines (``PilotRow``): stored by a pilot run, taken over by the batch that imports the same file.

The batch lifecycle calls ``adopt`` once its rows are imported: each stored pilot answer whose (file content,
custom_id, body) matches a pending row of the batch finishes that row, through the same guarded write as any
result (only a still-pending row takes it), and is marked used by that batch, so no line runs twice and no pilot
answer counts in two batches. Pilot lines belong to an owner (the server's API key owner; "" for the CLI and
notebook, as a batch's): every query here takes it, so a tenant never sees nor takes another's pilot lines, even of
the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from obatch.store import repo
from obatch.store.tables import PilotRow, RequestRow


def body_sha256(body_json: str | bytes) -> str:
    """The key of a line's body: the JSON text exactly as the batch stores it."""
    return hashlib.sha256(body_json.encode() if isinstance(body_json, str) else body_json).hexdigest()


def _of(owner: str, file_sha256: str) -> Any:
    return (col(PilotRow.owner) == owner) & (col(PilotRow.file_sha256) == file_sha256)


async def all_of(session: AsyncSession, owner: str, file_sha256: str) -> list[PilotRow]:
    """Every pilot line ``owner`` ran of the file (taken by a batch or not): what its answers are known to take."""
    statement = select(PilotRow).where(_of(owner, file_sha256))
    return list((await session.execute(statement)).scalars().all())


async def save(session: AsyncSession, rows: Sequence[PilotRow]) -> None:
    for row in rows:
        await session.merge(row)


async def adopt(session: AsyncSession, batch_id: str, owner: str, file_sha256: str) -> int:
    """Finish the batch's pending rows that a pilot of its owner already ran (see the module docstring); returns how
    many. Runs in the caller's transaction, so the rows and the pilot lines' ``used_by`` change together."""
    statement = select(PilotRow).where(_of(owner, file_sha256),
                                       or_(col(PilotRow.used_by).is_(None), col(PilotRow.used_by) == batch_id))
    pilots = {p.custom_id: p for p in (await session.execute(statement)).scalars().all()}
    if not pilots:
        return 0
    pending = (await session.execute(
        select(col(RequestRow.line), col(RequestRow.custom_id), col(RequestRow.body))
        .where(col(RequestRow.batch_id) == batch_id, col(RequestRow.state) == "pending",
               col(RequestRow.custom_id).in_(list(pilots))))).all()
    results: list[tuple[Any, ...]] = []
    taken: list[str] = []
    for line, custom_id, body in pending:
        pilot = pilots[custom_id]
        if pilot.body_sha256 != body_sha256(body):
            continue
        stored = orjson.loads(pilot.result_json)  # by column name, so a stored pilot outlives a column reorder
        results.append((*(stored.get(column) for column in repo.FINISH_COLUMNS), line))
        taken.append(custom_id)
    if results:
        await repo.finish_requests(session, batch_id, results)
        await session.execute(update(PilotRow).where(_of(owner, file_sha256),
                                                     col(PilotRow.custom_id).in_(taken)).values(used_by=batch_id))
    return len(results)
