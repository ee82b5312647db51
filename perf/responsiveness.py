"""Responsiveness of ``obatch serve`` under load: p50/p99 of ``GET /v1/batches/{id}`` idle, and while 4 batches of
5,000 lines run flat out against a fast simulator and 20 uploads arrive at once. Target: busy p99 ≤ 3 × idle p99
(nothing holds the event loop: file I/O, JSON of big bodies and DB work stay off it).

    python perf/responsiveness.py [--batches 4] [--lines 5000] [--uploads 20] [--concurrency 32] [--postgres]
    python perf/responsiveness.py --batch-worker thread   # batches on a loop of their own in the server's process
    python perf/responsiveness.py --split    # API-only server; the batches run in a second process on the store
    python perf/responsiveness.py --debug    # the server runs with asyncio debug; prints its slow callbacks

Loopback only; the simulator and the server are subprocesses, so the probe shares no interpreter with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import orjson

from obatch.testing.postgres import postgres_server
from obatch.testing.server import ServerProcess, free_port, serve_env

MODEL = "llama3.2:1b"
FINAL = ("completed", "failed", "expired", "cancelled")


def lines_of(tag: str, n: int) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Question {tag} {i}: say something."}],
                 "max_tokens": 16},
    }) + b"\n" for i in range(n))


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def spawn_sim(root: Path, slots: int) -> tuple[subprocess.Popen[bytes], int]:
    """An instant simulator with ``slots`` parallel slots and a deep queue, its log in ``root``; (process, port)."""
    port = free_port()
    sim = spawn([sys.executable, "-m", "obatch.testing.ollama_sim", "--port", str(port), "--num-parallel",
                 str(slots), "--max-queue", "4096", "--model", MODEL],
                {k: v for k, v in os.environ.items() if not k.startswith("OBATCH_")}, root / "sim.log")
    return sim, port


async def wait_healthy(client: httpx.AsyncClient, url: str) -> None:
    for _ in range(1200):
        with contextlib.suppress(httpx.TransportError):
            if (await client.get(url)).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


async def probe(client: httpx.AsyncClient, path: str, samples: list[float], stop: asyncio.Event,
                gap: float = 0.02, limit: int = 100_000, when: list[float] | None = None) -> None:
    """Sequential GETs, ``gap`` apart; each latency in ms (and, into ``when``, its start)."""
    while not stop.is_set() and len(samples) < limit:
        started = time.perf_counter()
        response = await client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        if when is not None:
            when.append(started)
        response.raise_for_status()
        await asyncio.sleep(gap)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def create(client: httpx.AsyncClient, name: str, body: bytes) -> str:
    file_id = (await client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "batch"})).json()["id"]
    response = await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                      "completion_window": "24h"})
    response.raise_for_status()
    return str(response.json()["id"])


async def run(args: argparse.Namespace, database_url: str | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="obatch-resp-"))
    sim, sim_port = spawn_sim(root, args.concurrency)
    data = root / "data"
    env = serve_env(data, backend="ollama", ollama_url=f"http://127.0.0.1:{sim_port}",
                    server_concurrency=args.concurrency, rate_limit_per_minute=0, max_lines=max(args.lines, 50_000),
                    log_level="WARNING", batch_worker=args.batch_worker, database_url=database_url)
    if args.debug:
        env["PYTHONASYNCIODEBUG"] = "1"
    spy = ["py-spy", "record", "-o", args.py_spy, "-f", "raw", "-r", "200", "--"] if args.py_spy else []
    worker: ServerProcess | None = None
    server: ServerProcess | None = None
    try:
        if args.split:  # an API-only server, and a second process on the same store that runs the batches
            worker = await asyncio.to_thread(ServerProcess.start, data, env, log_path=root / "worker.log",
                                             ready_within=120)
            env = {**env, "OBATCH_BATCH_WORKER": "none"}
        server = await asyncio.to_thread(ServerProcess.start, data, env, log_path=root / "server.log", wrapper=spy,
                                         ready_within=120)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            await wait_healthy(client, f"http://127.0.0.1:{sim_port}/api/version")
            small = await create(client, "small.jsonl", lines_of("small", 10))
            while (await client.get(f"/v1/batches/{small}")).json()["status"] not in FINAL:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            idle: list[float] = []
            await probe(client, f"/v1/batches/{small}", idle, asyncio.Event(), limit=args.samples)

            bodies = [lines_of(f"b{i}", args.lines) for i in range(args.batches)]
            uploads = [lines_of(f"u{i}", args.upload_lines) for i in range(args.uploads)]
            ids = [await create(client, f"big{i}.jsonl", body) for i, body in enumerate(bodies)]
            started = time.perf_counter()
            busy: list[float] = []
            when: list[float] = []
            stop = asyncio.Event()
            prober = asyncio.create_task(probe(client, f"/v1/batches/{small}", busy, stop, when=when))
            while (await client.get(f"/v1/batches/{ids[0]}")).json()["status"] == "validating":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            upload_started = time.perf_counter()
            await asyncio.gather(*(client.post("/v1/files", files={"file": (f"up{i}.jsonl", body)},
                                               data={"purpose": "batch"}) for i, body in enumerate(uploads)))
            upload_ended = time.perf_counter()
            upload_seconds = upload_ended - upload_started
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                states = [(await client.get(f"/v1/batches/{b}")).json() for b in ids]
                if all(s["status"] in FINAL for s in states):
                    break
                await asyncio.sleep(0.5)
            elapsed = time.perf_counter() - started
            stop.set()
            await prober
    finally:
        if server is not None:
            server.proc.send_signal(signal.SIGINT)  # py-spy (when sampling) writes its file on SIGINT
        sim.terminate()
        if server is not None:
            server.proc.wait(timeout=30)
        if worker is not None:
            worker.stop()
        sim.wait(timeout=30)
    done = sum(s["request_counts"]["completed"] for s in states)
    store = "PostgreSQL" if database_url else "SQLite"
    topology = ", an API-only server + a second server" if args.split else f", batches in a {args.batch_worker}"
    print(f"responsiveness on {store}{topology}: {args.batches} × {args.lines} lines, {args.concurrency} slots, "
          f"{args.uploads} uploads of {args.upload_lines} lines at once{' (asyncio debug)' if args.debug else ''}")
    print(f"  idle  GET /v1/batches/{{id}}: n={len(idle)} p50 {pct(idle, .5):.1f} ms, p99 {pct(idle, .99):.1f} ms")
    print(f"  busy  GET /v1/batches/{{id}}: n={len(busy)} p50 {pct(busy, .5):.1f} ms, p99 {pct(busy, .99):.1f} ms, "
          f"max {max(busy):.0f} ms, mean {statistics.fmean(busy):.1f} ms")
    during = [ms for ms, t in zip(busy, when, strict=True) if upload_started <= t <= upload_ended]
    rest = [ms for ms, t in zip(busy, when, strict=True) if not upload_started <= t <= upload_ended]
    print(f"        while the uploads arrive: n={len(during)} p50 {pct(during, .5):.1f} ms, "
          f"p99 {pct(during, .99):.1f} ms; batches alone: n={len(rest)} p50 {pct(rest, .5):.1f} ms, "
          f"p99 {pct(rest, .99):.1f} ms")
    ratio = pct(busy, .99) / pct(idle, .99)
    print(f"  busy p99 / idle p99 = {ratio:.1f} (target ≤ 3)")
    print(f"  batches: {[s['status'] for s in states]}, {done} lines in {elapsed:.1f} s = {done / elapsed:.0f} lines/s;"
          f" the 20 uploads took {upload_seconds:.2f} s")
    if args.debug:
        slow = Counter()
        for match in re.finditer(r"Executing (.+?) took (\d+\.\d+) seconds", (root / "server.log").read_text()):
            what = re.sub(r"0x[0-9a-f]+|\d+", "#", match.group(1))[:160]
            slow[what] += 1
        print("  slow callbacks (asyncio debug, > 100 ms):")
        for what, n in slow.most_common(12):
            print(f"    {n:4d} × {what}")
    return 0 if ratio <= 3 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--lines", type=int, default=5000)
    p.add_argument("--uploads", type=int, default=20)
    p.add_argument("--upload-lines", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--samples", type=int, default=300, help="idle probes")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--postgres", action="store_true")
    p.add_argument("--database-url")
    p.add_argument("--batch-worker", choices=["process", "thread", "loop"], default="process",
                   help="where the server drives the batches (OBATCH_BATCH_WORKER)")
    p.add_argument("--split", action="store_true",
                   help="OBATCH_BATCH_WORKER=none on the measured server; a second server process runs the batches")
    p.add_argument("--debug", action="store_true", help="asyncio debug mode in the server; list slow callbacks")
    p.add_argument("--py-spy", metavar="FILE", help="sample the server with py-spy into FILE (collapsed stacks)")
    return run_on_store(run, p.parse_args())


def run_on_store(run: Callable[[argparse.Namespace, str | None], Coroutine[Any, Any, int]],
                 args: argparse.Namespace) -> int:
    """``run(args, database_url)``: on a fresh PostgreSQL database with ``--postgres``, else on ``--database-url``
    (the server's SQLite store when none)."""
    if args.postgres and not args.database_url:
        with contextlib.contextmanager(postgres_server)() as pg:
            return asyncio.run(run(args, pg.create_database()))
    return asyncio.run(run(args, args.database_url))


if __name__ == "__main__":
    raise SystemExit(main())
