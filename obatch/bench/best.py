"""The one "best configuration" rule: what the CLI, the server's ``/v1/benchmarks/models``, the estimates and the UI
all call best.

Among a model's configurations whose requests succeeded at least 99% of the time, the highest throughput wins;
configurations within 2% of it count as equally fast, and of those the smallest ``num_ctx`` wins, then the smallest
concurrency (less memory and less queueing for the same speed). Throughput is output tokens per second for measured
points, and whatever faster-is-higher figure a caller ranks by (the estimate ranks by its predicted req/s).

Only closed-loop (concurrency) configurations compete: a request-rate point measures how an engine copes with a
given arrival rate, not a setting a batch could run at (a batch keeps a number of requests in flight).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

TIE = 0.02  # configurations this close to the fastest count as equally fast
MIN_SUCCESS = 0.99  # a configuration that fails more often than this is never the best

Row = TypeVar("Row", bound=Mapping[str, Any])


def best_config(rows: Iterable[Row], *, speed: str = "output_tps", min_success: float = MIN_SUCCESS) -> Row | None:
    """The best of one model's configurations (each a mapping with ``num_ctx``, ``concurrency``, ``speed`` and,
    optionally, ``success_rate``, a point's ``excluded`` flag and its ``rate``), or None when none qualifies."""
    eligible = [r for r in rows if r.get(speed) is not None and r.get("excluded") is not True and r.get("rate") is None
                and (r.get("success_rate") is None or r["success_rate"] >= min_success)]
    if not eligible:
        return None
    top = max(float(r[speed]) for r in eligible)
    tied = [r for r in eligible if float(r[speed]) >= top * (1 - TIE)]
    return min(tied, key=lambda r: (r["num_ctx"], r["concurrency"]))
