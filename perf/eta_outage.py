"""Does the live ETA survive an engine outage? A batch runs on the Ollama simulator; after a share of its lines the
engine is killed, left down for ``--outage`` seconds, and started again on its port. The batch's live ETA
(``obatch.eta``, as the store keeps it for the UI and the CLI's progress line) is sampled throughout and printed
before, during and after the outage beside the time the batch really had left.

    python perf/eta_outage.py                                  # 400 lines, 20 s outage after a quarter, ~1 minute
    python perf/eta_outage.py --lines 800 --outage 60 --at 0.4
    python perf/eta_outage.py --concurrency auto --sweep 1,2 --outage 0 --lines 600   # a start estimate, no outage

``--sweep 1,2`` sweeps those levels first (the simulator, num_ctx 2048, the ``chat`` workload), so the batch has a
start estimate made for the level auto is expected to settle on; the ETA then shows the level auto really settled
on (``concurrency``). Run it with ``PYTHONPATH`` pointing at another checkout to measure that code's ETA.

With no start estimate, "counted" is the ETA had the outage counted as running time (the rate measured over the
whole wall clock): the ETA is then the measured rate alone, so that is the ETA times wall clock / (wall clock -
outage). The retry policy is the default one (backoff up to 30 s); lines waiting in their backoff when the engine
returns go on once the pool hears from a host again (it asks every 0.5–2 s while none answers). The last line
printed is the batch's running time besides the outage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from obatch.api import run_batch_file
from obatch.bench.measure import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.store import repo
from obatch.store.db import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simproc import start_sim

MODEL = "llama3.2:1b"


def sim_options(args: argparse.Namespace, port: int) -> list[str]:
    return ["--port", str(port), "--num-parallel", str(args.num_parallel), "--decode-tps", str(args.decode_tps)]


async def sample(settings: Settings, done: asyncio.Event, into: list[tuple[float, dict[str, Any]]]) -> None:
    """The running batch's live ETA every half second, as the store keeps it."""
    engine, sessions = await open_store(settings.db_url)
    try:
        while not done.is_set():
            async with sessions() as session:
                rows, _ = await repo.list_batches(session, limit=1)
            if rows and rows[0].status == "in_progress" and rows[0].eta_json:
                into.append((time.monotonic(), orjson.loads(rows[0].eta_json)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)
    finally:
        await engine.dispose()


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="eta-outage-"))
    path = work / "in.jsonl"
    path.write_bytes(b"".join(orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_tokens": args.max_tokens,
                 "messages": [{"role": "user", "content": f"Question {i}: tell me about rivers."}]}}) + b"\n"
        for i in range(args.lines)))
    sim, url = start_sim("--num-parallel", str(args.num_parallel), "--decode-tps", str(args.decode_tps))
    port = int(url.rsplit(":", 1)[1])
    settings = Settings(_env_file=None, data_dir=work / "data", backend="ollama", ollama_url=url,  # type: ignore[call-arg]
                        concurrency=args.concurrency if args.concurrency == "auto" else int(args.concurrency))
    if args.sweep:
        levels = [int(c) for c in args.sweep.split(",")]
        await run_sweep(SweepSpec(models=[MODEL], num_ctx=[2048], concurrency=levels, requests=args.sweep_requests,
                                  workload="chat", seed=1), settings=settings, progress=False)
    samples: list[tuple[float, dict[str, Any]]] = []
    done = asyncio.Event()
    sampler = asyncio.create_task(sample(settings, done, samples))
    started = time.monotonic()
    run = asyncio.create_task(run_batch_file(path, settings=settings, progress=False))
    while not samples or samples[-1][1]["lines_done"] < args.at * args.lines:  # noqa: ASYNC110 (the sampler's)
        await asyncio.sleep(0.1)
    down = time.monotonic()
    if args.outage > 0:
        sim.terminate()
        sim.wait()
        await asyncio.sleep(args.outage)
        sim, _ = await asyncio.to_thread(start_sim, *sim_options(args, port))
    up = time.monotonic()
    report = await run
    ended = time.monotonic()
    done.set()
    await sampler
    sim.terminate()
    sim.wait()

    print(f"{args.lines} lines, max_tokens {args.max_tokens}, simulator {args.num_parallel} slots at "
          f"{args.decode_tps:g} tokens/s, concurrency {args.concurrency}; engine down {up - down:.1f} s after "
          f"{down - started:.1f} s; batch {report.batch.completed} completed, {report.batch.failed} failed in "
          f"{ended - started:.1f} s")
    made = orjson.loads(report.batch.estimate_json) if report.batch.estimate_json else None
    if made:
        level = made["groups"][0].get("concurrency")
        print(f"start estimate {made['seconds']:.1f} s at concurrency {level}; auto's levels: "
              f"{[h['history'][-1]['level'] for h in orjson.loads(report.batch.concurrency_json or '{}')['hosts']]}")
    print(f"{'phase':<8} {'t':>6} {'done':>5} {'eta':>8} {'actual':>8} {'eta/act':>8} {'counted':>8} {'waiting':>8} "
          f"{'level':>6}")
    ratios: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for t, eta in samples:
        phase = "before" if t < down else "during" if t < up else "after"
        left, actual = eta.get("seconds_left"), ended - t
        if left is None or actual <= 0:
            continue
        wall = t - started
        active = wall - float(eta.get("outage_seconds") or 0.0)
        counted = left * wall / active if active > 0 else float("nan")
        ratios[phase].append(left / actual)
        print(f"{phase:<8} {wall:6.1f} {eta['lines_done']:5d} {left:8.1f} {actual:8.1f} {left / actual:8.2f} "
              f"{counted:8.1f} {'yes' if eta.get('waiting') else 'no':>8} {eta.get('concurrency') or '-':>6}")
    for phase, values in ratios.items():
        if values:
            print(f"{phase}: eta/actual median {statistics.median(values):.2f} "
                  f"(range {min(values):.2f}-{max(values):.2f}, {len(values)} samples)")
    print(f"running time besides the outage: {ended - started - (up - down):.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds the engine stays down")
    parser.add_argument("--at", type=float, default=0.25, help="share of the lines done when it goes down")
    parser.add_argument("--num-parallel", type=int, default=4)
    parser.add_argument("--decode-tps", type=float, default=100.0)
    parser.add_argument("--concurrency", default="4", help="a number, or auto")
    parser.add_argument("--sweep", default="", help="levels to sweep first (comma-separated), for a start estimate")
    parser.add_argument("--sweep-requests", type=int, default=24)
    asyncio.run(main(parser.parse_args()))
