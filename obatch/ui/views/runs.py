"""A batch's reuse and retries, its results read while it runs, and where an opened result row came from.

``LiveResults`` is what a page has read of a batch's ``GET /v1/batches/{id}/results`` so far: a frame that only
grows (each page's lines appended, in input order), the cursor of the next page, and whether the last line was read.
``read_more`` asks for the pages after the cursor through a function the page gives it, so nothing read is read
twice and the logic is tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, TypeVar

import polars as pl

from obatch.batches.retry import RETRYABLE_CODES
from obatch.protocol import Batch
from obatch.ui.views.batches import is_final
from obatch.ui.views.results import results_frame

PAGE_LINES = 1000  # lines asked per page (the server's most)
PAGES_PER_DRAW = 5  # pages read per refresh of a running batch: the table grows without holding the page up
Fetch = Callable[[int, int], tuple[bytes, int, bool]]
"""``fetch(after, limit)`` → (the page's JSONL bytes, the cursor of the next page, whether no line will follow)."""


def _empty() -> pl.DataFrame:
    return results_frame(None, origin=True)


@dataclass
class LiveResults:
    """The lines of a batch read so far, in input order; ``after``: the cursor; ``finished``: every line read."""

    frame: pl.DataFrame = field(default_factory=_empty)
    after: int = 0
    finished: bool = False
    pages: int = 0  # pages asked for so far (how often the server was asked)

    def grow(self, raw: bytes, after: int, finished: bool) -> LiveResults:
        """This page's lines appended (a page holds only lines after the cursor: none is read twice)."""
        new = results_frame(raw, origin=True)
        frame = pl.concat([self.frame, new]) if not new.is_empty() else self.frame
        return LiveResults(frame, max(self.after, after), finished, self.pages + 1)


class Read(Protocol):
    """What ``read_more`` reads into: the cursor, whether the last line was read, and a page appended."""

    after: int
    finished: bool

    def grow(self, raw: bytes, after: int, finished: bool) -> Self: ...


R = TypeVar("R", bound=Read)


def read_more(live: R, fetch: Fetch, *, final: bool, pages: int = PAGES_PER_DRAW, limit: int = PAGE_LINES) -> R:
    """The pages after ``live``'s cursor: up to ``pages`` of them while the batch runs (a page short of ``limit``
    means it caught up with the lines finished), every one up to the last once the batch is ``final``."""
    while not live.finished and (final or pages > 0):
        raw, after, finished = fetch(live.after, limit)
        live = live.grow(raw, after, finished)
        pages -= 1
        if not finished and raw.count(b"\n") < limit:  # caught up with the lines finished so far
            break
    return live


def retryable(frame: pl.DataFrame) -> int:
    """Lines that failed for a reason a retry can change (what ``POST /v1/batches/{id}/retry`` takes by default:
    engine errors, timeouts, a busy engine, lines a cancel or an expiry left unrun)."""
    return frame.filter(pl.col("error_code").is_in(sorted(RETRYABLE_CODES))).height


def offers_retry(batch: Batch, live: LiveResults) -> int:
    """How many lines a "Retry failed lines" button would run again: only for a final batch not retried yet, all
    of whose results were read (0: no button)."""
    if not is_final(batch) or retries_of(batch) or not live.finished:
        return 0
    return retryable(live.frame)


def parent_of(batch: Batch) -> str | None:
    """The batch whose failed lines this batch retries."""
    return batch.obatch.parent if batch.obatch else None


def retries_of(batch: Batch) -> list[str]:
    """The batches made of this batch's failed lines, oldest first."""
    return list(batch.obatch.retries or []) if batch.obatch else []


def cached_of(batch: Batch) -> int:
    return (batch.obatch.cached or 0) if batch.obatch else 0


def reuse_text(batch: Batch) -> str | None:
    """``12 of 40 lines reused …`` while the batch runs and once it ended; None when it reused none."""
    cached = cached_of(batch)
    if not cached:
        return None
    total = batch.request_counts.total if batch.request_counts else 0
    of = f" of {total}" if total else ""
    return (f"{cached}{of} line(s) reused: answered from stored answers or an identical line of the file, "
            "without an engine call")


PROVENANCE_SCHEMA: dict[str, Any] = {"what": pl.Utf8, "value": pl.Utf8}


def _text(value: Any) -> str:
    return "—" if value is None or value == "" else str(value)


def provenance_frame(row: dict[str, Any]) -> pl.DataFrame:
    """Where an opened result row came from: host, engine and version, model digest, context asked and loaded,
    seed, attempts, and the line it reused (``—``: not known, or not set)."""
    engine = " ".join(v for v in (row.get("engine"), row.get("engine_version")) if v) or None
    asked, loaded = row.get("num_ctx"), row.get("loaded_context")
    context = None if asked is None and loaded is None else f"{_text(asked)} asked · {_text(loaded)} loaded"
    attempts = row.get("attempts")
    reused = row.get("cached_from")
    facts = [
        ("host", row.get("host") or ("— (reused: no engine ran it)" if reused else None)),
        ("engine", engine), ("model digest", row.get("model_digest")), ("num_ctx", context),
        ("seed", row.get("seed")),
        ("attempts", "0 (reused)" if reused and not attempts else attempts),
        ("cached_from", reused),
    ]
    return pl.DataFrame([{"what": k, "value": _text(v)} for k, v in facts], schema=PROVENANCE_SCHEMA)
