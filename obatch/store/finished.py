"""The narrow rows of finished lines (``finished_lines``): what a succeeded line keeps once its batch is final and
its output file holds the rest (``obatch.batches.compact``).

A moved line keeps its batch's small number (``finished_batches``), its line, where its line lies in the output
file, its model's number (``finished_models``), the host that answered, whether it was answered by reuse, its token
counts, and a 16-byte digest of its cache key and model identity when the cache may answer from it. Readers of a
batch's rows get moved lines among the others, in line order, with the columns they lack as NULL (``rows_sql``):
``compact.restore`` makes them again from the output line, as it does for a compacted wide row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from obatch.store.repo import _dialect, _marks

# What a moved row gives of a column of ``requests`` (SQL over ``f``, its row, and ``m``, its model's): the rest
# is NULL, read back from its output line.
_KEPT = {"line": "f.line", "state": "'succeeded'", "model": "m.model", "host": "f.host",
         "prompt_tokens": "f.prompt_tokens", "completion_tokens": "f.completion_tokens",
         "reasoning_tokens": "f.reasoning_tokens", "out_offset": "f.out_offset", "out_length": "f.out_length"}
_FROM = ("FROM finished_lines f LEFT JOIN finished_models m ON m.batch_key=f.batch_key AND m.number=f.model "
         "WHERE f.batch_key=(SELECT key FROM finished_batches WHERE batch_id={}) AND f.line>{}")


def digest(identity_tag: str, cache_key: str) -> bytes:
    """What a moved line is looked up by in the response cache: 16 bytes of its model identity (its tag) and its
    cache key, so one probe of one index finds the answers of one model to one request."""
    return hashlib.blake2b(f"{identity_tag}\n{cache_key}".encode(), digest_size=16).digest()


def rows_sql(columns: Sequence[str], limit: int | str) -> str:
    """A page of a batch's rows, moved ones among them, in line order: ``columns`` (names of ``requests``' columns)
    then the line. Its parameters, as ``{}`` for ``str.format`` with the driver's marks: batch_id and the line
    after which the page starts, twice (``rows_params``); ``limit`` as it goes in the SQL."""
    moved = ", ".join(f"{_KEPT.get(name, 'NULL')} AS {name}" for name in columns)
    return (f"SELECT {', '.join(columns)}, line FROM requests WHERE batch_id={{}} AND line>{{}} UNION ALL "
            f"SELECT {moved}, f.line {_FROM} ORDER BY {len(columns) + 1} LIMIT {limit}")


def rows_params(batch_id: str, after: int) -> tuple[Any, ...]:
    return batch_id, after, batch_id, after


async def batch_key(session: AsyncSession, batch_id: str) -> int:
    """The batch's small number, given on first use (its moved lines' key); the caller commits."""
    connection = await session.connection()
    marks = _marks(_dialect(session).paramstyle, 1)
    select_sql = f"SELECT key FROM finished_batches WHERE batch_id={marks[0]}"
    found = (await connection.exec_driver_sql(select_sql, (batch_id,))).scalar()
    if found is None:
        await connection.exec_driver_sql(f"INSERT INTO finished_batches (batch_id) VALUES ({marks[0]})", (batch_id,))
        found = (await connection.exec_driver_sql(select_sql, (batch_id,))).scalar()
    return int(found or 0)


async def model_numbers(session: AsyncSession, key: int, models: Sequence[str]) -> dict[str, int]:
    """Each model's number in the batch ``key``, new ones given the next numbers; the caller commits."""
    connection = await session.connection()
    marks = _marks(_dialect(session).paramstyle, 3)
    found: list[Any] = list((await connection.exec_driver_sql(
        f"SELECT number, model FROM finished_models WHERE batch_key={marks[0]}", (key,))).all())
    known = {str(model): int(number) for number, model in found}
    new = sorted(set(models) - set(known))
    for model in new:
        known[model] = len(known)
        await connection.exec_driver_sql(
            f"INSERT INTO finished_models (batch_key, number, model) VALUES ({', '.join(marks)})",
            (key, known[model], model))
    return known


MOVED_COLUMNS = ("batch_key", "line", "out_offset", "out_length", "model", "host", "reused", "prompt_tokens",
                 "completion_tokens", "reasoning_tokens", "cache_digest")


async def insert(session: AsyncSession, rows: Sequence[tuple[Any, ...]]) -> None:
    """Moved rows (``MOVED_COLUMNS``' values each); the caller deletes their ``requests`` rows in the same
    transaction, and commits."""
    if not rows:
        return
    connection = await session.connection()
    marks = _marks(_dialect(session).paramstyle, len(MOVED_COLUMNS))
    await connection.exec_driver_sql(
        f"INSERT INTO finished_lines ({', '.join(MOVED_COLUMNS)}) VALUES ({', '.join(marks)})", list(rows))


async def counts(session: AsyncSession, batch_id: str) -> tuple[int, int, int, int, int]:
    """(lines, prompt tokens, completion tokens, reasoning tokens, lines answered by reuse) of a batch's moved
    lines: all of them succeeded."""
    connection = await session.connection()
    marks = _marks(_dialect(session).paramstyle, 1)
    row = (await connection.exec_driver_sql(
        "SELECT count(*), sum(f.prompt_tokens), sum(f.completion_tokens), sum(f.reasoning_tokens), "
        "sum(CASE WHEN f.reused THEN 1 ELSE 0 END) FROM finished_lines f JOIN finished_batches b ON "
        f"b.key=f.batch_key WHERE b.batch_id={marks[0]}", (batch_id,))).one()
    return tuple(int(v or 0) for v in row)  # type: ignore[return-value]


async def moved_lines(session: AsyncSession, owner: str | None = None) -> int:
    """How many lines moved: all of them, or those of one owner's batches."""
    connection = await session.connection()
    sql = "SELECT count(*) FROM finished_lines f"
    params: tuple[Any, ...] = ()
    if owner is not None:
        sql += (" JOIN finished_batches b ON b.key=f.batch_key JOIN batches o ON o.id=b.batch_id WHERE "
                f"o.owner={_marks(_dialect(session).paramstyle, 1)[0]}")
        params = (owner,)
    return int((await connection.exec_driver_sql(sql, params)).scalar() or 0)


async def by_digest(session: AsyncSession, digests: Sequence[bytes]) -> list[tuple[Any, ...]]:
    """The moved lines with these digests: (digest, batch_id, line, model, host, prompt, completion and reasoning
    tokens, out_offset, out_length)."""
    if not digests:
        return []
    connection = await session.connection()
    marks = _marks(_dialect(session).paramstyle, len(digests))
    sql = ("SELECT f.cache_digest, b.batch_id, f.line, m.model, f.host, f.prompt_tokens, f.completion_tokens, "
           "f.reasoning_tokens, f.out_offset, f.out_length FROM finished_lines f JOIN finished_batches b ON "
           "b.key=f.batch_key LEFT JOIN finished_models m ON m.batch_key=f.batch_key AND m.number=f.model "
           f"WHERE f.cache_digest IN ({', '.join(marks)})")
    return [tuple(row) for row in (await connection.exec_driver_sql(sql, tuple(digests))).all()]


async def ran_lines(session: AsyncSession, batch_id: str, model: str) -> int:
    """How many of a batch's moved lines of one model it ran itself, with their token counts (``bench_repo.run_lines``
    counts the rest): those a pilot had run before it (a pilot line it took whose row has left ``requests``) left
    out."""
    connection = await session.connection()
    marks = _marks(_dialect(session).paramstyle, 3)
    moved = (await connection.exec_driver_sql(
        "SELECT count(*) FROM finished_lines f JOIN finished_batches b ON b.key=f.batch_key JOIN finished_models m ON "
        f"m.batch_key=f.batch_key AND m.number=f.model WHERE b.batch_id={marks[0]} AND m.model={marks[1]} AND "
        "f.prompt_tokens IS NOT NULL AND f.completion_tokens IS NOT NULL", (batch_id, model))).scalar()
    if not moved:
        return 0
    piloted = (await connection.exec_driver_sql(
        f"SELECT count(*) FROM pilots p WHERE p.used_by={marks[0]} AND p.model={marks[1]} AND NOT EXISTS "
        f"(SELECT 1 FROM requests r WHERE r.batch_id={marks[2]} AND r.custom_id=p.custom_id)",
        (batch_id, model, batch_id))).scalar()
    return int(moved) - int(piloted or 0)


async def forget(session: AsyncSession, batch_id: str) -> None:
    """Delete a batch's moved lines, its models' numbers and its own (before the batch itself goes)."""
    connection = await session.connection()
    marks = _marks(_dialect(session).paramstyle, 1)
    key = f"(SELECT key FROM finished_batches WHERE batch_id={marks[0]})"
    for table in ("finished_lines", "finished_models"):
        await connection.exec_driver_sql(f"DELETE FROM {table} WHERE batch_key={key}", (batch_id,))
    await connection.exec_driver_sql(f"DELETE FROM finished_batches WHERE batch_id={marks[0]}", (batch_id,))
