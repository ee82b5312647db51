"""Does `obatch run` with no concurrency flag reach a real engine's best speed? (issue #9, target >= 0.95)

A llama.cpp server (xllamacpp, SmolLM2-135M, 8 parallel slots) runs the same chat requests (64 tokens each,
``ignore_eos`` so every answer has the same length):
  bare client   aiohttp at concurrency 1, 2, 4, 8, 16: the engine's best generated tokens/s, by hand-picking
  obatch run    `obatch run --backend openai --url <engine>/v1`, no --concurrency: auto must find that speed
  local         `obatch run --backend local`, no --concurrency: obatch starts its own engine (8 slots by default);
                compared with a bare client on an engine of the same configuration
obatch's rate is its run phase (the summary line: validation, store, requests, files) so Python's start-up
does not count against the engine; the wall time with start-up is printed beside it.

    python perf/engine_speed.py [--requests 96] [--repeats 3]

Run it alone: llama.cpp's threads spin, and anything else on the cores slows the engine (perf/engines_sharing.py).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from obatch.backends.local import DEFAULT_NUM_CTX, DEFAULT_PARALLEL
from obatch.engine import LocalEngine

MODEL = "smollm2:135m"
TOKENS = 64


def body(i: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me about topic number {i}."}],
            "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}


async def bare(url: str, n: int, concurrency: int) -> float:
    """Generated tokens per second of ``n`` requests at ``concurrency``."""
    tokens = 0
    async with aiohttp.ClientSession() as session:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            nonlocal tokens
            async with gate, session.post(f"{url}/v1/chat/completions", data=orjson.dumps(body(i)),
                                          headers={"content-type": "application/json"}) as r:
                tokens += orjson.loads(await r.read())["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return tokens / (time.perf_counter() - started)


def obatch_run(args: list[str], source: Path, work: Path) -> tuple[float, float, str]:
    """(tokens/s of the run phase, tokens/s with start-up, the concurrency story) of one `obatch run`."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "obatch", "run", str(source), *args, "--data-dir", str(work), "-q",
                          "--fresh"], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    found = re.search(r"in ([\d.]+) s .*?\+ (\d+) completion tokens", out)
    if not found:
        raise SystemExit(f"unexpected output: {out}")
    seconds, tokens = float(found.group(1)), int(found.group(2))
    batch = re.search(r"(batch-[0-9a-f]{24})", out)
    story = subprocess.run([sys.executable, "-c", STORY, str(work), batch.group(1) if batch else ""],
                           capture_output=True, text=True).stdout.strip()
    return tokens / seconds, tokens / wall, story


STORY = """
import sqlite3, sys, json
row = sqlite3.connect(sys.argv[1] + "/obatch.db").execute(
    "select concurrency_json from batches where id = ?", (sys.argv[2],)).fetchone()
hosts = json.loads(row[0])["hosts"] if row and row[0] else []
print("; ".join(f"level {h['concurrency']} ({h['reason']})" for h in hosts))
"""


async def bare_sweep(url: str, n: int, repeats: int) -> tuple[int, float]:
    best = (0, 0.0)
    for c in (1, 2, 4, 8, 16):
        rate = statistics.median([await bare(url, n, c) for _ in range(repeats)])
        print(f"    bare c={c:<3} {rate:7.1f} tok/s", flush=True)
        if rate > best[1]:
            best = (c, rate)
    return best


def compare(label: str, best: tuple[int, float], runs: list[tuple[float, float, str]]) -> None:
    rate = statistics.median(r[0] for r in runs)
    wall = statistics.median(r[1] for r in runs)
    print(f"  {label}: best bare {best[1]:.1f} tok/s at c={best[0]}; obatch run (no flag) {rate:.1f} tok/s "
          f"= {rate / best[1]:.2f} of best ({wall:.1f} tok/s with start-up); {runs[-1][2]}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, k = args.requests, args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        source.write_bytes(b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST",
                                                  "url": "/v1/chat/completions", "body": body(i)}) + b"\n"
                                    for i in range(n)))
        print(f"{n} chat requests of {TOKENS} tokens, SmolLM2-135M, median of {k}", flush=True)
        engine = LocalEngine(alias=MODEL)
        try:
            url = await engine.ensure(n_ctx=DEFAULT_PARALLEL * DEFAULT_NUM_CTX, n_parallel=DEFAULT_PARALLEL)
            print(f"  llama.cpp server, {DEFAULT_PARALLEL} slots, {DEFAULT_NUM_CTX} context each", flush=True)
            await bare(url, 8, 8)  # warm-up
            best = await bare_sweep(url, n, k)
            runs = [await asyncio.to_thread(obatch_run, ["--backend", "openai", "--url", f"{url}/v1"], source,
                                            Path(tmp) / "openai") for _ in range(k)]
            compare("openai backend", best, runs)
        finally:
            await engine.aclose()
        runs = [await asyncio.to_thread(obatch_run, ["--backend", "local"], source, Path(tmp) / "local")
                for _ in range(k)]
        compare("local backend (the same engine configuration)", best, runs)


if __name__ == "__main__":
    asyncio.run(main())
