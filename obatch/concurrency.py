"""How many requests to keep in flight on one engine host: a fixed number, or found by measuring (``"auto"``).

Why measure: Ollama exposes no slot count (``OLLAMA_NUM_PARALLEL`` defaults to 1; embedding models and some
families always run one request at a time), vLLM's batch size follows from free memory, and a llama.cpp server tells
its slots but not whether one client keeps them busy. A level too low leaves the engine idle; too high only queues
requests inside the engine (or, past ``OLLAMA_MAX_QUEUE``, earns 503 "server busy").

The algorithm is TCP's: slow start, then congestion avoidance, with multiplicative decrease on overload — driven by
*delivered throughput* (completion tokens per second; requests per second where the engine counts no tokens), not by
latency alone. Under continuous batching each request's latency grows with the batch even when nothing queues (on a
llama.cpp server with 8 slots, latency at 8 in flight is ~4× that at 1 for 1.9× the throughput), so a latency-only
limiter (Vegas, Netflix's gradient) would settle far below the engine's best.

* A *window* measures one level: the completions of requests started at that level (not those still in flight from
  the previous one), after the first ``level`` of them (those met the previous level's queue, not this one's), at
  least ``2 × level`` (and 8) of them, over at least ``min_window`` seconds. Its rate comes
  from Little's law — requests in flight on average over the window ÷ their mean latency, times work per request —
  because completions come in bursts (requests started together finish together), and a rate read off the
  completion times swings with where the window's ends fall between bursts.
* It starts at what the engine says (llama.cpp's ``total_slots``), else at 1, and probes upward: ×2 while every
  probe pays (slow start), then by a quarter (at least one). A probe is kept when its rate beats the best level's by
  ``gain`` (5%); otherwise the level returns to the best one and holds for ``hold`` windows before probing again.
* Overload — the engine answered 503/429 — halves the level at once (at most once per window) and holds.
* Latency inflation — at a held level, a window whose median latency is over twice the best window's with no gain in
  rate (another tenant on the engine, a model swapped in) — steps down by a quarter and holds.
* Queued inside the engine — where the engine tells how long it worked on each request (Ollama's load, prompt and eval
  durations; llama.cpp's timings), a request's latency beyond that is time it waited for a slot. Ollama tells no slot
  count (``OLLAMA_NUM_PARALLEL`` is not in its API), so after the first such answer auto jumps to ``JUMP`` in flight
  at once (in slow start) instead of doubling from 1; when a level's answers show requests waiting (``queued``: a
  request waited while more were in flight than the engine worked on at once), the slots are the most requests the
  engine worked on at once (``overlap``), and the level drops to them (the ``ceiling``; where the engine reports its
  slots, only a level above them is read, and the level does not drop below them: a llama.cpp server batches its
  slots' prompts in ``n_batch`` chunks, so a request may wait beyond its reported time without waiting for a slot).
  Once the jump's first answer is in, no request starts until the burst tells (a request that waited) or has ended:
  the requests that queued behind the slots then run alone, one per slot, and each slot holds the prefix of a line
  that ran there last, not of one that was sent behind it. Above its slots an engine only queues requests, and with a
  prompt cache per slot (``obatch.schedule``) a queued request takes whichever slot frees first, another prefix
  group's: probing there costs cached prefixes, so the ordinary probes stop at the ceiling.
* Checking the ceiling — one burst's reading can be low (on a loaded machine the answers of a burst come in late and
  fewer of them seem to overlap than ran at once). Where no slot count is reported, after ``check`` windows (8) at
  the ceiling auto sends one request above it, and the level returns to the ceiling as that one starts, so no queue
  forms behind it (each queued request would take another prefix group's slot, and the one it displaced another's):
  where the engine ran more at once than the ceiling (read once ``2 × ceiling`` more answers are in, those that ran
  beside it among them), the ceiling rises to that, to be checked again after ``check`` windows; else it holds, and
  the next check waits twice as long (at most ``REPROBE_MAX`` windows), so an engine read right pays one request's
  cache miss ever more rarely. A reading that stays low at every check (durations that always leave out most of the
  work) is not corrected.
* A remembered ceiling too high — requests that wait inside the engine at or below a remembered ceiling (the engine
  restarted with fewer slots) lower it to the slots the engine ran at once, as the burst's reading does, once two
  readings in a row from different answers say so, until the run's first check. A ceiling read in the run is moved
  by its checks only: where the engine's durations leave out much of its work (a loaded machine), every answer seems
  to have waited and too few to run at once, and a ceiling lowered on that reading stayed low at each check (2 of 4
  slots in a model run).
* Remembered slots — the ceiling an earlier run read from the same engine host and model (``recall``, kept in the
  store by ``obatch.batches.slots``) is the start: that level at once, as the ceiling, with no request at 1 and no
  burst; waits lower it and the check above it raises it. An engine that reports its slots is not remembered.
* Counted slots — where nothing tells the slots before a run (no report, nothing remembered), the pool asks a backend
  that can (Ollama's ``count_slots``) to count them with ``jump`` short requests sent together: those the engine ran
  at once are its slots (``counted``). They start as a remembered count does, their first check after
  ``COUNTED_HOLD`` times as many windows; all ``jump`` at once start the climb there. The burst's queued requests
  were real lines that took other prefix groups' slots; the count's are a few tokens each, and those still waiting
  once the first round is in are cancelled.

Every change is kept in ``history`` with its reason, so a user can see what was chosen and why.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Concurrency = int | Literal["auto"]

JUMP = 16  # in flight at once after the first answer whose engine tells its processing time (no slot count known)
QUEUE_MIN_S = 0.05  # a wait for a slot shorter than this (or than half the request's processing) is noise
REPROBE_MAX = 256  # windows held at most at a learnt ceiling before one probe above it checks it
COUNTED_HOLD = 4  # a counted ceiling is checked after this many times ``check`` windows (a remembered one: once)
SPANS = 256  # answers kept to read waits and overlaps from (4 rounds of the level, at most this)


@dataclass(frozen=True, slots=True)
class Change:
    at: float
    level: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"at": round(self.at, 3), "level": self.level, "reason": self.reason}


class Limit:
    """A level of concurrency and the reason for it; ``FixedLimit`` never moves, ``AutoLimit`` learns."""

    level: int
    history: list[Change]
    auto: bool = False

    @property
    def reason(self) -> str:
        return self.history[-1].reason if self.history else ""

    @property
    def best(self) -> int:
        """The level believed best so far (the current one, unless a probe is under way)."""
        return self.level

    @property
    def settled(self) -> bool:
        """Whether the level is near its best already (an auto level is not while it still doubles)."""
        return True

    @property
    def admit(self) -> int:
        """How many requests may be in flight now: the level, or none while a burst is read (``AutoLimit``)."""
        return self.level

    def begin(self) -> int:
        """A request starts; returns the epoch to hand back to ``done``."""
        return 0

    def done(self, epoch: int, *, work: float | None, latency: float, overloaded: bool = False,
             engine: float | None = None) -> None:
        """A request ended: ``work`` units delivered in ``latency`` seconds; ``None`` when it failed or was
        abandoned (it then only leaves the in-flight count); ``overloaded`` when the engine refused it as busy;
        ``engine``: the seconds the engine says it worked on it (loading, prompt, generation), where it tells."""

    def hint(self, slots: int | None, source: str) -> None:
        """What the engine says about its parallel slots (after a (re)load)."""

    def recall(self, slots: int, source: str) -> None:
        """The slots an earlier run found on this engine (``source`` says where and when): start there."""

    @property
    def learnt(self) -> int | None:
        """The slots this limit read from the engine, worth remembering for the next run; None when none were."""
        return None

    @property
    def to_count(self) -> int:
        """How many short requests to count the engine's slots with before the first line; 0: no count."""
        return 0

    def counted(self, slots: int, most: int, source: str) -> None:
        """The engine ran ``slots`` of ``most`` short requests sent together at once."""


class FixedLimit(Limit):
    def __init__(self, level: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.level = level
        self.history = [Change(clock(), level, f"fixed at {level}")]


@dataclass
class _Window:
    epoch: int
    skip: int = 0  # completions of this epoch still to pass before the window opens
    opened: float | None = None  # the first counted completion
    last: float = 0.0
    count: int = 0
    work: float = 0.0
    area: float = 0.0  # ∫ requests in flight dt, since ``opened``
    latencies: list[float] = field(default_factory=list)

    def rate(self) -> float:
        """Work per second by Little's law: (mean in flight / mean latency) × mean work per request."""
        span = self.last - (self.opened or self.last)
        total = sum(self.latencies)
        if span <= 0 or total <= 0:
            return 0.0
        return (self.area / span) * self.work / total


class AutoLimit(Limit):
    """The adaptive level of one host (see the module docstring). Single-threaded: one event loop owns it."""

    auto = True

    def __init__(self, *, maximum: int = 256, initial: int = 1, gain: float = 0.05, hold: int = 4,
                 min_window: float = 0.25, jump: int = JUMP, check: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.jump = jump
        self.gain = gain
        self.hold_windows = hold
        self.check_windows = check
        self.min_window = min_window
        self.clock = clock
        self.level = max(1, min(initial, maximum))
        self.history = [Change(clock(), self.level, "start: the engine tells no slot count")]
        self._epoch = 0
        self._window = _Window(0, skip=self.level)
        self._inflight = 0
        self._mark = clock()  # when the in-flight count last changed
        self._best: tuple[int, float, float] | None = None  # (level, rate, median latency)
        self._previous: tuple[int, float, float] | None = None  # the level a probe left
        self._slow_start = True
        self._holding = 0
        self._hinted = False
        self._timed = False  # an answer told the engine's processing time (the jump is made once)
        self._spans: list[tuple[float, float, float]] = []  # this level's answers: (ended, engine s, latency s)
        self._recent: list[tuple[float, float, float]] = []  # the last answers of any level (what ran at once)
        self.ceiling: int | None = None  # the slots learnt from requests queued inside the engine
        self._burst = False  # the jump's requests are out: the first answer pauses new ones (``admit``)
        self._paused = False
        self._reported: int | None = None  # the slots the engine reports (``hint``)
        self._reprobe = False  # the level is one above the ceiling until the request that checks it starts
        self._extra: int | None = None  # the epoch of that request, while it runs
        self._extra_after: int | None = None  # once it is answered: answers still to come before the reading
        self._at_ceiling = 0  # windows held at the ceiling since it was learnt or last checked
        self._ceiling_hold = check  # windows to hold there before checking it (doubles each time it holds)
        self._doubt = False  # requests waited at or below the ceiling once: the next reading that they do lowers it
        self._recalled = False  # the ceiling is a remembered one, not yet checked in this run

    @property
    def best(self) -> int:
        return self._best[0] if self._best is not None else self.level

    @property
    def settled(self) -> bool:
        return not self._slow_start

    @property
    def admit(self) -> int:
        return 0 if self._paused else self.level

    # -------------------------------------------------------------------------------------------- events

    def _account(self, now: float) -> None:
        if self._window.opened is not None:
            self._window.area += self._inflight * (now - self._mark)
        self._mark = now

    def begin(self) -> int:
        self._account(self.clock())
        self._inflight += 1
        if self._reprobe and self.ceiling is not None and self._inflight > self.ceiling:
            # the one request above the ceiling: the level returns to it at once, so that no queue of requests
            # forms behind it (each would take another prefix group's slot); its answer tells
            self._reprobe = False
            self.level = self.ceiling
            self._extra = self._epoch = self._epoch + 1
            self._epoch += 1
            self._window = _Window(self._epoch, skip=self.level)
            return self._extra
        return self._epoch

    def hint(self, slots: int | None, source: str) -> None:
        if not slots or slots < 1:
            return
        if self._hinted and self.level == min(slots, self.maximum):
            return
        self._hinted = True
        self._reported = slots
        self._best = None
        self.ceiling = None
        self._slow_start = False  # the engine told us its width: probe gently above it, not by doubling
        self._set(slots, f"{source} reports {slots} parallel slot{'s' if slots != 1 else ''}")

    def recall(self, slots: int, source: str) -> None:
        """Start at ``slots`` an earlier run read from this engine: at once, as the ceiling (no request at 1, no
        burst); waits inside the engine at that level lower it, and the check above it raises it. Where the engine
        reports its slots, its report decides."""
        slots = min(slots, self.maximum)
        if slots < 1 or self._reported is not None or self.ceiling == slots:
            return
        self._start_at(slots, f"start: {slots}, remembered from {source}", hold=self.check_windows)

    def _start_at(self, slots: int, reason: str, *, hold: int) -> None:
        """Start at ``slots`` as the ceiling, to be checked after ``hold`` windows there."""
        if not self._timed and len(self.history) == 1:  # nothing has run yet: this is the start
            self.history.clear()
        self._timed = True  # the slots are known: no jump
        self._slow_start = False
        self._best = None
        self._holding = self._at_ceiling = 0
        self._ceiling_hold = hold
        self.ceiling = slots
        self._set(slots, reason)
        self._recalled = True

    @property
    def to_count(self) -> int:
        """``jump`` (at most ``maximum``) while nothing has told the slots: no report, no remembered ceiling, no
        answer with the engine's time; else 0."""
        known = self._reported is not None or self.ceiling is not None or self._timed
        return 0 if known else min(self.jump, self.maximum)

    def counted(self, slots: int, most: int, source: str) -> None:
        """The engine ran ``slots`` of ``most`` short requests sent together at once (``source`` says where):
        fewer than ``most`` start there as the ceiling, as a remembered count does; all of them start at ``most``
        in slow start (the engine has at least that many slots)."""
        if not self.to_count or slots < 1:
            return
        if slots < min(most, self.maximum):
            self._start_at(slots, f"start: {slots}, {source}", hold=COUNTED_HOLD * self.check_windows)
            return
        self._timed = True  # no jump: the start is known
        self.history.clear()
        self._set(most, f"start: {most}, {source}; probing above")

    @property
    def learnt(self) -> int | None:
        return self.ceiling if self._reported is None else None

    def done(self, epoch: int, *, work: float | None, latency: float, overloaded: bool = False,
             engine: float | None = None) -> None:
        now = self.clock()
        self._account(now)
        self._inflight = max(0, self._inflight - 1)
        if self._paused and self._inflight == 0:  # the burst ended and no request waited: the slots are more
            self._paused = False
        if overloaded:
            if epoch == self._epoch and self.level > 1:
                self._holding = self.hold_windows
                self._slow_start = False
                self._best = None
                self._set(max(1, self.level // 2), f"cut: the engine is busy (503/429) at {self.level}")
            return
        if engine is not None and work is not None:
            self._note(now, engine, latency)
            if self._extra_after is not None:
                self._extra_after -= 1
                if self._extra_after <= 0:  # those that ran beside it have been answered too
                    self._checked(told=True)
        if epoch == self._extra and epoch is not None:
            self._extra = None
            if engine is None or work is None:
                self._checked(told=False)
            else:
                self._extra_after = 2 * (self.ceiling or 1)
            return
        if epoch != self._epoch or work is None:
            return
        if engine is not None and self._timed_answer(now, engine, latency):
            return
        w = self._window
        if w.skip > 0:
            w.skip -= 1
            return
        if w.opened is None:
            w.opened = now
        w.last = now
        w.count += 1
        w.work += work
        w.latencies.append(latency)
        if w.count >= max(2 * self.level, 8) and now - w.opened >= self.min_window:
            self._decide(w.rate(), statistics.median(w.latencies))

    # ----------------------------------------------------------------------------------------- decisions

    def _note(self, now: float, engine: float, latency: float) -> None:
        """Any answer whose engine told its processing time, of this level or an earlier one."""
        self._recent.append((now, max(0.0, engine), latency))
        del self._recent[:-min(4 * self.level, SPANS)]

    def _timed_answer(self, now: float, engine: float, latency: float) -> bool:
        """An answer of this level whose engine told its processing time; True when it changed the level."""
        if not self._timed:
            self._timed = True
            if not self._hinted and self._slow_start and self.level < self.jump:
                self._set(self.jump, f"jumped: the engine tells its processing time, so a wait for a slot shows; "
                                     f"probing {min(self.jump, self.maximum)}")
                self._burst = True
                return True
        if self._burst:  # the jump's first answer: wait for the burst to tell before sending more
            self._burst, self._paused = False, self._inflight > 0
        if self.level <= (self._reported or 0):
            return False  # at or below the slots the engine reports, a wait is not for a slot
        self._spans.append((now, max(0.0, engine), latency))
        del self._spans[:-min(4 * self.level, SPANS)]
        slots = queued(self._spans, self._recent)
        if slots is None or slots >= self.level:
            if self._doubt and len(self._spans) >= 2 * self.level:  # two rounds since, and no more waits
                self._doubt = False
            return False
        slots = max(slots, self._reported or 1)
        above = self.ceiling is not None and self.level <= self.ceiling  # a ceiling remembered too high
        if above and not self._recalled:
            return False  # a ceiling read in this run: only its checks move it (see the module docstring)
        if above and not self._doubt:  # or a loaded machine's late answers: read it again from new answers first
            self._doubt = True
            self._spans = []
            return False
        self._doubt = self._recalled = False
        self.ceiling = slots
        self._slow_start = False
        self._best = None
        self._holding = 0
        self._set(slots, f"{'lowered the ceiling to' if above else 'kept'} {slots}: requests waited inside the "
                         f"engine at {self.level}, which ran {slots} at once")
        return True

    def _checked(self, *, told: bool) -> None:
        """The one request above the ceiling is answered, and so are those that ran beside it (``told``: False
        where it failed or its engine told no time). Where the engine ran more at once than the ceiling, the
        ceiling rises to that (to be checked again after ``check`` windows); else it holds, and the next check
        waits twice as long. Whether it waited tells nothing alone: where the slots finish together, the first to
        free takes it at once."""
        ceiling = self.ceiling or 1
        self._best = None
        self._holding = self._at_ceiling = 0
        self._recalled = False
        seen = overlap(self._recent) if told else ceiling
        if seen > ceiling:
            self.ceiling = seen
            self._ceiling_hold = self.check_windows  # it was read low: check the new one as soon
            self._set(seen, f"raised the ceiling to {seen}: at {ceiling + 1} the engine ran {seen} at once")
            return
        self._ceiling_hold = min(2 * self._ceiling_hold, REPROBE_MAX)
        self._set(ceiling, f"kept {ceiling}: at {ceiling + 1} the engine ran {seen} at once; the next probe above it "
                           f"after {self._ceiling_hold} windows")

    def _decide(self, rate: float, latency: float) -> None:
        measured = (self.level, rate, latency)
        best = self._best
        if best is None:
            self._best = measured
            self._probe(rate)
            return
        if self.level != best[0]:  # this window measured a probe
            if rate >= best[1] * (1 + self.gain):
                self._best = measured
                self._probe(rate, previous=best)
                return
            self._slow_start = False
            self._holding = self.hold_windows
            self._set(best[0], f"kept {best[0]}: {self.level} gave {rate:.1f}/s against {best[1]:.1f}/s")
            return
        if latency > 2 * best[2] and rate < best[1] * (1 + self.gain) and self.level > 1:
            self._best = None
            self._holding = self.hold_windows
            self._set(max(1, math.floor(self.level * 0.75)),
                      f"cut: latency {latency / best[2]:.1f}× the best window's without more throughput")
            return
        # A held level: refresh its figures (conditions change) and probe again once the hold is over.
        self._best = (best[0], 0.5 * (best[1] + rate), 0.5 * (best[2] + latency))
        if self._holding > 0:
            self._holding -= 1
            self._window = _Window(self._epoch, skip=self.level)
            return
        self._probe(rate)

    def _probe(self, rate: float, previous: tuple[int, float, float] | None = None) -> None:
        step = self.level if self._slow_start else max(1, self.level // 4)
        target = min(self.maximum, self.ceiling or self.maximum, self.level + step)
        if target == self.level:
            if self.level == self.ceiling and self._reported is None and self.level < self.maximum:
                self._at_ceiling += 1
                pending = self._extra is not None or self._extra_after is not None  # a check not read yet
                if self._at_ceiling >= self._ceiling_hold and not pending:  # a reading may have been low: check it
                    self._set(self.level + 1, f"raised: {rate:.1f}/s at {self.level}, held {self._at_ceiling} "
                                              f"windows; probing {self.level + 1} once above the slots read")
                    self._reprobe = True
                    return
            self._window = _Window(self._epoch, skip=self.level)
            return
        why = f"raised: {rate:.1f}/s at {self.level}"
        if previous is not None:
            why = f"raised: {previous[1]:.1f}/s at {previous[0]} → {rate:.1f}/s at {self.level}"
        self._set(target, f"{why}; probing {target}")

    def _set(self, level: int, reason: str) -> None:
        self.level = max(1, min(level, self.maximum))
        self._epoch += 1
        self._window = _Window(self._epoch, skip=self.level)
        self._spans = []
        self._burst = self._paused = self._reprobe = self._doubt = False
        self._extra = self._extra_after = None
        self.history.append(Change(self.clock(), self.level, reason))
        del self.history[:-200]  # a long run keeps its recent story, not every probe since the start


def queued(spans: list[tuple[float, float, float]], recent: list[tuple[float, float, float]]) -> int | None:
    """The engine's slots, where answers show requests waiting inside it; None while they do not (yet).

    ``spans``: answers of one level as (ended, seconds the engine worked on it, latency); ``recent``: the last
    answers of any level. A request waited for a slot when its latency exceeds the engine's time by ``QUEUE_MIN_S``
    and half that time, and while it waited more requests were
    in flight than the engine worked on at once (else its extra latency is the client's or the engine's own
    overhead, not a queue: on a loaded machine the requests of a burst go out slowly, and a few in flight read as
    waits); once a quarter of at least 4 answers of the level did (2 at least), the slots are the most requests the
    engine worked on at once lately."""
    if len(spans) < 4:
        return None
    slots = overlap(recent)
    waited = sum(latency - engine > max(QUEUE_MIN_S, 0.5 * engine)
                 and _sent(recent, ended - engine - (latency - engine) / 2) > slots
                 for ended, engine, latency in spans)
    if waited < max(2, len(spans) // 4):
        return None
    return slots


def _sent(spans: list[tuple[float, float, float]], at: float) -> int:
    """How many of the answers were in flight (sent, not yet answered) at ``at``."""
    return sum(ended - latency <= at <= ended for ended, _, latency in spans)


def overlap(spans: list[tuple[float, float, float]]) -> int:
    """The most processing intervals ``(ended - engine, ended]`` that cover one of their midpoints (half-open: one
    that ends as the next on its slot starts is not two at once)."""
    best = 1
    for ended, engine, _ in spans:
        middle = ended - engine / 2
        best = max(best, sum(end - busy < middle <= end for end, busy, _ in spans))
    return best


def make_limit(concurrency: Concurrency, *, maximum: int = 256) -> Limit:
    """``"auto"`` → an ``AutoLimit``; a number → a ``FixedLimit`` at that number."""
    if concurrency == "auto":
        return AutoLimit(maximum=maximum)
    return FixedLimit(int(concurrency))
