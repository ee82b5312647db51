"""What the client side costs: requests/s against an instant Ollama simulator (a subprocess on loopback).

Three layers, same requests, same concurrency:
  bare aiohttp   — a floor for what any Python client can do against this simulator here
  obatch runner  — backend + retries + timeouts + queue (obatch.runner.run_jobs), no store
  obatch run     — the whole CLI path: validation, store rows, batched commits, output files

    python bench/throughput.py [--requests 3000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

from obatch.backends.ollama import OllamaBackend
from obatch.runner import Job, Outcome, RetryPolicy, run_jobs

BODY = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def bare(url: str, n: int, concurrency: int) -> float:
    async with aiohttp.ClientSession() as session:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate, session.post(f"{url}/api/chat", data=orjson.dumps({**BODY, "stream": False})) as r:
                await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - started)


async def runner(url: str, n: int, concurrency: int) -> float:
    backend = OllamaBackend(url)

    async def jobs() -> AsyncIterator[Job]:
        for i in range(n):
            yield Job(i, str(i), "/v1/chat/completions", BODY)

    async def sink(outcome: Outcome) -> None:
        assert outcome.error is None, outcome.error

    started = time.perf_counter()
    await run_jobs(jobs(), backend, sink, concurrency=concurrency, policy=RetryPolicy())
    rate = n / (time.perf_counter() - started)
    await backend.aclose()
    return rate


def whole_run(url: str, n: int, concurrency: int, work: Path) -> float:
    source = work / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                              "body": BODY}) + b"\n" for i in range(n)))
    out = subprocess.run([sys.executable, "-m", "obatch", "run", str(source), "--backend", "ollama", "--url", url,
                          "--data-dir", str(work / "data"), "-c", str(concurrency), "-q"],
                         check=True, capture_output=True, text=True).stdout
    match = re.search(r"\(([\d.]+) req/s", out)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    sim = subprocess.Popen([sys.executable, "-m", "obatch.testing.ollama_sim", "--port", "0", "--num-parallel", "64",
                            "--max-queue", "4096"], stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    url = re.search(r"(http://\S+)", sim.stdout.readline())
    try:
        if url is None:
            raise SystemExit("the simulator did not start")
        n, c = args.requests, args.concurrency
        print(f"{n} requests, concurrency {c}")
        print(f"  bare aiohttp   {asyncio.run(bare(url.group(1), n, c)):8.0f} req/s")
        print(f"  obatch runner  {asyncio.run(runner(url.group(1), n, c)):8.0f} req/s")
        with tempfile.TemporaryDirectory() as tmp:
            print(f"  obatch run     {whole_run(url.group(1), n, c, Path(tmp)):8.0f} req/s")
    finally:
        sim.terminate()
        sim.wait()


if __name__ == "__main__":
    main()
