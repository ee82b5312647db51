"""What the response cache saves, and what it costs when it saves nothing (the Ollama simulator, a subprocess).

  (1) rerun      a file of greedy (temperature 0) chat requests, then the same file with a share of its prompts
                 changed: the second run's upstream requests and wall time against the first's
  (2) repeats    a file in which a share of the lines repeat earlier ones: upstream requests against distinct lines
  (3) overhead   a run in which every line is looked up and none is found (fresh prompts each time) against
                 ``cache="off"``, with an engine that answers in-process at once (what the lookups cost obatch,
                 not hidden behind engine time); the two alternate, the ratio is taken within a round, then the
                 median of ``--repeats`` rounds

Upstream requests are counted where obatch sends them (every engine call of the run's backend).

    python perf/cache.py [--lines 10000] [--changed 0.1] [--repeats 0.2] [--rounds 3] [--decode-tps 400]
    python perf/cache.py --only-overhead --rounds 9

Targets (docs/cache.md): (1) at most 0.12 x the requests and 0.2 x the time; (2) upstream = distinct lines;
(3) within 5 % of off.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from overhead import Instant
from simproc import start_sim

from obatch import _loop
from obatch.api import run_batch_file
from obatch.backends.base import BackendWrapper, Result
from obatch.backends.ollama import OllamaBackend
from obatch.config import Settings

MODEL = "llama3.2:1b"


class Counting(BackendWrapper):
    """The backend as it is, with its engine calls counted."""

    def __init__(self, inner: OllamaBackend) -> None:
        super().__init__(inner)
        self.calls = 0

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        self.calls += 1
        return await self.inner.complete(url, body, num_ctx=num_ctx, stream=stream)

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        return self.inner.stream_chat(body, num_ctx=num_ctx)


def write_input(path: Path, prompts: list[str]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 8},
    }) + b"\n" for i, p in enumerate(prompts)))
    return path


def settings_for(url: str, work: Path, concurrency: int) -> Settings:
    return Settings(backend="ollama", data_dir=work, max_lines=10_000_000, concurrency=concurrency,
                    _env_file=None).with_urls([url])


async def counted_run(url: str, source: Path, settings: Settings, cache: str = "auto") -> tuple[float, int]:
    """(seconds, upstream requests) of one run to the end."""
    backend = Counting(OllamaBackend(url))
    started = time.perf_counter()
    report = await run_batch_file(source, settings=settings, backend=backend, progress=False, fresh=True,
                                  cache=cache)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    assert report.batch.status == "completed" and report.batch.failed == 0, report.summary
    await backend.aclose()
    return seconds, backend.calls


async def timed_run(url: str, source: Path, settings: Settings, cache: str, *, in_process: bool
                    ) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) of one run, against the simulator or an engine that answers
    in-process at once."""
    inner = OllamaBackend(url)
    backend: Counting | Instant = Counting(inner)
    if in_process:
        backend = Instant(inner, await inner.complete("/v1/chat/completions", {"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 8}))
    started, cpu = time.perf_counter(), time.process_time()
    report = await run_batch_file(source, settings=settings, backend=backend, progress=False, fresh=True,
                                  cache=cache)  # type: ignore[arg-type]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert report.batch.completed == report.batch.total, report.summary
    assert b'"cached_from":{' not in await asyncio.to_thread(report.output.read_bytes)  # looked up, never found
    await inner.aclose()
    return seconds, cpu


def reuse_figures(url: str, work: Path, args: argparse.Namespace) -> None:
    """(1) and (2)."""
    n = args.lines
    settings = settings_for(url, work / "store", args.num_parallel)
    every = round(1 / args.changed)
    first = [f"question {i}: what is {i} squared?" for i in range(n)]
    second = [p + " Answer in one word." if i % every == 0 else p for i, p in enumerate(first)]
    _loop.run(counted_run(url, write_input(work / "warm.jsonl", ["warm"]), settings))  # the store exists
    t1, c1 = _loop.run(counted_run(url, write_input(work / "first.jsonl", first), settings))
    t2, c2 = _loop.run(counted_run(url, write_input(work / "second.jsonl", second), settings))
    print(f"(1) rerun of {n} greedy lines, {sum(a != b for a, b in zip(first, second, strict=True))} changed "
          f"(simulator: {args.num_parallel} slots, {args.decode_tps:g} tokens/s each, 8 tokens an answer)")
    print(f"    first run   {c1:6d} upstream requests  {t1:7.2f} s")
    print(f"    rerun       {c2:6d} upstream requests  {t2:7.2f} s   ({c2 / c1:.3f} x the requests, "
          f"{t2 / t1:.3f} x the time)", flush=True)

    stride = round(1 / args.repeats)
    prompts = [f"repeat test {i}" for i in range(n)]
    prompts = [prompts[i - 1] if i % stride == stride - 1 else p for i, p in enumerate(prompts)]
    distinct = len(set(prompts))
    t3, c3 = _loop.run(counted_run(url, write_input(work / "repeats.jsonl", prompts), settings))
    print(f"(2) {n} lines, {n - distinct} repeating an earlier line: {c3} upstream requests for {distinct} "
          f"distinct lines ({t3:.2f} s)", flush=True)


def overhead_figures(url: str, work: Path, args: argparse.Namespace, *, in_process: bool) -> None:
    """(3): rounds of off and auto on fresh prompts (nothing to find), alternating which goes first."""
    n = args.lines
    ratios, cpu_ratios, offs, autos = [], [], [], []
    where = "in-process" if in_process else "sim"
    local = settings_for(url, work / where, args.num_parallel)
    for policy in ("off", "auto"):  # the store exists and every path has run once before timing
        _loop.run(timed_run(url, write_input(work / f"warm-{policy}.jsonl", [f"warm {policy}"]), local, policy,
                            in_process=in_process))
    for r in range(args.rounds):
        fresh = [f"{where} round {r} prompt {i}" for i in range(n)]
        off_input = write_input(work / f"off{r}.jsonl", fresh)
        auto_input = write_input(work / f"auto{r}.jsonl", [f"{p}." for p in fresh])
        order = ("auto", "off") if r % 2 else ("off", "auto")
        timed = {policy: _loop.run(timed_run(url, auto_input if policy == "auto" else off_input, local, policy,
                                             in_process=in_process)) for policy in order}
        off, auto = timed["off"], timed["auto"]
        offs.append(off[0])
        autos.append(auto[0])
        ratios.append(auto[0] / off[0])
        cpu_ratios.append(auto[1] / off[1])
    engine = "an engine answering in-process at once" if in_process else "the instant simulator over HTTP"
    print(f"(3) {n} lines, none found, {engine}: off {statistics.median(offs):.2f} s, auto "
          f"{statistics.median(autos):.2f} s (medians): auto/off wall {statistics.median(ratios):.3f}, CPU "
          f"{statistics.median(cpu_ratios):.3f} (median of {args.rounds} rounds; wall "
          f"{', '.join(f'{x:.3f}' for x in ratios)}; CPU {', '.join(f'{x:.3f}' for x in cpu_ratios)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--changed", type=float, default=0.1, help="share of prompts changed for the rerun")
    parser.add_argument("--repeats", type=float, default=0.2, help="share of lines that repeat an earlier one")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the overhead measurement")
    parser.add_argument("--decode-tps", type=float, default=400.0)
    parser.add_argument("--num-parallel", type=int, default=16)
    parser.add_argument("--only-overhead", action="store_true", help="measure (3) alone")
    args = parser.parse_args()
    sim, url = start_sim("--num-parallel", str(args.num_parallel), "--max-queue", "4096",
                         "--decode-tps", str(args.decode_tps))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if not args.only_overhead:
                reuse_figures(url, Path(tmp), args)
            instant, instant_url = start_sim()
            try:
                overhead_figures(instant_url, Path(tmp), args, in_process=False)
                overhead_figures(instant_url, Path(tmp), args, in_process=True)
            finally:
                instant.terminate()
                instant.wait()
    finally:
        sim.terminate()
        sim.wait()


if __name__ == "__main__":
    main()
