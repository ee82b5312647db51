"""Reading a batch's results at any time, alone or merged over its retry chain.

While a batch runs its lines finish out of order; a reader pages through them in input order with a cursor (the
last line it was given). A page holds the finished lines after the cursor up to the first line still running, so a
reader that follows the cursor gets every line exactly once, in input order, however the lines finish. Each page is
one range of the rows' primary key (``obatch.store.chains``): reading costs the batch that writes the rows a short
read per page, never a scan.

Merged over a chain (``merged=True``), each line of the root batch reads as its latest outcome: the line of the
newest retry that ran it, else the root's own. While a retry runs, a cursor reader's page also stops at a line that
retry will run and has not yet (at any line not succeeded while the retry's file is still being imported): a line
is given once, at its outcome in the chain, not at an outcome the retry is about to replace.

Lines are the output writer's bytes (``results.output_lines``), so a line read here is the line of its batch's
output or error file (a compacted batch's, read from that file).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obatch.batches import provenance
from obatch.batches.results import READ_COLUMNS, output_lines
from obatch.protocol import FINAL_STATUSES, NOT_RUN_CODES
from obatch.store import chains
from obatch.store.db import Sessions
from obatch.store.tables import BatchRow

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


@dataclass
class Outcomes:
    """One page of outcomes: (the batch that gave the line, its row: the columns asked, then its line)."""

    items: list[tuple[BatchRow, tuple[Any, ...]]] = field(default_factory=list)
    after: int = 0  # the cursor for the next page: the last root line this page covered
    finished: bool = False  # no line will follow and none will change: the chain is final, the page reached the end
    more: bool = False  # rows after this page exist (finished or not)


@dataclass
class ResultsPage:
    """Output lines (the output writer's bytes, in input order), the cursor for the next page, and whether the
    batch (and, merged, its chain) is final and the page reached its end."""

    lines: list[bytes]
    after: int
    finished: bool
    more: bool = False  # lines after this page exist, finished or not

    @property
    def body(self) -> bytes:
        return b"".join(self.lines)


def not_run_code(batch: BatchRow) -> str | None:
    """The error code of a final batch's lines that never ran (None for a batch still running, or completed)."""
    return NOT_RUN_CODES.get(batch.status)


async def outcomes(sessions: Sessions, batch_id: str, columns: Sequence[str], *, owner: str | None = None,
                   after: int = 0, limit: int = DEFAULT_LIMIT, merged: bool = False, contiguous: bool = True
                   ) -> Outcomes:
    """The outcomes of the lines after ``after`` (up to ``limit`` lines of the batch, or of the chain's root when
    ``merged``). ``contiguous`` stops at the first line still running (a cursor reader's page); otherwise running
    lines are skipped (a snapshot of everything finished). ``columns`` must hold ``custom_id`` and ``state``."""
    ident, state = columns.index("custom_id"), columns.index("state")
    async with sessions() as session:
        family = await chains.chain(session, batch_id, owner, fresh=True)
        root = family[0] if merged else next(b for b in family if b.id == batch_id)
        later = [b for b in family if b.seq > root.seq] if merged else []
        rows = await chains.rows_after(session, root.id, columns, after, limit)
        latest: dict[str, tuple[BatchRow, tuple[Any, ...]]] = {}
        redo = [row[ident] for row in rows if row[state] != "succeeded"]
        waiting: set[str] | None = set()  # lines a running retry will run (None: any line not succeeded)
        if later and redo:
            rank = {b.id: (i, b) for i, b in enumerate(later)}
            running = [b for b in later if b.status not in FINAL_STATUSES]
            found = await chains.rows_of(session, list(rank), redo, columns)
            pending: set[str] = set()
            for found_row in sorted(found, key=lambda r: rank[r[0]][0]):  # the newest batch's line wins
                if found_row[1 + state] != "pending":
                    latest[found_row[1 + ident]] = (rank[found_row[0]][1], found_row[1:])
                elif rank[found_row[0]][1] in running:
                    pending.add(found_row[1 + ident])
            waiting = pending if all(b.imported for b in running) else None
    page = Outcomes(after=after)
    final = root.status in FINAL_STATUSES
    stopped = False
    for row in rows:
        if contiguous and row[state] != "succeeded" and (waiting is None or row[ident] in waiting):
            stopped = True
            break
        if row[ident] in latest:
            page.items.append(latest[row[ident]])
        elif row[state] != "pending" or final:
            page.items.append((root, row))
        elif contiguous:
            stopped = True
            break
        page.after = row[-1]
    page.more = stopped or len(rows) == limit
    page.finished = (not page.more and final
                     and all(b.status in FINAL_STATUSES for b in later))
    return page


async def read_page(sessions: Sessions, batch_id: str, *, data_dir: Path, owner: str | None = None, after: int = 0,
                    limit: int = DEFAULT_LIMIT, merged: bool = False, contiguous: bool = True) -> ResultsPage:
    """A page of output lines: those finished after line ``after``, in input order, up to the first still running
    (``contiguous=False``: running lines skipped). A compacted batch's lines are read from its files under
    ``data_dir`` (the store's data directory)."""
    page = await outcomes(sessions, batch_id, READ_COLUMNS, owner=owner, after=after, limit=limit, merged=merged,
                          contiguous=contiguous)
    facts = HostFacts()
    lines: list[bytes] = [b""] * len(page.items)
    for batch, at in by_batch(page.items):  # a compacted line is read from its batch's file
        made = await output_lines(batch, [page.items[i][1] for i in at], not_run_code(batch), facts(batch),
                                  data_dir=data_dir)
        for i, (_, data) in zip(at, made, strict=True):
            lines[i] = data
    return ResultsPage(lines, page.after, page.finished, page.more)


def by_batch(items: Sequence[tuple[BatchRow, tuple[Any, ...]]]) -> list[tuple[BatchRow, list[int]]]:
    """The batches of a page's items, each with the positions of its items."""
    groups: dict[str, tuple[BatchRow, list[int]]] = {}
    for i, (batch, _) in enumerate(items):
        groups.setdefault(batch.id, (batch, []))[1].append(i)
    return list(groups.values())


class HostFacts(dict[str, provenance.LineFacts]):
    """Each batch's host facts, made once (the lines of a merged page or frame come from several batches)."""

    def __call__(self, batch: BatchRow) -> provenance.LineFacts:
        if batch.id not in self:
            self[batch.id] = provenance.LineFacts(provenance.entries_of(batch))
        return self[batch.id]


async def follow(sessions: Sessions, batch_id: str, *, data_dir: Path, merged: bool = False,
                 interval: float | None = None, limit: int = MAX_LIMIT) -> AsyncIterator[bytes]:
    """Output lines in input order. Without ``interval``: every line finished now (running ones skipped). With
    it: each line once as it finishes, polling every ``interval`` seconds until the batch (merged: its chain) is
    final."""
    after = 0
    while True:
        page = await read_page(sessions, batch_id, data_dir=data_dir, after=after, limit=limit, merged=merged,
                               contiguous=interval is not None)
        for line in page.lines:
            yield line
        after = page.after
        if page.finished or (interval is None and not page.more):
            return
        if interval is not None and len(page.lines) < limit:  # caught up with the batch: wait for more
            await asyncio.sleep(interval)


async def iter_finished(sessions: Sessions, batch_id: str, columns: Sequence[str], *, owner: str | None = None,
                        merged: bool = False, limit: int = 500) -> AsyncIterator[tuple[BatchRow, tuple[Any, ...]]]:
    """Every line finished now (running ones skipped), in input order, a page at a time."""
    after = 0
    while True:
        page = await outcomes(sessions, batch_id, columns, owner=owner, after=after, limit=limit, merged=merged,
                              contiguous=False)
        for item in page.items:
            yield item
        if not page.more:
            return
        after = page.after
