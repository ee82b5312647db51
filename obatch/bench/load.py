"""Request-rate (open-loop) load, as vLLM's bench (``--request-rate``) and GuideLLM (``constant``/``poisson``) offer
it beside concurrency.

A closed loop (``concurrency``) sends the next request when one finishes, so a slow engine slows the senders down
and the load adapts to the engine. Real users do not wait for each other: requests arrive at some rate whatever the
engine is doing. An open loop sends on a schedule fixed in advance — gaps of ``1/rate`` seconds (``constant``) or
random, independent arrivals (``poisson``, from a seeded generator) — and an engine that cannot keep up shows it as
growing latency and queueing, not as a lower offered load. ``max_concurrency`` (vLLM's ``--max-concurrency``)
optionally caps the requests in flight; requests then wait for a free slot and the **achieved** rate (requests
really sent per second) falls below the offered one, which is why both are stored.

Poisson arrivals are drawn *given the point's request count*: a Poisson process conditioned on n arrivals in a
span has them at sorted uniform times in it, so the n requests are spread at random over exactly ``(n-1)/rate``
seconds (gaps exponential-like with mean ``1/rate``). Drawing n independent exponential gaps instead makes the
schedule's own rate off by ~1/√n (96 requests at seed 0 came out at 0.83 × the rate), which would read as a client
that fell behind; conditioned, an achieved rate below the offered one means exactly that.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, get_args

Arrival = Literal["constant", "poisson"]
ARRIVALS: tuple[str, ...] = get_args(Arrival)
MAX_RATE = 10_000.0  # requests per second; beyond it the client's own timers are the limit


def arrival_offsets(kind: str, rate: float, count: int, *, seed: int = 0) -> list[float]:
    """When each of ``count`` requests is due, in seconds from the start; the first at 0 (as vLLM sends it)."""
    if kind not in ARRIVALS:
        raise ValueError(f"arrival is one of {', '.join(ARRIVALS)}; got {kind!r}")
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"a request rate is between 0 and {MAX_RATE:g} per second; got {rate}")
    span = max(count - 1, 0) / rate
    if kind == "constant" or count < 3:
        return [i / rate for i in range(count)]
    rng = random.Random(seed)
    return [0.0, *sorted(rng.uniform(0.0, span) for _ in range(count - 2)), span]


def achieved_rate(sent: Sequence[float]) -> float | None:
    """Requests per second between the first send and the last (``sent``: perf-counter seconds); None below two."""
    if len(sent) < 2:
        return None
    span = max(sent) - min(sent)
    return (len(sent) - 1) / span if span > 0 else None


def rate_label(rate: float, arrival: str | None, cap: int = 0) -> str:
    """``4/s poisson`` (``, ≤ 8 in flight`` with a cap): how a rate point is named in progress and tables."""
    return f"{rate:g}/s {arrival or ''}".rstrip() + (f", ≤ {cap} in flight" if cap else "")
