"""How long will the answers be? Learnt per model (and endpoint) from answers that really ran.

Most batch files set no ``max_tokens``: the model stops where it likes, and the running time follows. What is known
about a model's answer lengths comes from three places, best first:

* a **pilot**: a small random sample of the file itself, run before the batch (its lines count toward the batch);
* finished **batches** of the model (every succeeded request keeps its usage), on the same endpoint when there are
  enough;
* **benchmark** requests of natural (unforced, uncapped) workloads.

A capped answer that hit its cap tells only that the answer would have been at least that long: it is *censored*.
So the lengths are one Kaplan–Meier survival curve over all observations (answers that ended by themselves are
events, answers cut at their cap are censored), and a request with cap ``m`` is expected to answer
``E[min(X, m)] = ∫₀ᵐ S(t) dt`` tokens: the cap is a hard bound, and a cap above what answers take costs nothing.
Where the curve ends above zero (every long answer was cut), an uncapped request's length is only known to be at
least the longest seen, and the estimate says so.

An answer the **context window** cut (``length`` before any cap it had) did not stop by itself: a small model that
loops runs on until the context is full, so its length is the context that was left (``num_ctx`` − prompt), a fact
of that run, not of the answer. Such answers count as never ending (they stay at risk past every length seen), so
the curve's tail is the share of answers that **run to the limit**; a new request is expected to run that share to
its own limit — its cap, or the context left at the ``num_ctx`` its batch will run with (``room``) — whatever
context the answers were learnt at. Without any such answer, a tail of cap-cut answers still stops at the longest
seen (uncapped) or the cap.

The spread of single answers is kept (estimates draw lengths from the curve, so a long answer late in the run
shows in the makespan); ``mean_cv`` is how far a new file's mean answer may lie from the learnt one: the spread of
the learnt batches' means around their mean (a prior of ``PRIOR_CV`` counted as one batch) with the standard error
of the learnt mean (a few answers of a model whose answers sometimes run on to the context window may not have
caught that tail), or for a pilot the t-interval of its mean (a sample of ``n`` out of ``N`` lines,
finite-population corrected).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Z = 1.96
MIN_SAMPLES = 8  # fewer observations than this and the lengths count as unknown
PRIOR_CV = 0.25  # how far a new file's mean answer may lie from what other files' answers took (one batch's worth)
UNKNOWN_CV = 0.5  # when nothing is known: the assumed length may be off by half
OPEN_TAIL = 0.2  # a curve still above this where observations end: uncapped lengths are a lower bound
UNBOUNDED_OUTPUT = 256  # assumed answer length of a request without max_tokens, when nothing is known


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (Cornish–Fisher expansion around the normal; within 1% from 3 degrees of freedom)."""
    z = statistics.NormalDist().inv_cdf(p)
    if df <= 0:
        return math.inf
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True, slots=True)
class Observation:
    """One answer: its completion tokens, and whether it ended by itself (False: its cap or the context cut it)."""

    tokens: float
    ended: bool
    group: str = ""  # the batch (or pilot, or benchmark run) it belongs to
    runaway: bool = False  # the context window cut it before any cap: it ran to the limit (see the module docstring)


def observe(completion_tokens: int | None, max_tokens: int | None, finish_reason: str | None = None,
            group: str = "") -> Observation | None:
    """An answer as an observation: cut when the engine says ``length`` or it reached its cap; cut below its cap
    (or without one), the context cut it: a runaway."""
    if completion_tokens is None:
        return None
    capped = max_tokens is not None and completion_tokens >= max_tokens - 1  # an engine may count one fewer
    cut = finish_reason == "length" or capped
    return Observation(float(completion_tokens), not cut, group, runaway=cut and not capped)


def survival(observations: Iterable[Observation]) -> list[tuple[float, float]]:
    """Kaplan–Meier: ``(t, S(t))`` after each time at which answers ended (S: the share still going on). Runaways
    stay at risk past every length (they never end)."""
    ordered = sorted(observations, key=lambda o: (_length(o), not o.ended))
    at_risk, s, curve, i = len(ordered), 1.0, [], 0
    while i < len(ordered):
        t, ended, cut = _length(ordered[i]), 0, 0
        while i < len(ordered) and _length(ordered[i]) == t:
            ended, cut, i = ended + ordered[i].ended, cut + (not ordered[i].ended), i + 1
        if ended:
            s *= 1 - ended / at_risk
            curve.append((t, s))
        at_risk -= ended + cut
    return curve


def _length(o: Observation) -> float:
    return math.inf if o.runaway else o.tokens


def _limit(cap: int | float | None, room: float | None) -> float | None:
    """How far an answer can run: its cap or the context left, whichever is smaller (None: neither is known)."""
    bounds = [float(b) for b in (cap, room) if b is not None and b > 0]
    return min(bounds) if bounds else None


@dataclass(frozen=True, slots=True)
class AnswerLengths:
    """What a model's answers are known to take (see the module docstring)."""

    curve: tuple[tuple[float, float], ...] = ()
    samples: int = 0
    cut: int = 0  # of the samples, answers their cap or the context cut
    longest: float = 0.0
    source: str = "none"  # pilot | batches | benchmarks | none
    mean_cv: float = UNKNOWN_CV
    groups: int = 0  # batches (or pilot, or benchmark runs) the samples come from
    endpoint: str | None = None  # the endpoint they were learnt on, when it was told apart
    runaways: int = 0  # of the cut samples, answers the context window cut before any cap (ran to the limit)

    @classmethod
    def learn(cls, observations: Sequence[Observation], source: str, *, endpoint: str | None = None,
              population: int | None = None) -> AnswerLengths:
        """The curve and its uncertainty from observations; ``population`` (a pilot's file size) switches the
        uncertainty of the mean to a sample's t-interval."""
        if not observations:
            return cls()
        curve = tuple(survival(observations))
        made = cls(curve, len(observations), sum(not o.ended for o in observations),
                   max(o.tokens for o in observations), source, UNKNOWN_CV, len({o.group for o in observations}),
                   endpoint, sum(o.runaway for o in observations))
        if population is not None:
            n = len(observations)
            values = [o.tokens for o in observations]
            mean = statistics.fmean(values)
            if n >= 2 and mean > 0:
                fpc = math.sqrt(max(0.0, 1 - n / population)) if population > n else 0.0
                half = t_quantile(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n) * fpc
                return _with(made, mean_cv=half / mean / Z)
            return made
        by_group: dict[str, list[Observation]] = defaultdict(list)
        for o in observations:
            by_group[o.group].append(o)
        # each batch's mean uncapped answer, its tail at that batch's longest (the context it ran at)
        means = [m for group in by_group.values() if len(group) >= MIN_SAMPLES
                 for m in [cls(tuple(survival(group)), len(group), longest=max(o.tokens for o in group),
                               runaways=sum(o.runaway for o in group)).expected(None)] if m > 0]
        values = [o.tokens for o in observations]
        mean = statistics.fmean(values)
        # the learnt mean's own standard error: a few answers of a long-tailed model may have missed its tail
        sampled = statistics.stdev(values) / math.sqrt(len(values)) / mean if len(values) > 1 and mean > 0 else 0.0
        if not means:
            return _with(made, mean_cv=math.hypot(PRIOR_CV, sampled))
        centre = statistics.fmean(means)
        spread = sum((m / centre - 1) ** 2 for m in means)
        return _with(made, mean_cv=math.hypot(math.sqrt((PRIOR_CV ** 2 + spread) / len(means)), sampled))

    @property
    def known(self) -> bool:
        """Enough answers to go by (a pilot's few count: they are the file's own, and its interval says how few)."""
        return self.samples >= (2 if self.source == "pilot" else MIN_SAMPLES) and bool(self.curve)

    @property
    def tail(self) -> float:
        """The share of answers longer than any that ended by itself (cut ones only tell a lower bound)."""
        return self.curve[-1][1] if self.curve else 1.0

    @property
    def open_ended(self) -> bool:
        """Uncapped answers' length is only a lower bound: too many of the longest ones were cut."""
        return self.tail > OPEN_TAIL

    @property
    def runaway_share(self) -> float:
        """The share of answers that run to their limit (the context left, or their cap) instead of stopping."""
        return self.tail if self.runaways else 0.0

    def expected(self, cap: int | float | None, room: float | None = None) -> float:
        """Expected tokens of an answer capped at ``cap`` (None: uncapped) with ``room`` tokens of context left
        (None: not known): ``∫₀^limit S(t) dt``. Beyond the curve's end, answers still going run to their limit
        when some answers were seen to run on to the context (else to the cap, or, uncapped, stop at the longest
        seen); without a known limit, to the longest seen."""
        limit = _limit(cap, room)
        if not self.known:
            assumed = float(cap) if cap is not None else float(UNBOUNDED_OUTPUT)
            return min(assumed, room) if room is not None and room > 0 else assumed
        area, before, s = 0.0, 0.0, 1.0
        for t, after in self.curve:
            if limit is not None and t >= limit:
                break
            area += s * (t - before)
            before, s = t, after
        end = self._end(cap, limit, before)
        return area + s * max(0.0, end - before)

    def _end(self, cap: int | float | None, limit: float | None, before: float) -> float:
        """Where the answers still going beyond the curve's last point stop."""
        if self.runaways and limit is not None:
            return limit
        end = float(cap) if cap is not None else max(before, self.longest)
        return min(end, limit) if limit is not None else end

    def draw(self, cap: int | float | None, u: float, room: float | None = None) -> float:
        """The answer length at quantile ``u`` (0-1) of the curve within its limit (``expected``): a random
        answer for ``u`` uniform."""
        if not self.known:
            return self.expected(cap, room)
        limit = _limit(cap, room)
        value = None
        for t, s in self.curve:
            if 1 - s >= u:
                value = t
                break
        if value is None:  # in the tail: a runaway runs to its limit, an open tail stops at the longest seen
            value = limit if self.runaways and limit is not None else self.longest
        return min(value, limit) if limit is not None else value

    def quantile(self, p: float) -> float | None:
        return self.draw(None, p) if self.known else None

    def summary(self) -> dict[str, Any]:
        """What the estimate answer says about them (``obatch.protocol.AnswerLengthsInfo``)."""
        return {"source": self.source, "known": self.known, "samples": self.samples, "cut": self.cut,
                "mean": self.expected(None) if self.known else None, "p50": self.quantile(0.5),
                "p90": self.quantile(0.9), "mean_cv": self.mean_cv, "groups": self.groups,
                "endpoint": self.endpoint, "open_ended": self.open_ended if self.known else None}

    def notes(self, capped: int, uncapped: int) -> list[str]:
        """Sentences for an estimate of ``capped`` + ``uncapped`` requests."""
        if not self.known:
            out = []
            if uncapped:
                out.append(f"nothing is known yet about this model's answer lengths: the {uncapped} requests "
                           f"without max_tokens are assumed to answer {UNBOUNDED_OUTPUT} tokens, which may be far "
                           "off; run a pilot (`obatch estimate --file F --pilot 16`, or pilot=16 on the endpoint) to "
                           "measure them on a sample of the file")
            if capped:
                out.append(f"capped requests are assumed to use their whole max_tokens ({capped} of them): nothing "
                           "tells yet how much of it this model's answers take")
            return out
        learnt = {"pilot": f"a pilot of {self.samples} lines of this file",
                  "batches": f"{self.samples} answers of {self.groups} finished batch(es)",
                  "benchmarks": f"{self.samples} answers of natural benchmark requests"}.get(self.source, self.source)
        out = [f"answer lengths learnt from {learnt}: mean {self.expected(None):.0f} tokens, median "
               f"{self.quantile(0.5):.0f}, 90% under {self.quantile(0.9):.0f}; a new file's mean may differ by "
               f"±{Z * self.mean_cv:.0%}"]
        if self.runaways:
            out.append(f"{self.runaway_share:.0%} of the answers ran on until the context window cut them: such "
                       "answers are expected to run to the context left (or their cap) at this batch's num_ctx")
        elif uncapped and self.open_ended:
            out.append(f"{self.tail:.0%} of the answers learnt from were cut at their cap or the context: requests "
                       f"without max_tokens may answer longer than the {self.longest:.0f} tokens seen")
        return out


def _with(lengths: AnswerLengths, **changes: Any) -> AnswerLengths:
    return dataclasses.replace(lengths, **changes)


@dataclass(slots=True)
class AnswerSources:
    """Observations by source, before choosing which to learn from."""

    pilot: list[Observation] = field(default_factory=list)
    batches: dict[str, list[Observation]] = field(default_factory=lambda: defaultdict(list))  # by endpoint
    benchmarks: list[Observation] = field(default_factory=list)

    def lengths(self, endpoint: str | None = None, *, population: int | None = None) -> AnswerLengths:
        """The best-founded lengths: the pilot's; else the batches' on ``endpoint`` (all endpoints' when that has
        too few), with the natural benchmark answers added; else the benchmarks' alone."""
        if len(self.pilot) >= 2:
            return AnswerLengths.learn(self.pilot, "pilot", population=population)
        same = self.batches.get(endpoint or "", []) if endpoint else []
        every = [o for group in self.batches.values() for o in group]
        chosen = same if len(same) >= MIN_SAMPLES else every
        if len(chosen) + len(self.benchmarks) >= MIN_SAMPLES and chosen:
            return AnswerLengths.learn(chosen + self.benchmarks, "batches",
                                       endpoint=endpoint if chosen is same else None)
        if len(self.benchmarks) >= MIN_SAMPLES:
            return AnswerLengths.learn(self.benchmarks, "benchmarks")
        return AnswerLengths()
