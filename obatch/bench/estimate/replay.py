"""The order and the prompt-cache reuse obatch's scheduler will give a batch, replayed before it runs.

With ``--schedule auto`` (the default) the lines of one prefix group (``obatch.prefix``) run one after another on
one slot (``obatch.schedule``), so after a group's first line on a slot, its shared prefix is in that slot's cache
and costs (nearly) no prompt time; with ``--schedule file`` the lines go in the file's order and a line finds its
prefix only where one of the last ``c`` lines sent shares it (``shape.cached_shares``). The replay runs the real
``obatch.schedule.Scheduler`` on the lines' prefix keys and expected lengths (``schedule.expected_length``, the
scheduler's own measure), ``c`` slots at a time, each slot ending after its line's expected length; a line's cached
share is its common prefix with the last prompt its slot ran (the engine gives a request the slot just freed: the
only free one while the host is full), as a share of its prompt. How much of that share the engine really skips is
``TokenCalibration.cache_kept`` (``obatch.bench.estimate.calibrate``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, cast

from obatch.backends.base import Backend
from obatch.backends.pool import Host
from obatch.concurrency import FixedLimit
from obatch.runner import Job
from obatch.schedule import Scheduler

T = TypeVar("T")


def _now(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (the replay's store is a list): no event loop needed, so the
    replay runs in the estimate's worker thread like the rest of its CPU work."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("the replayed scheduler waited on something")


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings (binary search over C-speed comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def grouped(keys: Sequence[int | None]) -> int:
    """How many prefix groups the keys form (a key two lines or more share)."""
    return sum(n > 1 for key, n in Counter(keys).items() if key is not None)


def replay(keys: Sequence[int | None], lengths: Sequence[int], slots: int) -> list[tuple[int, int]]:
    """(line index, slot) in the order the scheduler starts the lines, ``slots`` in flight, each running for its
    ``lengths`` (the scheduler's expected length); the slot that frees first takes the next line."""

    async def fetch(lines: Sequence[int]) -> list[Job]:
        return [Job(line, "", "", {}) for line in lines]

    scheduler = Scheduler(fetch)
    scheduler.add((i, key, length, None) for i, (key, length) in enumerate(zip(keys, lengths, strict=True)))
    host = Host(backend=cast(Backend, None), limit=FixedLimit(max(1, slots)))
    free = list(range(max(1, slots)))[::-1]
    running: list[tuple[float, int, int, Job]] = []  # (end, start order, slot, job)
    order: list[tuple[int, int]] = []
    clock = 0.0
    while True:
        while free and (job := _now(scheduler.next(host))) is not None:
            slot = free.pop()
            heapq.heappush(running, (clock + max(1, lengths[job.line]), len(order), slot, job))
            order.append((job.line, slot))
        if not running:
            return order
        clock, _, slot, job = heapq.heappop(running)
        scheduler.finished(job, None)
        free.append(slot)


def scheduled_shares(texts: Sequence[str], keys: Sequence[int | None], lengths: Sequence[int], slots: int
                     ) -> tuple[list[int], list[float]]:
    """The order the scheduler runs these lines in (indices) and each line's share of its prompt (by index) that
    its slot's cache holds when it starts: its common prefix with the prompt the slot ran last."""
    last: dict[int, str] = {}
    shares = [0.0] * len(texts)
    order = []
    for i, slot in replay(keys, lengths, slots):
        text, before = texts[i], last.get(slot)
        if text and before:
            shares[i] = common_prefix(text, before) / len(text)
        last[slot] = text
        order.append(i)
    return order, shares


def run_shares(texts: Sequence[str], keys: Sequence[int | None], lengths: Sequence[int], window: int,
               schedule: str) -> tuple[list[int] | None, list[float]]:
    """What the engine's cache holds of each prompt as the batch runs them: under ``"auto"``, where the keys form
    prefix groups, the scheduler's order (indices) and each line's share in that order (``scheduled_shares``); else
    None (the file's order) and ``cached_shares``' shares, but for the first ``window`` lines: they leave together,
    each to an empty slot, so none finds another's prompt there."""
    if schedule == "auto" and len(keys) == len(texts) and grouped(keys):
        order, shares = scheduled_shares(texts, keys, lengths, window)
        return order, [shares[i] for i in order]
    shares = cached_shares(texts, window)
    return None, [0.0] * min(window, len(shares)) + shares[window:]


def cached_shares(texts: Sequence[str], window: int) -> list[float]:
    """For each prompt, the share an engine's prompt cache is expected to hold already: its common prefix with
    the prompts of the ``window`` requests before it, averaged (llama.cpp and Ollama keep one cached prompt per
    slot and give a new request the slot just freed, i.e. one of the last ``window`` requests)."""
    shares = []
    for i, text in enumerate(texts):
        previous = texts[max(0, i - window):i]
        if not text or not previous:
            shares.append(0.0)
            continue
        shares.append(sum(common_prefix(text, p) for p in previous) / len(previous) / len(text))
    return shares

