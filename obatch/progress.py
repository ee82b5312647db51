"""The one progress bar of long runs (batches, sweeps): tqdm's, which picks a widget in Jupyter, text on a
terminal, and nothing when output is not a terminal; and the live remaining-time estimate of a running batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True) -> tqdm[None]:
    """A bar counting requests; ``enabled=False`` gives a bar that shows nothing (same methods, no checks)."""
    from tqdm.auto import tqdm  # on demand: finding out whether this is Jupyter imports IPython

    return tqdm(total=total, initial=initial, desc=desc, unit="req", disable=None if enabled else True,
                dynamic_ncols=True)


# Pseudo-observations the start estimate counts for while few lines have finished.
PRIOR_WEIGHT = 4
DEFAULT_DECODE_SHARE = 0.8  # of a request's engine time, when the engine reports no timings


@dataclass
class LiveEta:
    """The remaining time of a running batch, refined from the lines already finished.

    Work left is counted in answer tokens: the lines still pending, each at the length its kind of line has been
    taking in this batch (uncapped answers' mean; capped answers' share of their cap), starting from the estimate
    made at the batch's start and moving to what finished lines show (``PRIOR_WEIGHT`` lines' worth of trust in the
    estimate). Time left is that work at the throughput measured so far — for the decoding share of the engine's
    time (from its timings) by tokens, for the rest by lines — blended with the start estimate's remaining time
    while little has finished."""

    pending_caps: dict[int | None, int]  # lines left by max_tokens (None: uncapped)
    prior_seconds: float | None = None  # the start estimate's running time for these lines
    prior_output: float | None = None  # its expected answer tokens per line
    started: float = field(default_factory=time.monotonic)
    lines: int = 0
    tokens: float = 0.0
    uncapped_lines: int = 0
    uncapped_tokens: float = 0.0
    capped_tokens: float = 0.0
    capped_caps: float = 0.0
    decode_ms: float = 0.0
    engine_ms: float = 0.0

    @property
    def total(self) -> int:
        return self.lines + sum(self.pending_caps.values())

    def observe(self, max_tokens: int | None, completion_tokens: int | None, *, prompt_ms: float | None = None,
                decode_ms: float | None = None) -> None:
        """A line finished (failed ones too: they leave the work, with no tokens)."""
        left = self.pending_caps.get(max_tokens, 0)
        if left:
            self.pending_caps[max_tokens] = left - 1
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
        elapsed = (time.monotonic() if now is None else now) - self.started
        left_lines = sum(self.pending_caps.values())
        if left_lines == 0:
            return 0.0
        prior_left = None
        if self.prior_seconds is not None:
            work = self.tokens + self.tokens_left()
            done_share = self.tokens / work if work > 0 and self.tokens else self.lines / max(self.total, 1)
            prior_left = max(0.0, self.prior_seconds * (1 - done_share))
        if not self.lines or elapsed <= 0:
            return prior_left
        by_lines = left_lines * elapsed / self.lines
        share = self.decode_ms / self.engine_ms if self.engine_ms > 0 else DEFAULT_DECODE_SHARE
        by_tokens = self.tokens_left() * elapsed / self.tokens if self.tokens > 0 else by_lines
        measured = share * by_tokens + (1 - share) * by_lines
        if prior_left is None:
            return measured
        trust = self.lines / (self.lines + PRIOR_WEIGHT + 0.05 * self.total)  # a few lines say little about many
        return trust * measured + (1 - trust) * prior_left

    def as_dict(self, now_wall: float | None = None) -> dict[str, Any]:
        """What the batch object carries (``obatch.eta``): seconds left as of ``at`` (Unix time)."""
        left = self.seconds_left()
        elapsed = time.monotonic() - self.started
        return {"seconds_left": left, "at": time.time() if now_wall is None else now_wall,
                "lines_done": self.lines, "lines_left": sum(self.pending_caps.values()),
                "tokens_done": self.tokens, "tokens_left": self.tokens_left(),
                "tokens_per_s": self.tokens / elapsed if elapsed > 0 and self.tokens else None}

    def describe(self) -> str:
        """The progress line's note: ``eta 1 min 5 s``."""
        left = self.seconds_left()
        if left is None:
            return ""
        minutes, seconds = divmod(round(left), 60)
        return f"eta {minutes} min {seconds} s" if minutes else f"eta {seconds} s"
