"""Spans of time in which no engine host answered: the pool (``obatch.backends.pool``) writes them as its hosts
stop and start answering, and the live ETA (``obatch.progress.LiveEta``) leaves them out of the clock it measures
throughput with — an outage is not slowness."""

from __future__ import annotations

from dataclasses import dataclass, field

KEEP = 256  # ended spans kept (oldest dropped): a run's outages, not a log


@dataclass
class Outages:
    """Ended spans (monotonic seconds, oldest first) and the one going on, if any."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    since: float | None = None  # the start of the outage going on; None while a host answers

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def begin(self, at: float) -> None:
        """No host answers since ``at`` (an outage already going on keeps its start)."""
        if self.since is None:
            self.since = max(at, self.spans[-1][1]) if self.spans else at

    def end(self, at: float) -> None:
        """A host answers again since ``at``."""
        if self.since is not None:
            self.spans.append((self.since, max(self.since, at)))
            del self.spans[:-KEEP]
            self.since = None

    def within(self, start: float, end: float) -> float:
        """Seconds of outage between ``start`` and ``end``."""
        spans = [*self.spans, (self.since, end)] if self.since is not None else self.spans
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)
