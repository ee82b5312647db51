"""Peak memory and throughput of `obatch run` as the input grows (stream in, stream out: memory must stay flat).

Runs the real CLI in a subprocess against an instant Ollama simulator (also a subprocess, so it does not count),
for files of 10k / 50k / 100k chat requests, and prints peak RSS (ru_maxrss of the CLI process) and req/s.

    python bench/memory.py [--sizes 10000,50000,100000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson


def write_input(path: Path, n: int) -> None:
    with path.open("wb") as handle:
        for i in range(n):
            handle.write(orjson.dumps({
                "custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "llama3.2:1b", "max_tokens": 8,
                         "messages": [{"role": "user", "content": f"Question number {i}: say something short."}]},
            }) + b"\n")


def start_sim() -> tuple[subprocess.Popen[str], str]:
    sim = subprocess.Popen([sys.executable, "-m", "obatch.testing.ollama_sim", "--port", "0", "--num-parallel", "64",
                            "--max-queue", "4096"], stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    line = sim.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        raise SystemExit(f"the simulator did not start: {line!r}")
    return sim, match.group(1)


def measure(n: int, url: str, concurrency: int, work: Path) -> tuple[float, float]:
    source = work / f"in-{n}.jsonl"
    write_input(source, n)
    env = {**os.environ, "OBATCH_MAX_LINES": str(max(n, 50_000)), "OBATCH_COMMIT_EVERY": "256"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "obatch", "run", str(source), "--backend", "ollama", "--url", url,
                             "--data-dir", str(work / f"data-{n}"), "-c", str(concurrency), "-q"],
                            env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"obatch run failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024, n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,100000")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    sim, url = start_sim()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{'lines':>8} {'peak RSS (MB)':>14} {'req/s':>8}")
            for n in (int(s) for s in args.sizes.split(",")):
                peak, rate = measure(n, url, args.concurrency, Path(tmp))
                print(f"{n:>8} {peak:>14.0f} {rate:>8.0f}", flush=True)
    finally:
        sim.terminate()
        sim.wait()


if __name__ == "__main__":
    main()
