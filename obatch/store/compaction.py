"""The queries of compaction (``obatch.batches.compact``): a finished batch's rows rewritten without the text its
output and error files hold, with the index of their line in those files instead.

A row is rewritten by deleting it and inserting it again, a page of rows per transaction: on SQLite an UPDATE that
shrinks a row leaves its page as large as before, while a page whose rows have all moved is freed, to be reused by
the next batch or handed back to the filesystem (``release_free_pages``). Each row's new version is whole in itself
(its index and its dropped text change together), so a crash between two pages leaves rows either as they were or
compacted, and compacting again repeats nothing wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from obatch.store import finished
from obatch.store.repo import _dialect, _marks
from obatch.store.tables import RequestRow

DROPPED = ("request_id", "response", "content", "error_message")  # what the output or error line holds
INDEX = ("out_offset", "out_length")  # where a compacted row's line is in its file (the file: by its state)
COMPACTED_BODY = ""  # the request body of a compacted row that does not keep it (the column is NOT NULL)


@functools.cache
def _columns() -> tuple[str, ...]:
    return tuple(RequestRow.__table__.columns.keys())  # type: ignore[attr-defined]


async def rewrite_page(session: AsyncSession, batch_id: str, entries: Sequence[tuple[int, int, int, bool]],
                       *, move: bool = False) -> None:
    """Compact the rows of ``entries``: (line, offset, length, keep_body) each, lines ascending. The rows' other
    columns are kept as they are; with ``move``, a succeeded row that keeps no body (and had no answer refused by
    the structured-output check) leaves ``requests`` for a narrow row of ``finished_lines`` instead
    (``obatch.store.finished``). The caller commits."""
    if not entries:
        return
    columns = _columns()
    dialect = _dialect(session)
    connection = await session.connection()
    first, last = entries[0][0], entries[-1][0]
    marks = _marks(dialect.paramstyle, 3)
    select_sql = (f"SELECT {', '.join(columns)} FROM requests WHERE batch_id={marks[0]} AND line>={marks[1]} "
                  f"AND line<={marks[2]} ORDER BY line")
    rows = {row[columns.index("line")]: row
            for row in (await connection.exec_driver_sql(select_sql, (batch_id, first, last))).all()}
    wanted = {line: (offset, length, keep) for line, offset, length, keep in entries}
    at = {name: i for i, name in enumerate(columns)}
    new_rows: list[tuple[Any, ...]] = []
    moving = [row for line, row in rows.items() if move and line in wanted and not wanted[line][2]
              and row[at["state"]] == "succeeded" and row[at["refused"]] is None]  # a refusal is counted from rows
    moved: list[tuple[Any, ...]] = []
    if moving:
        key = await finished.batch_key(session, batch_id)
        numbers = await finished.model_numbers(session, key, [row[at["model"]] for row in moving])
        moved = [_narrow(key, numbers, at, row, *wanted[row[at["line"]]][:2]) for row in moving]
        await finished.insert(session, moved)
    gone = {row[1] for row in moved}
    for line, row in rows.items():
        if line not in wanted:
            continue
        offset, length, keep = wanted[line]
        values = list(row)
        for name in DROPPED:
            values[at[name]] = None
        values[at["out_offset"]], values[at["out_length"]] = offset, length
        if not keep:
            values[at["body"]] = COMPACTED_BODY
        if line not in gone:
            new_rows.append(tuple(values))
    lines = [*gone, *(v[at["line"]] for v in new_rows)]
    delete_marks = _marks(dialect.paramstyle, len(lines) + 1)
    await connection.exec_driver_sql(
        f"DELETE FROM requests WHERE batch_id={delete_marks[0]} AND line IN ({', '.join(delete_marks[1:])})",
        (batch_id, *lines))
    if new_rows:
        insert_marks = _marks(dialect.paramstyle, len(columns))
        await connection.exec_driver_sql(
            f"INSERT INTO requests ({', '.join(columns)}) VALUES ({', '.join(insert_marks)})", new_rows)


def _narrow(key: int, numbers: dict[str, int], at: dict[str, int], row: Sequence[Any], offset: int, length: int
            ) -> tuple[Any, ...]:
    """The ``finished_lines`` row (``finished.MOVED_COLUMNS``) of a succeeded ``requests`` row."""
    cache_key, identity = row[at["cache_key"]], row[at["cache_identity"]]
    return (key, row[at["line"]], offset, length, numbers[row[at["model"]]], row[at["host"]],
            row[at["cached_from"]] is not None, row[at["prompt_tokens"]], row[at["completion_tokens"]],
            row[at["reasoning_tokens"]],
            finished.digest(identity, cache_key) if cache_key is not None and identity is not None else None)


async def release_free_pages(session: AsyncSession) -> None:
    """Hand the store's free pages back to the filesystem: SQLite with incremental auto-vacuum (new stores are
    made so); elsewhere nothing (PostgreSQL's autovacuum makes the space reusable in place)."""
    if _dialect(session).name == "sqlite":
        connection = await session.connection()
        raw = await connection.get_raw_connection()
        # run to its end as a script: the driver's execute steps a statement without result columns once, and
        # each step of incremental_vacuum frees one page
        await raw.driver_connection.executescript("PRAGMA incremental_vacuum;")  # type: ignore[union-attr]
