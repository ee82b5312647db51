"""The one progress bar of long runs (batches, sweeps): tqdm's, which picks a widget in Jupyter, text on a
terminal, and nothing when output is not a terminal; and the live remaining-time estimate of a running batch."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

    from obatch.outages import Outages


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True) -> tqdm[None]:
    """A bar counting requests; ``enabled=False`` gives a bar that shows nothing (same methods, no checks)."""
    from tqdm.auto import tqdm  # on demand: finding out whether this is Jupyter imports IPython

    return tqdm(total=total, initial=initial, desc=desc, unit="req", disable=None if enabled else True,
                dynamic_ncols=True)


# Pseudo-observations the start estimate counts for while few lines have finished.
PRIOR_WEIGHT = 4
UNSWEPT_DOUBT = 4.0  # how much less the start estimate counts once auto settled outside the levels the sweep measured
DEFAULT_DECODE_SHARE = 0.8  # of a request's engine time, when the engine reports no timings


@dataclass
class LiveEta:
    """The remaining time of a running batch, refined from the lines already finished.

    Work left is counted in answer tokens: the lines still pending, each at the length its kind of line has been
    taking in this batch (uncapped answers' mean; capped answers' share of their cap), starting from the estimate
    made at the batch's start and moving to what finished lines show (``PRIOR_WEIGHT`` lines' worth of trust in the
    estimate). Time left is that work at the throughput measured so far — for the decoding share of the engine's
    time (from its timings) by tokens, for the rest by lines — blended with the start estimate's remaining time
    while little has finished.

    The clock throughput is measured with leaves out ``outages`` (the pool's spans with no host answering): while
    one goes on the estimate is ``waiting`` and does not grow, and lines that end meanwhile (their retries spent)
    leave the work without counting as throughput. The start estimate was made for a level of concurrency
    (``prior_level``); once the run's own level (``level``, set as auto settles) differs, its time is rescaled by
    the sweep's curve (``prior_curve``: the start estimate's running time at each level the sweep measured), and
    where that level lies outside the curve, the start estimate counts ``UNSWEPT_DOUBT`` times less."""

    pending_caps: dict[int | None, int]  # lines left by max_tokens (None: uncapped)
    prior_seconds: float | None = None  # the start estimate's running time for these lines
    prior_output: float | None = None  # its expected answer tokens per line
    started: float = field(default_factory=time.monotonic)
    outages: Outages | None = None
    prior_level: int | None = None  # the concurrency the start estimate was made for
    prior_curve: dict[int, float] = field(default_factory=dict)  # its running time at other levels
    level: int | None = None  # the level the run settled on (None: not yet, or not known)
    lines: int = 0
    dropped: int = 0  # lines that ended while no host answered
    tokens: float = 0.0
    uncapped_lines: int = 0
    uncapped_tokens: float = 0.0
    capped_tokens: float = 0.0
    capped_caps: float = 0.0
    decode_ms: float = 0.0
    engine_ms: float = 0.0

    @property
    def total(self) -> int:
        return self.lines + self.dropped + sum(self.pending_caps.values())

    @property
    def waiting(self) -> bool:
        """No engine host answers now: the estimate is paused."""
        return self.outages is not None and self.outages.ongoing

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since the start, less the outages."""
        now = time.monotonic() if now is None else now
        return now - self.started - (self.outages.within(self.started, now) if self.outages is not None else 0.0)

    def beyond_the_sweep(self) -> bool:
        """Auto settled on a level the sweep did not reach (or came below): its curve cannot tell how fast that goes,
        so the start estimate is trusted less."""
        if self.level is None or self.prior_level is None or self.level == self.prior_level or not self.prior_curve:
            return False
        return not min(self.prior_curve) <= self.level <= max(self.prior_curve)

    def prior_running(self) -> float | None:
        """The start estimate's running time, at the level the run settled on."""
        if self.prior_seconds is None or self.level is None or self.prior_level is None or not self.prior_curve:
            return self.prior_seconds
        return self.prior_seconds * along(self.prior_curve, self.level) / along(self.prior_curve, self.prior_level)

    def observe(self, max_tokens: int | None, completion_tokens: int | None, *, prompt_ms: float | None = None,
                decode_ms: float | None = None) -> None:
        """A line finished (failed ones too: they leave the work, with no tokens)."""
        left = self.pending_caps.get(max_tokens, 0)
        if left:
            self.pending_caps[max_tokens] = left - 1
        if self.waiting:
            self.dropped += 1
            return
        tokens = float(completion_tokens or 0)
        self.lines += 1
        self.tokens += tokens
        if max_tokens is None:
            self.uncapped_lines, self.uncapped_tokens = self.uncapped_lines + 1, self.uncapped_tokens + tokens
        else:
            self.capped_tokens, self.capped_caps = self.capped_tokens + tokens, self.capped_caps + max_tokens
        if decode_ms is not None:
            self.decode_ms += decode_ms
            self.engine_ms += decode_ms + (prompt_ms or 0.0)

    def tokens_left(self) -> float:
        """Expected answer tokens of the lines still pending."""
        left_caps = {cap: n for cap, n in self.pending_caps.items() if n}
        capped = [(cap, n) for cap, n in left_caps.items() if cap is not None]
        mean_cap = sum(c * n for c, n in capped) / max(1, sum(n for _, n in capped)) if capped else 0.0
        prior = self.prior_output if self.prior_output is not None else (
            self.tokens / self.lines if self.lines else None)
        uncapped = (self.uncapped_tokens + PRIOR_WEIGHT * (prior or 0.0)) / (
            self.uncapped_lines + (PRIOR_WEIGHT if prior is not None else 0)) if (
            self.uncapped_lines or prior is not None) else 0.0
        prior_fill = min(1.0, prior / mean_cap) if prior is not None and mean_cap else 1.0
        fill = (self.capped_tokens + PRIOR_WEIGHT * prior_fill * mean_cap) / (
            self.capped_caps + PRIOR_WEIGHT * mean_cap) if (self.capped_caps or mean_cap) else prior_fill
        return left_caps.get(None, 0) * uncapped + sum(c * n for c, n in capped) * fill

    def seconds_left(self, now: float | None = None) -> float | None:
        """None until something is known: a finished line or the start estimate."""
        elapsed = self.elapsed(now)
        left_lines = sum(self.pending_caps.values())
        if left_lines == 0:
            return 0.0
        prior_left = None
        prior = self.prior_running()
        if prior is not None:
            work = self.tokens + self.tokens_left()
            done = self.tokens / work if work > 0 and self.tokens else (self.lines + self.dropped) / max(self.total, 1)
            prior_left = max(0.0, prior * (1 - done))
        if not self.lines or elapsed <= 0:
            return prior_left
        by_lines = left_lines * elapsed / self.lines
        share = self.decode_ms / self.engine_ms if self.engine_ms > 0 else DEFAULT_DECODE_SHARE
        by_tokens = self.tokens_left() * elapsed / self.tokens if self.tokens > 0 else by_lines
        measured = share * by_tokens + (1 - share) * by_lines
        if prior_left is None:
            return measured
        doubt = UNSWEPT_DOUBT if self.beyond_the_sweep() else 1.0
        trust = self.lines / (self.lines + (PRIOR_WEIGHT + 0.05 * self.total) / doubt)  # few lines tell little of many
        return trust * measured + (1 - trust) * prior_left

    def as_dict(self, now_wall: float | None = None) -> dict[str, Any]:
        """What the batch object carries (``obatch.eta``): seconds left as of ``at`` (Unix time)."""
        now = time.monotonic()
        left, elapsed = self.seconds_left(now), self.elapsed(now)
        return {"seconds_left": left, "at": time.time() if now_wall is None else now_wall,
                "lines_done": self.lines + self.dropped, "lines_left": sum(self.pending_caps.values()),
                "tokens_done": self.tokens, "tokens_left": self.tokens_left(),
                "tokens_per_s": self.tokens / elapsed if elapsed > 0 and self.tokens else None,
                "waiting": self.waiting, "concurrency": self.level,
                "outage_seconds": self.outages.within(self.started, now) if self.outages is not None else 0.0}

    def describe(self, now: float | None = None) -> str:
        """The progress line's note: ``eta 1 min 5 s``, or ``waiting for the engine`` while no host answers."""
        left = self.seconds_left(now)
        if left is None:
            return "waiting for the engine" if self.waiting else ""
        minutes, seconds = divmod(round(left), 60)
        text = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
        return f"waiting for the engine (eta {text} once it answers)" if self.waiting else f"eta {text}"


def prior_levels(groups: list[dict[str, Any]]) -> tuple[int | None, dict[int, float]]:
    """From the start estimate's model groups (``DurationEstimate`` dumps): the level it was made for, and its
    running time (load left out) at each level the sweep measured at its num_ctx — each group's time scaled along
    its own candidates, summed. A group without candidates keeps its time at every level."""
    levels = {int(g["concurrency"]) for g in groups if g.get("concurrency")}
    curves = []
    for g in groups:
        running = max(0.0, float(g.get("seconds") or 0.0) - float(g.get("load_seconds") or 0.0))
        curve = {int(c["concurrency"]): float(c["seconds"]) for c in g.get("candidates") or []
                 if c.get("num_ctx") == g.get("num_ctx") and c.get("seconds")}
        curves.append((running, curve, g.get("concurrency")))
    measured = {c for _, curve, _ in curves for c in curve}
    if len(levels) != 1 or not measured:
        return None, {}
    (level,) = levels
    return level, {c: sum(t * along(curve, c) / along(curve, made) if curve and made else t
                          for t, curve, made in curves) for c in sorted(measured | levels)}


def along(curve: dict[int, float], level: int) -> float:
    """A running time at ``level`` on a curve of measured levels: between two, harmonic in log(level) (as the
    estimates interpolate, ``obatch.bench.estimate.predict.at_concurrency``); outside them, the nearest one's."""
    if level in curve:
        return curve[level]
    below, above = [c for c in curve if c < level], [c for c in curve if c > level]
    if not below or not above:
        return curve[max(below)] if below else curve[min(above)]
    lo, hi = max(below), min(above)
    w = (math.log(level) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return 1 / ((1 - w) / curve[lo] + w / curve[hi])
