"""What obatch costs on top of the engine: chat requests against an instant Ollama simulator (a subprocess).

Same requests, same concurrency, each path timed whole; every round measures all paths one after the other and
the ratios are taken within a round (the load of a shared machine moves in minutes), then the median of
``--repeats`` rounds:
  (a) bare aiohttp    a floor for what any Python client can do against this simulator here (asyncio's own loop)
  (u) bare on uvloop  the same client on uvloop, the loop obatch's processes run on (obatch/_loop.py): for reference
  (r) obatch runner   backend + leases + retries + timeouts (obatch.runner.run_jobs), no store; on obatch's loop
  (s) store path      obatch's batch lifecycle in-process (validation, store rows, commits, output files) with an
                      engine that answers in-process at once: what a line costs obatch without the network
  (b) obatch run      the CLI in a subprocess, start-up included: validation, store rows, batched commits, files
  (c) server path     `obatch serve` (started before timing) driven by the OpenAI SDK: upload, batch, wait, download

    python perf/overhead.py [--requests 20000] [--concurrency 16] [--repeats 3]

Targets (issue #9): b/a >= 0.8 and c/a >= 0.6 (u/a says how much of what b and c gain over asyncio's loop is
uvloop's). On a 2-core machine the simulator and the client share the cores, so the ratios measured in one run are
what to compare, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from simproc import start_sim

from obatch import _loop
from obatch.api import run_batch_file
from obatch.backends.base import BackendWrapper, Result
from obatch.backends.ollama import OllamaBackend
from obatch.backends.pool import fixed
from obatch.config import Settings
from obatch.runner import Job, Outcome, RetryPolicy, run_jobs
from obatch.testing.server import serve_env, serving

MODEL = "llama3.2:1b"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def write_input(path: Path, n: int) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                            "body": BODY}) + b"\n" for i in range(n)))
    return path


async def bare(url: str, n: int, concurrency: int) -> float:
    """``concurrency`` workers each sending the next request as soon as its last one is answered."""
    payload = orjson.dumps({**BODY, "stream": False})
    left = n
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(f"{url}/api/chat", data=payload) as r:
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


async def runner(url: str, n: int, concurrency: int) -> float:
    backend = OllamaBackend(url)

    async def jobs() -> AsyncIterator[Job]:
        for i in range(n):
            yield Job(i, str(i), "/v1/chat/completions", BODY)

    async def sink(outcome: Outcome) -> None:
        assert outcome.error is None, outcome.error

    started = time.perf_counter()
    await run_jobs(jobs(), fixed(backend, concurrency), sink, policy=RetryPolicy())
    seconds = time.perf_counter() - started
    await backend.aclose()
    return seconds


class Instant(BackendWrapper):
    """The simulator's models and facts, but every request answered in-process at once with one real answer."""

    def __init__(self, inner: OllamaBackend, answer: Result) -> None:
        super().__init__(inner)
        self.answer = answer

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        return Result(dict(self.answer.body), self.answer.timings)

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        return self.inner.stream_chat(body, num_ctx=num_ctx)


async def store_path(url: str, source: Path, concurrency: int, work: Path) -> float:
    inner = OllamaBackend(url)
    answer = await inner.complete("/v1/chat/completions", BODY)
    settings = Settings(backend="ollama", data_dir=work, max_lines=10_000_000).with_urls([url])
    started = time.perf_counter()
    await run_batch_file(source, settings=settings, backend=Instant(inner, answer), concurrency=concurrency,
                         progress=False, fresh=True)
    seconds = time.perf_counter() - started
    await inner.aclose()
    return seconds


def child_env() -> dict[str, str]:
    """The environment of the measured processes: Python may cache its bytecode, as in any installed copy (pip
    compiles it at install; without it every start compiles obatch and its dependencies again, a second of CPU)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cli_run(url: str, source: Path, concurrency: int, work: Path) -> float:
    """One `obatch run` in a subprocess, on a store that already exists (as a user's second run would)."""
    env = {**child_env(), "OBATCH_MAX_LINES": "10000000"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "obatch", "run", str(source), "--backend", "ollama", "--url", url,
                    "--data-dir", str(work), "-c", str(concurrency), "-q", "--fresh"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def server_path(url: str, source: Path, n: int, concurrency: int, work: Path) -> float:
    from openai import OpenAI

    env = serve_env(work, child_env(), backend="ollama", ollama_url=url, server_concurrency=concurrency,
                    max_lines=10_000_000, rate_limit_per_minute=0, worker_poll_interval=0.2)
    with serving(work, env, log_path=work / "server.log", ready_within=120) as server:
        client = OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        started = time.perf_counter()
        uploaded = client.files.create(file=(source.name, io.BytesIO(source.read_bytes())), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.05)
            batch = client.batches.retrieve(batch.id)
        assert batch.output_file_id is not None and batch.request_counts is not None
        assert batch.request_counts.completed == n, batch.request_counts
        lines = client.files.content(batch.output_file_id).content.count(b"\n")
        seconds = time.perf_counter() - started
        assert lines == n, lines
        return seconds


def timed(n: int, measure: Callable[[], float], cpu: Callable[[], float] = time.process_time) -> tuple[float, float]:
    """(requests per second, client CPU microseconds per request) of one measurement."""
    before = cpu()
    rate = n / measure()
    return rate, (cpu() - before) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-server", action="store_true", help="skip (c)")
    args = parser.parse_args()
    n, c, k = args.requests, args.concurrency, args.repeats
    paths = ["a", "u", "r", "s", "b"] + ([] if args.no_server else ["c"])
    rates: dict[str, list[float]] = {p: [] for p in paths}
    costs: dict[str, list[float]] = {p: [] for p in paths}
    sim, url = start_sim()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = write_input(Path(tmp) / "in.jsonl", n)
            print(f"{n} chat requests, concurrency {c}; each round measures every path in turn (a shared machine's "
                  f"load moves: ratios are taken within a round), median of {k} rounds", flush=True)
            one = write_input(Path(tmp) / "one.jsonl", 1)
            cli_run(url, one, c, Path(tmp) / "store")  # the stores and the bytecode exist before any timing
            _loop.run(store_path(url, one, c, Path(tmp) / "inproc"))
            for i in range(k):
                measured = {
                    "a": timed(n, lambda: asyncio.run(bare(url, n, c))),
                    "u": timed(n, lambda: _loop.run(bare(url, n, c))),
                    "r": timed(n, lambda: _loop.run(runner(url, n, c))),
                    "s": timed(n, lambda: _loop.run(store_path(url, source, c, Path(tmp) / "inproc"))),
                    "b": timed(n, lambda: cli_run(url, source, c, Path(tmp) / "store"), cpu_of_children),
                }
                if "c" in paths:
                    serve = functools.partial(server_path, url, source, n, c, Path(tmp) / f"serve-{i}")
                    measured["c"] = timed(n, serve)
                for p, (rate, cost) in measured.items():
                    rates[p].append(rate)
                    costs[p].append(cost)
                print(f"  round {i + 1}: " + ", ".join(f"{p} {rates[p][-1]:.0f} req/s" for p in paths)
                      + "; " + ", ".join(f"{p}/a {rates[p][-1] / rates['a'][-1]:.2f}" for p in paths if p not in "as"),
                      flush=True)
    finally:
        sim.terminate()
        sim.wait()
    names = {"a": "bare aiohttp", "u": "bare, uvloop", "r": "obatch runner", "s": "store path", "b": "obatch run",
             "c": "server path"}
    for p in paths:
        ratio = "" if p in "as" else \
            f"   {p}/a = {statistics.median(x / y for x, y in zip(rates[p], rates['a'], strict=True)):.2f}"
        cpu = f"   client CPU {statistics.median(costs[p]):5.0f} us/req" if p != "c" else ""
        print(f"  ({p}) {names[p]:14} {statistics.median(rates[p]):8.0f} req/s{cpu}{ratio}"
              + ("  (start-up included)" if p == "b" else ""), flush=True)


if __name__ == "__main__":
    main()
