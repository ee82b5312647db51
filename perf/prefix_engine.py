"""Prefix-affine scheduling on the embedded engine: `obatch run` with no flags against bare clients.

The ``documents`` file of ``perf/prefix_cache.py`` (D documents x Q questions, shuffled, a short shared system
prompt) runs on llama.cpp (xllamacpp, SmolLM2-135M, 8 slots of 2,048 tokens, each keeping its last prompt):
  file order  a bare aiohttp client, 8 requests in flight, in the file's order
  affinity    8 workers; each takes one document at a time and sends its questions one after another
  obatch      ``obatch run FILE --backend openai --url ENGINE/v1``, no concurrency or schedule flag (auto
              concurrency, ``--schedule auto``)
Each client gets a fresh engine of the local backend's configuration (``--backend local`` starts the same one; its
start, tens of seconds on loaded cores, is left out) with empty caches, after a one-line warm-up. The prompt tokens
the engine took from its slots' caches are its own figure (``timings.cache_n``); obatch's time is its run phase (the
summary line: validation, store, requests, files) and its cache share the batch's ``obatch.schedule`` record.

    python perf/prefix_engine.py [--documents 8] [--questions 6] [--tokens 600] [--answer 16] [--clients ...]

Run it alone: llama.cpp's threads spin, and anything else on the cores slows the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import orjson
from prefix_cache import Line, by_group, documents_file

from obatch.backends.local import DEFAULT_NUM_CTX, DEFAULT_PARALLEL
from obatch.engine import LocalEngine

MODEL = "smollm2:135m"
T = TypeVar("T")


def batch_file(path: Path, lines: list[Line], answer: int) -> Path:
    path.write_bytes(b"".join(orjson.dumps({
        "custom_id": f"{line.group}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": line.messages, "max_tokens": answer, "temperature": 0}}) + b"\n"
        for i, line in enumerate(lines)))
    return path


async def workers(url: str, items: list[list[Line]], answer: int) -> tuple[float, int, int]:
    """8 workers pull items from one queue and send an item's lines one after another: (seconds, prompt tokens,
    of those from the cache)."""
    queue = iter(items)
    prompt = cached = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def worker() -> None:
            nonlocal prompt, cached
            for item in queue:
                for line in item:
                    body = {"model": MODEL, "messages": line.messages, "max_tokens": answer, "temperature": 0}
                    async with session.post(f"{url}/v1/chat/completions", data=orjson.dumps(body),
                                            headers={"content-type": "application/json"}) as r:
                        data = orjson.loads(await r.read())
                    timings = data.get("timings") or {}
                    cached += int(timings.get("cache_n") or 0)
                    prompt += int(timings.get("cache_n") or 0) + int(timings.get("prompt_n") or 0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(DEFAULT_PARALLEL)))
        return time.perf_counter() - started, prompt, cached


async def fresh_engine(run: Callable[[str], Awaitable[T]], answer: int) -> T:
    """``run`` against a new engine of the local backend's configuration (empty caches), after a one-line warm-up."""
    engine = LocalEngine(alias=MODEL)
    try:
        url = await engine.ensure(n_ctx=DEFAULT_PARALLEL * DEFAULT_NUM_CTX, n_parallel=DEFAULT_PARALLEL)
        await workers(url, [[Line("warm", [{"role": "user", "content": "Hello."}])]], answer)
        return await run(url)
    finally:
        await engine.aclose()


def obatch_run(source: Path, url: str, work: Path) -> tuple[float, float | None, str]:
    """(run-phase seconds, cached prompt share, the concurrency story) of `obatch run` on the engine at ``url``."""
    out = subprocess.run([sys.executable, "-m", "obatch", "run", str(source), "--backend", "openai", "--url",
                          f"{url}/v1", "--data-dir", str(work), "-q", "--fresh"], check=True, capture_output=True,
                         text=True).stdout
    found = re.search(r"(batch-[0-9a-f]{24}).*? in ([\d.]+) s", out, re.S)
    if not found:
        raise SystemExit(f"unexpected output: {out}")
    row = sqlite3.connect(work / "obatch.db").execute(
        "select schedule_json, concurrency_json from batches where id = ?", (found.group(1),)).fetchone()
    schedule = json.loads(row[0] or "{}")
    hosts = json.loads(row[1] or "{}").get("hosts", [])
    story = "; ".join(f"level {h['concurrency']} ({h['reason']})" for h in hosts)
    return float(found.group(2)), schedule.get("cached_prompt_share"), story


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=600, help="a document's length in 4-character units")
    parser.add_argument("--answer", type=int, default=16, help="max_tokens of each answer")
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--clients", default="file order,affinity,obatch", help="which clients, comma-separated")
    args = parser.parse_args()
    clients = args.clients.split(",")
    lines = documents_file(random.Random(args.seed), args.documents, args.questions, args.tokens)
    print(f"{len(lines)} lines: {args.documents} documents of ~{4 * args.tokens:,} characters x {args.questions} "
          f"questions, answers of {args.answer} tokens; SmolLM2-135M, {DEFAULT_PARALLEL} slots", flush=True)
    rows: dict[str, tuple[float, float | None, str]] = {}
    for label, items in (("file order", [[line] for line in lines]), ("affinity", by_group(lines))):
        if label not in clients:
            continue
        seconds, prompt, cached = await fresh_engine(lambda url, items=items: workers(url, items, args.answer),
                                                     args.answer)
        rows[label] = (seconds, cached / prompt if prompt else None, "")
        print(f"  {label:<11} {seconds:7.1f} s  cache {rows[label][1] or 0:.1%}", flush=True)
    if "obatch" not in clients:
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = batch_file(Path(tmp) / "in.jsonl", lines, args.answer)
        seconds, share, story = await fresh_engine(
            lambda url: asyncio.to_thread(obatch_run, source, url, Path(tmp) / "work"), args.answer)
    against = [f"{rows[label][0] / seconds:.2f} of {label}" for label in ("affinity", "file order") if label in rows]
    print(f"  {'obatch':<11} {seconds:7.1f} s  cache {share or 0:.1%}  = {', '.join(against)}; {story}",
          flush=True)


if __name__ == "__main__":
    asyncio.run(main())
