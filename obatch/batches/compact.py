"""Compaction: once a batch's output and error files are written, its rows stop keeping a third copy of them.

A finished row holds its answer (``response``, ``content``), its error text and its request id, which its output or
error line holds too, and its request body, which the input file holds. At finalisation, after the files are
durable and before the batch takes its final status, each row is rewritten with the offset and length of its line
in its file (the output file for a succeeded row, the error file for the others) instead of that text
(``obatch.store.compaction``). What is kept: every small typed column (state, codes, token counts, timings,
provenance, the cache key and model identity), the request body of each line that did not succeed (what a retry
sends again) and of the first ``KEEP_BODIES`` lines (what the estimator's history replays). The other succeeded
lines of a batch that is not a retry leave ``requests`` for a narrow row (``obatch.store.finished``): its batch's and
model's numbers, its line's index, host, token counts and a 16-byte cache digest; its output line holds the rest,
read back by ``restore`` as the dropped text is. Only batches whose files the store keeps (under the data
directory) are compacted; a CLI run told to write elsewhere keeps its rows whole. The batch names its files
relative to the data directory (``results_files``), and a reader finds them under the data directory it is given:
the directory can be moved or renamed (a path an older store keeps absolute is used as it is).

Every reader of the dropped text goes through ``stored_lines`` (the line's bytes, read from its file by the index)
or ``restore`` (the dropped columns made again from those bytes): the output writer, ``/results`` and merged
chains, the notebook frame and the response cache. When the files are gone (expired or deleted), a compacted line
cannot be read: the cache misses, and a reader of results is told so.

Crash safety: the index is derived from the files as they lie on disk after an fsync, a page of rows per
transaction, each row's index and dropped text changing together; the batch is still unfinished until every row is
done, so a crash anywhere is repaired by finalising again, which reads compacted rows from the files it rewrites.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from obatch import errors
from obatch.batches.services import Services
from obatch.protocol import response_content
from obatch.store import compaction, repo
from obatch.store.tables import BatchRow

log = logging.getLogger(__name__)

KEEP_BODIES = 2000  # the first lines of a batch keep their request body (``bench.estimate``'s history reads them)
PAGE = 500
INDEX = compaction.INDEX  # the columns a reader adds to those it asks for, before the line


def owned(settings_data_dir: Path, *paths: Path) -> bool:
    """Whether the store keeps these files (they lie under its data directory): only then are rows compacted."""
    root = Path(os.path.abspath(settings_data_dir))
    return all(Path(os.path.abspath(path)).is_relative_to(root) for path in paths)


def _stored(data_dir: Path, path: Path) -> str:
    """How a batch names one of its files: relative to the data directory (so the directory can move), or absolute
    when the file lies elsewhere."""
    root, where = Path(os.path.abspath(data_dir)), Path(os.path.abspath(path))
    return str(where.relative_to(root)) if where.is_relative_to(root) else str(where)


def _located(data_dir: Path, files: str) -> tuple[Path, Path]:
    """The output and error files of a batch's ``results_files``: each relative path resolved against the data
    directory as it is now, an absolute one (a store compacted before paths were relative) as it is."""
    output, error = (Path(name) for name in orjson.loads(files))
    return (output if output.is_absolute() else data_dir / output,
            error if error.is_absolute() else data_dir / error)


def files_of(batch: BatchRow, data_dir: Path) -> tuple[Path, Path] | None:
    """The output and error files a batch's compacted rows index (None: none of its rows is compacted), found
    under ``data_dir`` (the store's data directory now)."""
    return _located(data_dir, batch.results_files) if batch.results_files else None


# ----------------------------------------------------------------------------------------------- reading


def _marker(custom_id: str) -> bytes:
    return b'"custom_id":' + orjson.dumps(custom_id)


def _line_at(handle: BinaryIO, offset: int, length: int, custom_id: str | None) -> bytes:
    """The line of ``custom_id`` at ``offset`` in an open output or error file; ValueError when it is not there. A
    moved line (no custom_id kept: ``obatch.store.finished``) must be a whole line there."""
    if custom_id is None:
        handle.seek(max(offset - 1, 0))
        data = handle.read(length + 1 if offset else length)
        if data.count(b"\n") != 1 + bool(offset) or not data.endswith(b"\n") or (offset and data[:1] != b"\n"):
            raise ValueError(f"no line of {length} bytes at {offset} in {handle.name}")
        return data[1:] if offset else data
    handle.seek(offset)
    data = handle.read(length)
    if _marker(custom_id) not in data:
        raise ValueError(f"line of {custom_id!r} not at {offset} in {handle.name}")
    return data


def _read(paths: tuple[Path, Path], wanted: Sequence[tuple[bool, int, int, str | None]]) -> list[bytes]:
    handles: dict[bool, BinaryIO] = {}
    found: list[bytes] = []
    try:
        for ok, offset, length, custom_id in wanted:
            if ok not in handles:
                handles[ok] = paths[0 if ok else 1].open("rb")
            found.append(_line_at(handles[ok], offset, length, custom_id))
    finally:
        for handle in handles.values():
            handle.close()
    return found


def gone(batch: BatchRow) -> errors.NotFoundError:
    return errors.NotFoundError(f"The output or error file of batch {batch.id} is gone (expired or deleted): its "
                                "lines are no longer kept.", param="batch_id")


async def stored_lines(batch: BatchRow, rows: Sequence[tuple[Any, ...]], *, data_dir: Path, state: int,
                       custom_id: int, offset: int) -> list[bytes | None]:
    """For each row (a tuple holding its state, custom_id and ``INDEX`` at these positions): the bytes of its line
    in its file (under ``data_dir``) when it is compacted, else None (the row holds its text). ``NotFoundError``
    (``gone``) when the file is not there, or does not hold the line where the index says."""
    wanted = [(i, (row[state] == "succeeded", row[offset], row[offset + 1], row[custom_id]))
              for i, row in enumerate(rows) if row[offset] is not None]
    found: list[bytes | None] = [None] * len(rows)
    if not wanted:
        return found
    paths = files_of(batch, data_dir)
    if paths is None:
        raise gone(batch)
    try:
        data = await asyncio.to_thread(_read, paths, [w for _, w in wanted])
    except (OSError, ValueError) as exc:
        log.warning("batch %s: %s", batch.id, exc)
        raise gone(batch) from exc
    for (i, _), line in zip(wanted, data, strict=True):
        found[i] = line
    return found


# What a moved row (``obatch.store.finished``) reads from the ``obatch`` block of its output line: its column's name,
# then the block's.
_FROM_BLOCK = (("latency_ms", "latency_ms"), ("ttft_ms", "ttft_ms"), ("attempts", "attempts"), ("num_ctx", "num_ctx"),
               ("loaded_context", "loaded_context"), ("truncated", "truncated"), ("seed", "seed"),
               ("refused", "refused_answers"))


def restore(columns: Sequence[str], row: tuple[Any, ...], line: bytes, *, moved: bool = False) -> tuple[Any, ...]:
    """A compacted row (``columns``, ``INDEX``, then its line number) as it was before compaction (``columns``,
    then the line): the dropped text made again from its output or error line. A ``moved`` row (a succeeded line
    out of ``requests``, which keeps only ``finished``'s few columns) takes the rest from its output line too."""
    parsed = orjson.loads(line)
    response = parsed.get("response") or {}
    body = response.get("body") if parsed.get("error") is None or response.get("status_code") == 200 else None
    answer = body if isinstance(body, dict) else None
    error = parsed.get("error") or {}
    content, finish_reason = response_content(answer) if answer is not None else (None, None)
    made = {"request_id": parsed.get("id"),
            "response": orjson.dumps(answer).decode() if answer is not None else None,
            "content": content, "error_message": error.get("message")}
    if moved:
        block = parsed.get("obatch") or {}
        cached_from = block.get("cached_from")
        made.update({name: block.get(field) for name, field in _FROM_BLOCK},
                    custom_id=parsed.get("custom_id"), status_code=response.get("status_code"),
                    finish_reason=finish_reason,
                    cached_from=orjson.dumps(cached_from).decode() if cached_from is not None else None)
    values = [made.get(name, value) for name, value in zip(columns, row, strict=False)]
    return (*values, row[-1])


async def restored(batch: BatchRow, columns: Sequence[str], rows: Sequence[tuple[Any, ...]], *, data_dir: Path
                   ) -> list[tuple[Any, ...]]:
    """Rows read with ``INDEX`` after ``columns`` (then the line), as ``columns`` then the line: compacted ones
    restored from their files under ``data_dir`` (``restore``), the others as they are."""
    at = {name: i for i, name in enumerate(columns)}
    if "state" not in at or "custom_id" not in at:
        raise ValueError("restoring rows needs their state and custom_id")
    lines = await stored_lines(batch, rows, data_dir=data_dir, state=at["state"], custom_id=at["custom_id"],
                               offset=len(columns))
    ident = at["custom_id"]
    return [restore(columns, row, line, moved=row[ident] is None) if line is not None
            else (*row[:len(columns)], row[-1]) for row, line in zip(rows, lines, strict=True)]


def _read_answers(data_dir: Path, wanted: Sequence[tuple[str, str | None, int, int, str]]
                  ) -> dict[str, bytes | None]:
    """Each key's line (results_files, custom_id, offset, length of a succeeded row, key); None when unreadable.
    Each output file is opened once, whatever the number of answers read from it."""
    found: dict[str, bytes | None] = {}
    handles: dict[str, BinaryIO | None] = {}
    try:
        for files, custom_id, offset, length, key in wanted:
            if files not in handles:
                try:
                    handles[files] = _located(data_dir, files)[0].open("rb")
                except OSError:
                    handles[files] = None
            handle = handles[files]
            try:
                found[key] = _line_at(handle, offset, length, custom_id) if handle is not None else None
            except (OSError, ValueError):
                found[key] = None
    finally:
        for handle in handles.values():
            if handle is not None:
                handle.close()
    return found


async def answers(found: dict[str, tuple[Any, ...]], data_dir: Path) -> dict[str, tuple[Any, ...]]:
    """The response cache's stored answers (``cache_repo.cached_answers``: batch_id, custom_id,
    ``repo.FINISH_COLUMNS``' values, then the index and the batch's files) as batch_id, custom_id and those values,
    a compacted row's dropped text (a moved line's custom_id and columns too) restored from its output line (its
    file under ``data_dir``). An answer whose file can no longer be read is left out (a miss)."""
    size = 2 + len(repo.FINISH_COLUMNS)
    wanted = [(source[-1], source[1], source[size], source[size + 1], key)
              for key, source in found.items() if source[size] is not None and source[-1]]
    lines = await asyncio.to_thread(_read_answers, data_dir, wanted) if wanted else {}
    kept: dict[str, tuple[Any, ...]] = {}
    for key, source in found.items():
        values = source[:size]
        if source[size] is not None:
            line = lines.get(key)
            if line is None:
                continue
            restored = restore(("custom_id", *repo.FINISH_COLUMNS), (*values[1:], 0), line, moved=values[1] is None)
            values = (values[0], *restored[:-1])
        kept[key] = values
    return kept


# ------------------------------------------------------------------------------------------- compacting


def _durable(output: Path, error: Path) -> tuple[Path, Path]:
    """fsync the files that exist, then their folders (the renames that put them there); their absolute paths."""
    paths = (output.resolve(), error.resolve())
    for path in paths:
        if path.exists():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for folder in {path.parent for path in paths}:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return paths


def _index(handles: dict[bool, BinaryIO | None], offsets: list[int], page: Sequence[tuple[Any, ...]]
           ) -> list[tuple[int, int, int, bool]] | None:
    """(line, offset, length, keep_body) of a page of rows (custom_id, state, ``INDEX``, line) from the files' next
    lines; None when a file does not hold what the rows say (then nothing is compacted). A row moved already (no
    custom_id: a compaction cut short) must be where its index says, and needs nothing more."""
    entries = []
    for custom_id, state, offset, length, line in page:
        ok = state == "succeeded"
        handle = handles[ok]
        data = handle.readline() if handle is not None else b""
        if custom_id is None:
            if (offset, length) != (offsets[ok], len(data)) or not data.endswith(b"\n"):
                return None
            offsets[ok] += len(data)
            continue
        if not data.endswith(b"\n") or _marker(custom_id) not in data:
            return None
        if state != "pending":  # a line never run has no text to drop (its error line is made from its batch)
            entries.append((line, offsets[ok], len(data), not ok or line <= KEEP_BODIES))
        offsets[ok] += len(data)
    return entries


async def compact(svc: Services, batch_id: str, output: Path, error: Path) -> bool:
    """Compact a batch's rows against its output and error files, just written from them (module docstring).
    Returns whether every row was compacted (a file that does not match its rows leaves them whole)."""
    paths = await asyncio.to_thread(_durable, output, error)
    named = [_stored(svc.settings.data_dir, path) for path in (output, error)]
    async with svc.sessions() as session:
        await repo.set_batch(session, batch_id, results_files=orjson.dumps(named).decode())
        await session.commit()
        move = (await repo.get_batch(session, batch_id)).parent_id is None

    def open_files() -> dict[bool, BinaryIO | None]:
        return {ok: path.open("rb") if path.exists() else None for ok, path in ((True, paths[0]), (False, paths[1]))}

    handles = await asyncio.to_thread(open_files)
    offsets = [0, 0]  # error file, output file (indexed by ok)
    page: list[tuple[Any, ...]] = []
    try:
        async for row in repo.iter_values(svc.sessions, batch_id, ("custom_id", "state", *INDEX)):
            page.append(row)
            if len(page) >= PAGE and not await _compact_page(svc, batch_id, handles, offsets, page, move):
                return False
        return await _compact_page(svc, batch_id, handles, offsets, page, move)
    finally:
        await asyncio.to_thread(lambda: [h.close() for h in handles.values() if h is not None])


async def _compact_page(svc: Services, batch_id: str, handles: dict[bool, BinaryIO | None], offsets: list[int],
                        page: list[tuple[Any, ...]], move: bool) -> bool:
    entries = await asyncio.to_thread(_index, handles, offsets, page)
    page.clear()
    if entries is None:
        log.warning("batch %s: its files do not match its rows; its rows are kept whole", batch_id)
        return False
    async with svc.sessions() as session:
        await compaction.rewrite_page(session, batch_id, entries, move=move)
        await session.commit()
    return True


async def release(svc: Services) -> None:
    """Give the pages compaction freed back to the filesystem (``compaction.release_free_pages``)."""
    async with svc.sessions() as session:
        await compaction.release_free_pages(session)
        await session.commit()
