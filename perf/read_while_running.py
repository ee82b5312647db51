"""Reading results while a batch runs does not slow it: the throughput of a large batch on the simulator read every
second through ``GET /v1/batches/{id}/results`` (paged after a cursor, 1,000 lines a page, until caught up) against
the same batch unread. Target: the read batch within 5% of the unread one.

    python perf/read_while_running.py [--lines 40000] [--pairs 2] [--concurrency 32] [--interval 1] [--postgres]

One ``obatch serve`` (batches in its child process, the default) and the simulator, both subprocesses, on loopback.
The runs alternate unread, read, read, unread, ... (an ABBA order, so a drift of the shared machine falls on both
kinds alike); each kind's figure is its median. Throughput is a batch's lines over the time from ``in_progress`` to
its final status, both seen by polling the batch every 0.1 s (read and unread runs poll alike).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from responsiveness import FINAL, create, lines_of, run_on_store, spawn_sim, wait_healthy

from obatch.testing.server import ServerProcess, serve_env

PAGE = 1000


async def read_along(client: httpx.AsyncClient, batch_id: str, interval: float, stop: asyncio.Event
                     ) -> tuple[int, int, list[float]]:
    """Every ``interval`` seconds, every line finished since the last read (pages of ``PAGE``), and once more when
    the batch is final; returns the lines and pages read and each page's latency (ms)."""
    after, lines, latencies = 0, 0, []
    while True:
        final = stop.is_set()
        while True:
            started = time.perf_counter()
            response = await client.get(f"/v1/batches/{batch_id}/results", params={"after": after, "limit": PAGE})
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            got = response.content.count(b"\n")
            lines += got
            after = int(response.headers["x-obatch-next-after"])
            if got < PAGE or response.headers["x-obatch-finished"] == "true":
                break
        if final:
            return lines, len(latencies), latencies
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """A process's children (the server's batch process)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


async def one_batch(client: httpx.AsyncClient, tag: str, n: int, *, read: bool, interval: float,
                    pids: dict[str, int]) -> dict[str, float]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    batch_id = await create(client, f"{tag}.jsonl", lines_of(tag, n))
    stop = asyncio.Event()
    reader = asyncio.create_task(read_along(client, batch_id, interval, stop)) if read else None
    started = None
    while True:
        status = (await client.get(f"/v1/batches/{batch_id}")).json()
        if status["status"] == "in_progress" and started is None:
            started = time.perf_counter()
        if status["status"] in FINAL:
            ended = time.perf_counter()
            break
        await asyncio.sleep(0.1)
    stop.set()
    lines, pages, latencies = await reader if reader is not None else (0, 0, [])
    assert status["status"] == "completed", status
    seconds = ended - (started or ended)
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    assert not read or lines == n, f"the reader got {lines} lines of {n}"  # every line, once
    return {"rate": status["request_counts"]["completed"] / seconds, "seconds": seconds, "read": lines,
            "pages": pages, "p50": statistics.median(latencies) if latencies else 0.0,
            "max": max(latencies) if latencies else 0.0, **{f"cpu_{name}": value for name, value in cpu.items()}}


async def run(args: argparse.Namespace, database_url: str | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="obatch-read-"))
    sim, sim_port = spawn_sim(root, args.concurrency)
    env = serve_env(root / "data", backend="ollama", ollama_url=f"http://127.0.0.1:{sim_port}",
                    server_concurrency=args.concurrency, concurrency=args.concurrency, rate_limit_per_minute=0,
                    max_lines=max(args.lines, 50_000), max_file_bytes=1 << 30, log_level="WARNING",
                    database_url=database_url)
    server: ServerProcess | None = None
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    try:
        server = await asyncio.to_thread(ServerProcess.start, root / "data", env, log_path=root / "server.log",
                                         ready_within=120)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            await wait_healthy(client, f"http://127.0.0.1:{sim_port}/api/version")
            pids = {"api": server.proc.pid, "batches": children(server.proc.pid)[0], "sim": sim.pid}
            await one_batch(client, "warm", 2000, read=False, interval=args.interval, pids=pids)  # caches warm
            order = [False, True, True, False] * args.pairs
            for i, read in enumerate(order[: 2 * args.pairs]):
                figures = await one_batch(client, f"run{i}", args.lines, read=read, interval=args.interval, pids=pids)
                runs[read].append(figures)
                print(f"  {'read  ' if read else 'unread'} {args.lines} lines in {figures['seconds']:.1f} s = "
                      f"{figures['rate']:.0f} lines/s; CPU s: batch process {figures['cpu_batches']:.1f}, API "
                      f"{figures['cpu_api']:.1f}, sim {figures['cpu_sim']:.1f}"
                      + (f"; read {figures['read']:.0f} lines in {figures['pages']:.0f} pages, page p50 "
                         f"{figures['p50']:.1f} ms, max {figures['max']:.0f} ms" if read else ""), flush=True)
    finally:
        if server is not None:
            server.stop()
        sim.terminate()
        sim.wait(timeout=30)
    def median(read: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[read])

    ratio = median(True, "rate") / median(False, "rate")
    store = "PostgreSQL" if database_url else "SQLite"
    print(f"read while running on {store}: {args.lines} lines a batch, {args.concurrency} slots, read every "
          f"{args.interval:g} s in pages of {PAGE}")
    print(f"  unread {median(False, 'rate'):.0f} lines/s, read {median(True, 'rate'):.0f} lines/s (medians of "
          f"{args.pairs} each): read / unread = {ratio:.3f} (target ≥ 0.95)")
    # What the wall clock of a shared machine hides: the CPU the reads cost, against what the batch costs.
    total = median(False, "cpu_batches") + median(False, "cpu_api") + median(False, "cpu_sim")
    extra = median(True, "cpu_api") - median(False, "cpu_api")
    print(f"  CPU per batch (medians): batch process {median(False, 'cpu_batches'):.1f} s unread, "
          f"{median(True, 'cpu_batches'):.1f} s read; API process {median(False, 'cpu_api'):.1f} s unread, "
          f"{median(True, 'cpu_api'):.1f} s read; the reads cost {extra:.2f} CPU s = {extra / total:.1%} of the "
          f"{total:.1f} CPU s the batch costs (server, batch process, simulator)")
    return 0 if ratio >= 0.95 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=40_000, help="lines of each measured batch")
    p.add_argument("--pairs", type=int, default=2, help="read and unread batches of each kind")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reads")
    p.add_argument("--postgres", action="store_true")
    p.add_argument("--database-url")
    return run_on_store(run, p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
