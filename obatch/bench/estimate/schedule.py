"""When does the last of a run's requests end? The makespan of service times pulling from one queue in order.

A run of N requests is the makespan of N service times pulling from one queue in order (exactly how
``obatch.runner`` schedules) on ``m`` parallel servers. ``m`` is calibrated on the stored points
(``effective_parallelism``): the parallelism between 1 and ``c`` (fractional values interpolate) whose makespan of a
point's own requests matches its measured wall time — ``c`` when the engine has a slot per request in flight, fewer
when it queues them (Ollama with ``OLLAMA_NUM_PARALLEL`` below ``c``).

A service time is a request's time beside ``c - 1`` others; with fewer left in flight (a run's tail) each goes
faster, by the ratio of the decode times the lower concurrency levels of the sweep measured (``speedups``), so one
long answer at the end of a small file costs its own time alone, not its time at full load.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence


def makespan(service_ms: Sequence[float], workers: int, speed: Sequence[float] = ()) -> float:
    """When the last of these jobs ends, ``workers`` at a time pulling from one queue in order (ms).

    ``speed[k - 1]``: how much faster each job runs while only ``k`` are in flight (1 beyond the list): an engine
    that decodes one sequence alone does so faster than four side by side, so a long answer left alone at the end
    of a run finishes sooner than its service time at full load says. The jobs in flight share the engine, so
    they advance at one rate: a job of service ``s`` ends when the work done per job since it started reaches
    ``s``."""
    slots = max(1, min(workers, len(service_ms)))
    if not any(v != 1.0 for v in speed[:slots]):
        ends = [0.0] * slots
        for s in service_ms:
            heapq.heapreplace(ends, ends[0] + s)
        return max(ends)
    jobs = iter(service_ms)
    ends = sorted(itertools.islice(jobs, slots))  # the work done per job at which each in flight ends
    clock = done = 0.0
    while ends:
        k = len(ends)
        clock += (ends[0] - done) / (speed[k - 1] if k <= len(speed) else 1.0)
        done = ends[0]
        following = next(jobs, None)
        if following is None:
            heapq.heappop(ends)
        else:
            heapq.heapreplace(ends, done + following)
    return clock


def makespan_runs(runs: Sequence[tuple[float, int]], workers: int) -> float:
    """``makespan`` of runs of equal jobs ((service ms, how many) in order), in time independent of how many.

    Within a run, once the workers' end times lie within one job's length of each other, the next ``workers`` jobs
    go one to each (the earliest-ending worker's new end is at least the latest's), so whole rounds are added at
    once; only the jobs before that and the remainder are placed one by one. The ends' multiset, and so the
    makespan, is what ``makespan`` finds on the expanded list."""
    ends = [0.0] * max(1, min(workers, sum(n for _, n in runs)))
    top = 0.0
    for service, count in runs:
        while count and top - ends[0] > service:
            top = max(top, ends[0] + service)
            heapq.heapreplace(ends, ends[0] + service)
            count -= 1
        rounds, count = divmod(count, len(ends))
        if rounds:
            ends = [e + rounds * service for e in ends]  # a constant shift keeps the heap a heap
            top += rounds * service
        for _ in range(count):
            top = max(top, ends[0] + service)
            heapq.heapreplace(ends, ends[0] + service)
    return top


def _interpolated(makespan_of: Callable[[int], float], parallelism: float) -> float:
    low = max(1, math.floor(parallelism))
    at_low = makespan_of(low)
    if parallelism <= low:
        return at_low
    return at_low + (makespan_of(low + 1) - at_low) * (parallelism - low)


def makespan_at(service_ms: Sequence[float], parallelism: float, speed: Sequence[float] = ()) -> float:
    """``makespan`` for a fractional number of servers, linear between the two whole numbers around it."""
    return _interpolated(lambda workers: makespan(service_ms, workers, speed), parallelism)


def makespan_runs_at(runs: Sequence[tuple[float, int]], parallelism: float) -> float:
    """``makespan_runs`` for a fractional number of servers (as ``makespan_at``)."""
    return _interpolated(lambda workers: makespan_runs(runs, workers), parallelism)


def effective_parallelism(service_ms: Sequence[float], wall_ms: float, concurrency: int,
                          speed: Sequence[float] = ()) -> float:
    """The parallelism in [1, concurrency] whose makespan of these jobs equals the measured wall time."""
    if not service_ms or makespan(service_ms, concurrency, speed) >= wall_ms:
        return float(concurrency)
    if makespan(service_ms, 1, speed) <= wall_ms:
        return 1.0
    low, high = 1.0, float(concurrency)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if makespan_at(service_ms, middle, speed) > wall_ms else (low, middle)
    return (low + high) / 2


def speedups(decode_ms: dict[int, float], concurrency: int) -> tuple[float, ...]:
    """``makespan``'s ``speed`` for a configuration of ``concurrency`` from the decode time per token measured at
    each concurrency level (of the same num_ctx): with ``k`` in flight a job runs ``d(c) / d(k)`` times as fast,
    ``d`` linear between the measured levels; at least as fast as at ``c`` and never more throughput than ``c``
    in flight gave (``c / k``). Empty when no lower level was measured."""
    levels = sorted((c, d) for c, d in decode_ms.items() if c <= concurrency and d > 0)
    if concurrency not in decode_ms or len(levels) < 2:
        return ()
    top = decode_ms[concurrency]
    out = []
    for k in range(1, concurrency):
        below = [(c, d) for c, d in levels if c <= k]
        above = [(c, d) for c, d in levels if c >= k]
        if not below:
            return ()  # below the lowest level measured: nothing tells
        (c0, d0), (c1, d1) = below[-1], above[0]
        at_k = d0 if c1 == c0 else d0 + (d1 - d0) * (k - c0) / (c1 - c0)
        out.append(min(concurrency / k, max(1.0, top / at_k)))
    return tuple(out)
