"""Peak memory and throughput of `obatch run` and of `obatch serve` as the input grows (memory must stay flat).

Runs the real CLI in a subprocess against an instant Ollama simulator (also a subprocess, so it does not count),
for files of 10k / 100k / 1M requests, and prints peak RSS (ru_maxrss of the CLI process) and req/s; with
``--server``, the same files go through `obatch serve` (upload, batch, wait, download the output) and the server
process's peak RSS (VmHWM, its batch process's added) is printed too. Target (issue #9): under 300 MB and flat.
With ``--bench-points`` a small benchmark of the model is stored first, so the run also makes its start estimate
(which reads the pending lines).

    python perf/memory.py [--sizes 10000,100000,1000000] [--concurrency 32] [--server] [--endpoint embeddings]
                           [--bench-points]
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from simproc import start_sim

from obatch.testing.server import serve_env, serving


def write_input(path: Path, n: int, endpoint: str) -> None:
    with path.open("wb") as handle:
        for i in range(n):
            if endpoint == "embeddings":
                line = {"custom_id": f"request-{i}", "method": "POST", "url": "/v1/embeddings",
                        "body": {"model": "nomic-embed-text", "input": f"Text number {i} to embed."}}
            else:
                line = {"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "llama3.2:1b", "max_tokens": 8,
                                 "messages": [{"role": "user", "content": f"Question number {i}: say something."}]}}
            handle.write(orjson.dumps(line) + b"\n")


def store_bench_points(url: str, data_dir: Path, endpoint: str) -> None:
    """A small benchmark of the file's model in the store the run will use (so the run estimates itself)."""
    model = "nomic-embed-text" if endpoint == "embeddings" else "llama3.2:1b"
    subprocess.run([sys.executable, "-m", "obatch", "bench", "--model", model, "--num-ctx", "2048",
                    "--concurrency", "1,4", "--requests", "8", "--workload", "tiny", "-q", "--backend", "ollama",
                    "--url", url, "--data-dir", str(data_dir)], check=True, stdout=subprocess.DEVNULL)


def was_estimated(data_dir: Path) -> bool:
    with sqlite3.connect(data_dir / "obatch.db") as db:
        return bool(db.execute("select count(*) from batches where estimate_json is not null").fetchone()[0])


def measure(n: int, url: str, concurrency: int, work: Path, endpoint: str, bench_points: bool = False
            ) -> tuple[float, float]:
    source = work / f"in-{n}.jsonl"
    write_input(source, n, endpoint)
    data_dir = work / f"data-{n}"
    if bench_points:
        store_bench_points(url, data_dir, endpoint)
    env = {**os.environ, "OBATCH_MAX_LINES": str(max(n, 50_000)), "OBATCH_COMMIT_EVERY": "256",
           "OBATCH_MAX_FILE_BYTES": str(1 << 34)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "obatch", "run", str(source), "--backend", "ollama", "--url", url,
                             "--data-dir", str(data_dir), "-c", str(concurrency), "-q"],
                            env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"obatch run failed with exit code {proc.returncode}")
    if bench_points and not was_estimated(data_dir):
        raise SystemExit("the run made no start estimate although benchmark points were stored")
    return usage.ru_maxrss / 1024, n / seconds


def measure_server(n: int, url: str, concurrency: int, work: Path, endpoint: str) -> tuple[float, float]:
    """(peak RSS of `obatch serve` in MB, req/s from upload to downloaded output) for one file of ``n`` lines."""
    source = work / f"in-{n}.jsonl"
    if not source.exists():
        write_input(source, n, endpoint)
    data_dir = work / f"serve-{n}"
    env = serve_env(data_dir, backend="ollama", ollama_url=url, server_concurrency=concurrency,
                    max_lines=max(n, 50_000), max_file_bytes=1 << 34, rate_limit_per_minute=0)
    with serving(data_dir, env, ready_within=60) as server:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            started = time.perf_counter()
            with source.open("rb") as handle:
                uploaded = client.post("/v1/files", data={"purpose": "batch"},
                                       files={"file": (source.name, handle)}).json()
            batch = client.post("/v1/batches", json={"input_file_id": uploaded["id"], "completion_window": "24h",
                                                     "endpoint": f"/v1/{endpoint}"}).json()
            while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.5)
                batch = client.get(f"/v1/batches/{batch['id']}").json()
            if batch["status"] != "completed":
                raise SystemExit(f"the batch ended {batch['status']}: {batch.get('errors')}")
            lines = 0
            with client.stream("GET", f"/v1/files/{batch['output_file_id']}/content") as response:
                for chunk in response.iter_bytes():
                    lines += chunk.count(b"\n")
            seconds = time.perf_counter() - started
            assert lines == n, (lines, n)
        # The server and its batch process (OBATCH_BATCH_WORKER=process): each one's peak, summed.
        pids = [server.proc.pid, *(int(c) for task in Path(f"/proc/{server.proc.pid}/task").iterdir()
                                   for c in (task / "children").read_text().split())]
        peak = sum(int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())  # type: ignore[union-attr]
                       .group(1)) for pid in pids) / 1024
        return peak, n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--endpoint", choices=["chat/completions", "embeddings"], default="chat/completions")
    parser.add_argument("--server", action="store_true", help="also measure `obatch serve`")
    parser.add_argument("--bench-points", action="store_true",
                        help="store a small benchmark of the model first, so `obatch run` estimates its batch")
    args = parser.parse_args()
    sim, url = start_sim()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{'lines':>8} {'obatch run: peak RSS (MB)':>26} {'req/s':>7}"
                  + (f" {'obatch serve: peak RSS (MB)':>28} {'req/s':>7}" if args.server else ""))
            for n in (int(s) for s in args.sizes.split(",")):
                peak, rate = measure(n, url, args.concurrency, Path(tmp), args.endpoint, args.bench_points)
                line = f"{n:>8} {peak:>26.0f} {rate:>7.0f}"
                if args.server:
                    server_peak, server_rate = measure_server(n, url, args.concurrency, Path(tmp), args.endpoint)
                    line += f" {server_peak:>28.0f} {server_rate:>7.0f}"
                print(line, flush=True)
    finally:
        sim.terminate()
        sim.wait()


if __name__ == "__main__":
    main()
