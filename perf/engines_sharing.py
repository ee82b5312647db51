"""Two embedded engines on the same cores: how much slower each gets, by llama.cpp thread count.

Each engine is its own process (as two notebooks or a server and a script would be) running the same 24 chat
requests at concurrency 4 on SmolLM2-135M. Scenarios: one engine alone with all cores' threads; two at once with
all cores' threads each (their threads outnumber the cores); two at once with half the cores each.

    python perf/engines_sharing.py [--requests 24] [--limit 150]

A process that has not finished within ``--limit`` seconds is stopped and reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

from obatch.backends.local import LocalBackend
from obatch.backends.pool import fixed
from obatch.runner import Job, Outcome, RetryPolicy, run_jobs

MODEL = "smollm2:135m"


async def one_engine(threads: int, requests: int) -> float:
    """Wall seconds of ``requests`` chat requests at concurrency 4 on a fresh engine with ``threads`` threads."""
    bodies = [{"model": MODEL, "messages": [{"role": "user", "content": f"Write a short paragraph about topic {i}."}],
               "max_tokens": 96, "temperature": 0} for i in range(requests)]
    backend = LocalBackend(threads=threads)
    try:
        await backend.prepare(MODEL, num_ctx=2048, parallel=4)

        async def jobs() -> AsyncIterator[Job]:
            for i, body in enumerate(bodies):
                yield Job(i, str(i), "/v1/chat/completions", body, num_ctx=2048)

        async def sink(outcome: Outcome) -> None:
            if outcome.error is not None:
                raise RuntimeError(outcome.error)

        started = time.perf_counter()
        await run_jobs(jobs(), fixed(backend, 4), sink, policy=RetryPolicy())
        return time.perf_counter() - started
    finally:
        await backend.aclose()


def scenario(name: str, threads: list[int], requests: int, limit: float) -> None:
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(t), "--requests", str(requests)],
                              stdout=subprocess.PIPE, text=True) for t in threads]
    deadline = time.monotonic() + limit
    walls = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            walls.append(f"{float(out.strip()):.1f} s")
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.communicate()
            walls.append(f"not done in {limit:g} s")
    print(f"{name:48} {' | '.join(walls)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--limit", type=float, default=150.0)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(asyncio.run(one_engine(args.child, args.requests)))
        return
    cores = os.cpu_count() or 1
    print(f"{cores} cores, {args.requests} requests at concurrency 4 per engine")
    scenario(f"one engine, {cores} threads", [cores], args.requests, args.limit)
    scenario(f"two engines, {cores} threads each", [cores, cores], args.requests, args.limit)
    half = max(1, cores // 2)
    scenario(f"two engines, {half} thread(s) each", [half, half], args.requests, args.limit)


if __name__ == "__main__":
    main()
