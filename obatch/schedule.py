"""Which line runs next: prefix-affine and length-aware, instead of the file's order.

An engine keeps each slot's last prompt (``obatch.prefix``), and when a request ends the next one sent to that host
lands in the slot it freed (the only free one when the host is full; Ollama picks the free slot with the longest
common prefix, llama.cpp the most similar). So the line to send when a slot frees up on a host is the next line of
the prefix group that slot just ran. The scheduler keeps *lanes*: one per request in flight on a host, each holding
one prefix group at a time. When the runner has a slot on a host (``next``), the lane whose request ended last there
continues its group; a lane without one takes a group no lane holds (the one this host ran before, when it was moved
off it; else the biggest remaining work first), else a line of no group (longest expected first), else it helps the
group with the most lines per lane (when there are fewer groups than lanes). Lanes above a host's level give their
groups back (one that helps a group another lane runs first), and so do the lanes of a host that went down (its lines
retry elsewhere, its groups move).

Starvation: a group holds one lane unless lanes would otherwise idle, and a lane gives its group back after
``QUANTUM`` lines in a row while other groups wait for a lane (round robin), so a 10,000-line group beside a 50-line
group delays it by at most ``QUANTUM`` lines per lane; other batches share the hosts through the pool's first come,
first served leases, which the scheduler never holds.

Length-aware: within a group and among lines of no group, the lines expected to run longest (their output budget,
and their prompt at ``PROMPT_PER_OUTPUT`` prompt tokens per output token) start first, so a batch does not end with
one long answer running alone. Orders are kept coarse (``_bucket``: steps of ~19%), so equal lines keep file order.
Lines of no group go in the file's order while the host's level is not settled yet (auto concurrency still doubling:
its windows count completions, and long lines first would slow its climb). Lines that set their own ``num_ctx`` run
last, by context, so the model reloads as few times as it can.

Memory: the lookahead is a few integers per pending line (line numbers in arrays, per group); bodies stay in the
store and are read when a group or the ungrouped queue runs out, ``PAGE`` lines at a time.
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from obatch.backends.base import Result
from obatch.backends.pool import Host
from obatch.runner import Job
from obatch.store import repo
from obatch.store.db import Sessions

QUANTUM = 32  # lines a lane runs of one group in a row while another group waits for a lane
PAGE = 16  # bodies read from the store at a time, per group and for the lines of no group
PROMPT_PER_OUTPUT = 50  # prompt tokens that cost about what one output token costs (prefill is ~50× decode)

Fetch = Callable[[Sequence[int]], Awaitable[list[Job]]]


def _bucket(hint: int) -> int:
    """A coarse length class (4 per doubling): lines within ~19% of each other keep their file order."""
    return int(4 * math.log2(max(hint, 1)))


def expected_length(prompt_estimate: int, max_tokens: int | None, default_budget: int) -> int:
    """What a line is expected to cost, in output-token equivalents: its output budget plus its prompt's share."""
    return (max_tokens if max_tokens is not None else default_budget) + prompt_estimate // PROMPT_PER_OUTPUT


@dataclass(eq=False, slots=True)
class _Queue:
    """Lines to run, longest expected first, consumed from ``at``; bodies read ahead into ``ready``."""

    lines: array[int]
    work: int = 0  # expected length of its lines (what orders the groups at the start)
    at: int = 0
    ready: deque[Job] = field(default_factory=deque)
    key: int | None = None
    home: Host | None = None  # the host whose slots last held this group's prefix
    lanes: int = 0  # lanes holding it now

    def left(self) -> int:
        return len(self.lines) - self.at + len(self.ready)

    def take(self, n: int, longest: bool) -> Sequence[int]:
        lines = self.lines[self.at:self.at + n]
        self.at += len(lines)
        return lines


class _Loose:
    """Lines of no group, taken in the file's order or longest expected first (the two orders share one record of
    what was taken: a byte a line)."""

    key = None

    def __init__(self, lines: array[int], hints: array[int]) -> None:
        self.lines = lines  # in the file's order
        self.taken = bytearray(len(lines))
        self.at = 0
        self.count = len(lines)
        self.ready: deque[Job] = deque()
        classes: dict[int, array[int]] = defaultdict(lambda: array("q"))
        for i, hint in enumerate(hints):
            classes[_bucket(hint)].append(i)
        self.classes = [positions for _, positions in sorted(classes.items(), reverse=True)]
        self.class_at = [0] * len(self.classes)

    def left(self) -> int:
        return self.count + len(self.ready)

    def take(self, n: int, longest: bool) -> Sequence[int]:
        out: list[int] = []
        if longest:
            for c, positions in enumerate(self.classes):
                i = self.class_at[c]
                while i < len(positions) and len(out) < n:
                    out.extend(self._mark(positions[i]))
                    i += 1
                self.class_at[c] = i
                if len(out) >= n:
                    break
        else:
            while self.at < len(self.lines) and len(out) < n:
                out.extend(self._mark(self.at))
                self.at += 1
        self.count -= len(out)
        return out

    def _mark(self, position: int) -> list[int]:
        if self.taken[position]:
            return []
        self.taken[position] = 1
        return [self.lines[position]]


@dataclass(eq=False, slots=True)
class _Lane:
    host: Host
    group: _Queue | None = None
    run: int = 0  # lines of its group in a row
    busy: bool = False
    idle_since: int = 0


def _helps(lane: _Lane) -> bool:
    """Whether the lane runs a group that another lane runs too."""
    return lane.group is not None and lane.group.lanes > 1


@dataclass
class Stats:
    """What the scheduler found and what the engine said about its cache (``as_dict`` is the batch's record)."""

    schedule: str = "auto"
    groups: int = 0
    grouped_lines: int = 0
    lines: int = 0
    prompt_tokens: int = 0  # of the lines whose engine told its cache use
    cached_tokens: int = 0
    reported: int = 0  # lines whose engine told its cache use
    answered: int = 0

    def observe(self, result: Result | None) -> None:
        if result is None:
            return
        self.answered += 1
        timings = result.timings
        if timings.cached_tokens is None:
            return
        usage = result.body.get("usage") if isinstance(result.body, dict) else None
        total = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(total, int):
            total = timings.cached_tokens + (timings.prompt_tokens or 0)
        self.reported += 1
        self.cached_tokens += timings.cached_tokens
        self.prompt_tokens += total

    def as_dict(self) -> dict[str, Any]:
        """The batch's record. ``cached_prompt_share`` is None where no engine told its cache use (Ollama reports
        every prompt token as evaluated, cached or not)."""
        share = self.cached_tokens / self.prompt_tokens if self.reported and self.prompt_tokens else None
        return {"schedule": self.schedule, "groups": self.groups, "grouped_lines": self.grouped_lines,
                "lines": self.lines, "cached_prompt_share": None if share is None else round(share, 4),
                "cached_prompt_tokens": self.cached_tokens, "reported_prompt_tokens": self.prompt_tokens,
                "cache_reported_lines": self.reported, "answered_lines": self.answered}

    def add_reports(self, before: dict[str, Any]) -> None:
        """Count what an earlier run of the same batch saw (``as_dict``'s record)."""
        self.cached_tokens += int(before.get("cached_prompt_tokens") or 0)
        self.prompt_tokens += int(before.get("reported_prompt_tokens") or 0)
        self.reported += int(before.get("cache_reported_lines") or 0)
        self.answered += int(before.get("answered_lines") or 0)


class FileOrder:
    """The file's order (``--schedule file``), its answers' cache use still counted."""

    def __init__(self, jobs: AsyncIterator[Job], stats: Stats) -> None:
        self._jobs = aiter(jobs)
        self.stats = stats

    async def next(self, host: Host) -> Job | None:
        return await anext(self._jobs, None)

    def finished(self, job: Job, result: Result | None) -> None:
        self.stats.observe(result)


def _ordered(lines: array[int], hints: array[int]) -> tuple[array[int], int]:
    """The lines longest expected first (file order among equals), and their summed expected length."""
    order = sorted(range(len(lines)), key=lambda i: _bucket(hints[i]), reverse=True)  # stable: file order kept
    return array("q", (lines[i] for i in order)), sum(hints)


class _Builder:
    """The pending lines collected by key, as arrays (a few integers a line), before the queues are made."""

    def __init__(self) -> None:
        self.by_key: dict[int, tuple[array[int], array[int]]] = {}
        self.loose_lines: array[int] = array("q")
        self.loose_hints: array[int] = array("q")
        self.own: list[tuple[int, int]] = []

    def add(self, line: int, key: int | None, hint: int, own_ctx: int | None) -> None:
        if own_ctx is not None:
            self.own.append((own_ctx, line))
        elif key is None:
            self.loose_lines.append(line)
            self.loose_hints.append(hint)
        else:
            found = self.by_key.get(key)
            if found is None:
                self.by_key[key] = found = (array("q"), array("q"))
            found[0].append(line)
            found[1].append(hint)


class Scheduler:
    """The job source of one model group of a batch (``runner.run_jobs`` calls ``next`` and ``finished``)."""

    def __init__(self, fetch: Fetch, *, quantum: int = QUANTUM, page: int = PAGE, stats: Stats | None = None
                 ) -> None:
        self._fetch = fetch
        self.quantum = quantum
        self.page = page
        self.stats = stats or Stats()
        self._waiting: dict[Host | None, deque[_Queue]] = defaultdict(deque)  # groups no lane holds, by home
        self._active: set[_Queue] = set()  # groups some lane holds
        self._loose = _Loose(array("q"), array("q"))  # lines of no group
        self._own = _Queue(array("q"))  # lines that set their own num_ctx: last, by context (fewest reloads)
        self._lanes: dict[Host, list[_Lane]] = defaultdict(list)
        self._running: dict[int, _Lane] = {}  # line → the lane running it
        self._clock = 0

    # -------------------------------------------------------------------------------------------- building

    def add(self, keys: Iterable[tuple[int, int | None, int, int | None]]) -> None:
        """The pending lines as (line, prefix key or None, expected length, own num_ctx or None), in line order."""
        builder = _Builder()
        for row in keys:
            builder.add(*row)
        self._build(builder)

    def _build(self, builder: _Builder) -> None:
        groups: list[_Queue] = []
        loose_lines, loose_hints = builder.loose_lines, builder.loose_hints
        for key, (lines, hints) in builder.by_key.items():
            if len(lines) == 1:  # a key no other line shares: not a group
                loose_lines.extend(lines)
                loose_hints.extend(hints)
                continue
            ordered, work = _ordered(lines, hints)
            groups.append(_Queue(ordered, work=work, key=key))
        builder.by_key.clear()
        if loose_lines:
            merged = sorted(range(len(loose_lines)), key=loose_lines.__getitem__)  # back to file order
            lines = array("q", (loose_lines[i] for i in merged))
            hints = array("q", (loose_hints[i] for i in merged))
            del merged, loose_lines, loose_hints
            self._loose = _Loose(lines, hints)
        builder.own.sort()
        self._own.lines = array("q", (line for _, line in builder.own))
        groups.sort(key=lambda g: g.work, reverse=True)  # the biggest work first
        self._waiting[None].extend(groups)

    @classmethod
    async def load(cls, sessions: Sessions, batch_id: str, model: str, fetch: Fetch, *, default_budget: int,
                   **options: Any) -> Scheduler:
        """A scheduler over a batch's pending lines of ``model``, read from the store without their bodies."""
        scheduler = cls(fetch, **options)
        builder = _Builder()
        async for line, key, estimate, cap, own_ctx in repo.iter_pending_keys(sessions, batch_id, model):
            builder.add(line, key, expected_length(estimate or 0, cap, default_budget), own_ctx)
        scheduler._build(builder)
        return scheduler

    # ------------------------------------------------------------------------------------------- picking

    async def next(self, host: Host) -> Job | None:
        """The job for a slot just leased on ``host``; None when no line is left to start."""
        while True:
            lane = self._lane(host)
            queue = self._choose(lane, host)
            if queue is None:
                return None
            job = await self._take(queue, longest=host.limit.settled)
            if job is None:  # that queue's lines were no longer pending: choose again
                continue
            lane.busy = True
            lane.run += 1
            self._running[job.line] = lane
            return job

    def finished(self, job: Job, result: Result | None) -> None:
        """A job ended (answered, failed or given up): its lane is free for the next line of its group."""
        self.stats.observe(result)
        lane = self._running.pop(job.line, None)
        if lane is not None:
            lane.busy = False
            self._clock += 1
            lane.idle_since = self._clock

    def _lane(self, host: Host) -> _Lane:
        """The lane that runs on this slot: the idle one with work that ended last (the slot it freed holds its
        group's prefix), else an idle one, else a new one. Lanes past the host's level give their groups back, and
        so does every lane of a host that is down. Of those past the level, a lane that helps a group another lane
        also runs goes first, and while one is busy no other lane is dropped: a level one above for a moment (auto's
        check of the slots) then costs its own lane, the one it opened, and not a group its slot was taken from (that
        group would wait for a lane, and every lane give its group back in turn after ``QUANTUM`` lines: a cache
        miss each). Then the longest idle (their slots have most likely run other lines since)."""
        for other, lanes in list(self._lanes.items()):
            if not other.up:
                for lane in [lane for lane in lanes if not lane.busy]:
                    self._drop(lane, home=None)
        lanes = self._lanes[host]
        surplus = len(lanes) - max(host.limit.level, 1)
        for lane in [lane for lane in lanes if not lane.busy and _helps(lane)][:max(surplus, 0)]:
            self._drop(lane, home=host)
        idle = [lane for lane in lanes if not lane.busy]
        with_work = [lane for lane in idle if lane.group is not None and lane.group.left() > 0]
        chosen = max(with_work or idle, key=lambda lane: lane.idle_since, default=None)
        if chosen is None:
            chosen = _Lane(host)
            lanes.append(chosen)
        surplus = len(lanes) - max(host.limit.level, 1)
        if any(lane.busy and _helps(lane) for lane in lanes):
            surplus = 0  # it gives its group share back once it ends
        for lane in sorted(idle, key=lambda lane: lane.idle_since):  # the longest idle first
            if surplus <= 0:
                break
            if lane is not chosen:
                self._drop(lane, home=host)
                surplus -= 1
        return chosen

    def _drop(self, lane: _Lane, *, home: Host | None) -> None:
        self._release(lane, home=home, front=True)
        self._lanes[lane.host].remove(lane)
        if not self._lanes[lane.host]:
            del self._lanes[lane.host]

    def _release(self, lane: _Lane, *, home: Host | None, front: bool = False) -> None:
        """The lane lets its group go; a group with lines left waits for a lane again (at the front: it was cut
        short by a level or a host, not by its turn)."""
        group, lane.group, lane.run = lane.group, None, 0
        if group is None:
            return
        group.lanes -= 1
        if group.lanes > 0:
            return
        self._active.discard(group)
        if group.left() > 0:
            group.home = home
            if front:  # the host it ran on takes it back first
                self._waiting[home].appendleft(group)
            else:  # its turn is over: behind every group waiting, wherever they ran
                self._waiting[None].append(group)

    def _choose(self, lane: _Lane, host: Host) -> _Queue | _Loose | None:
        group = lane.group
        if group is not None and group.left() > 0:
            if lane.run < self.quantum or not self._any_waiting():
                return group
            self._release(lane, home=host)  # its turn is over while others wait: to the back of the queue
        elif group is not None:
            self._release(lane, home=host)
        taken = self._waiting_group(host)
        if taken is not None:
            taken.lanes += 1
            taken.home = host
            self._active.add(taken)
            lane.group, lane.run = taken, 0
            return taken
        if self._loose.left() > 0:
            return self._loose
        helped = max((g for g in self._active if g.left() > 0), key=lambda g: g.left() / g.lanes, default=None)
        if helped is not None:
            helped.lanes += 1
            lane.group, lane.run = helped, 0
            return helped
        return self._own if self._own.left() > 0 else None

    def _any_waiting(self) -> bool:
        return any(self._waiting.values())

    def _waiting_group(self, host: Host) -> _Queue | None:
        """A group no lane holds: one this host ran, else one no host ran, else one from a host that is down, else
        one another host ran (its slots may still hold it, but a free slot must not idle)."""
        order = [host, None, *(h for h in self._waiting if h is not None and h is not host and not h.up),
                 *(h for h in self._waiting if h is not None and h is not host and h.up)]
        for home in order:
            waiting = self._waiting.get(home)
            while waiting:
                group = waiting.popleft()
                if group.left() > 0:
                    if not waiting:
                        del self._waiting[home]
                    return group
            self._waiting.pop(home, None)
        return None

    async def _take(self, queue: _Queue | _Loose, *, longest: bool) -> Job | None:
        """The queue's next job, reading the next page of bodies from the store when none is ready."""
        if not queue.ready:
            lines = queue.take(self.page, longest)
            if not lines:
                return None
            jobs = {job.line: job for job in await self._fetch(list(lines))}
            queue.ready.extend(jobs[line] for line in lines if line in jobs)
            if not queue.ready:
                return None
        return queue.ready.popleft()
