"""A retry chain's results read as one: each line's latest outcome, and the batch of the chain it came from.

``GET /v1/batches/{id}/results?merged=true`` gives each line of the chain's first batch, in its input order, as the
line of the newest batch that ran it, byte for byte as that batch holds it. The merged lines do not name their
batch; each line's ``id`` does, being unique across batches: a line is the first batch's or a retry's as that
batch's own results hold it. Only one batch of a chain runs at a time (a retry waits for the chain to be final), so
the ids of the chain's final batches are read once, and a line none of them holds came from the batch still running.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson
import polars as pl

from obatch.protocol import Batch
from obatch.ui.views.batches import is_final
from obatch.ui.views.results import for_display, results_frame
from obatch.ui.views.runs import parent_of, retries_of

FROM = "from batch"  # the merged table's column naming the batch each row's outcome came from
MAX_CHAIN = 1000  # batches followed at most (a chain is a handful of retries; this only stops a cycle)


@dataclass
class RawResults:
    """A ``/results`` read as it came: its JSONL pages appended (``read_more`` reads into it as into
    ``LiveResults``)."""

    pages_read: list[bytes] = field(default_factory=list)
    after: int = 0
    finished: bool = False
    pages: int = 0

    def grow(self, raw: bytes, after: int, finished: bool) -> RawResults:
        return RawResults([*self.pages_read, raw], max(self.after, after), finished, self.pages + 1)

    @property
    def raw(self) -> bytes:
        return b"".join(self.pages_read)


def line_ids(raw: bytes) -> list[str]:
    """Each output line's ``id``, in the order of the lines."""
    return [str(orjson.loads(line)["id"]) for line in raw.splitlines() if line.strip()]


def chain_of(batch: Batch, get: Callable[[str], Batch]) -> list[Batch]:
    """The chain ``batch`` belongs to: its first batch, then every retry made from it (directly or not) in creation
    order; ``get`` finds a batch by id. Just ``[batch]`` for a batch never retried that retries none."""
    root = batch
    for _ in range(MAX_CHAIN):
        if (parent := parent_of(root)) is None:
            break
        root = batch if parent == batch.id else get(parent)
    found, level = [root], [root]
    while level and len(found) < MAX_CHAIN:
        level = [batch if child == batch.id else get(child) for b in level for child in retries_of(b)]
        found += level
    return sorted(found, key=lambda b: b.created_at)  # stable: a tie keeps the order the links gave


def merged_frame(raw: bytes, sources: Mapping[str, str], running: str | None) -> pl.DataFrame:
    """The merged lines as the page's results table shows them (``for_display``), in the first batch's input order
    as the server sent them, with ``FROM`` second: the batch whose ``sources`` (line id → batch id) hold the line,
    else the batch still ``running``. ``line`` is left out: a retried line's is its line in the retry's own file."""
    frame = for_display(results_frame(raw, origin=True, keep_order=True))
    origin = [sources.get(i, running) for i in line_ids(raw)]
    frame = frame.with_columns(pl.Series(FROM, origin, dtype=pl.Utf8)).drop("line")
    return frame.select("custom_id", FROM, pl.exclude("custom_id", FROM))


def merged_summary(frame: pl.DataFrame, chain: Sequence[Batch]) -> str:
    """``1,000 lines: 990 succeeded — 40 of them in the retry batch-…; 10 still failed`` (and what a batch of the
    chain still running has left to run)."""
    ok = frame.filter(pl.col("status") == "succeeded")
    by_batch = dict(ok[FROM].value_counts().iter_rows()) if not ok.is_empty() else {}
    retried = [f"{by_batch[b.id]:,} of them in the retry {b.id}" for b in chain[1:] if by_batch.get(b.id)]
    total = chain[0].request_counts.total if chain and chain[0].request_counts else frame.height
    text = f"{frame.height:,} lines: {ok.height:,} succeeded"
    if frame.height < total:  # the server holds back a line a running retry has still to run, and those after it
        text = f"The first {frame.height:,} of {total:,} lines (the rest wait for the retry): {ok.height:,} succeeded"
    text += f" — {', '.join(retried)}" if retried else ""
    if failed := frame.height - ok.height:
        text += f"; {failed:,} still failed"
    for b in chain:
        counts = b.request_counts
        if not is_final(b) and counts is not None:
            left = counts.total - counts.completed - counts.failed
            text += f"; {b.id} is still running: {left:,} of its {counts.total:,} lines to go"
    return text
