"""A pool of two engine hosts of different speeds: does one batch reach the sum of what each does alone?

Two Ollama simulators (subprocesses) with 2 and 6 slots and the same per-slot speed. The same batch runs through
each alone, then through both as one pool (`--url A --url B`), all with auto concurrency; then once more through
both with the faster host killed a third of the way in, checking that every line still ends exactly once.

    python perf/pool.py [--requests 1200] [--tokens 16] [--decode-tps 400]

Target (issue #9): the pool reaches >= 0.9 of the sum of the solo throughputs.
"""

from __future__ import annotations

import argparse
import collections
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
from simproc import start_sim


def run(source: Path, urls: list[str], work: Path, *, kill: subprocess.Popen[str] | None = None,
        kill_after: float = 0.0) -> tuple[float, str]:
    """(requests/s of the run phase, obatch's summary) of `obatch run` over ``urls``."""
    args = [sys.executable, "-m", "obatch", "run", str(source), "--backend", "ollama", "--data-dir", str(work),
            "-q", "--fresh"]
    for url in urls:
        args += ["--url", url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if kill is not None:
        timer = threading.Timer(kill_after, lambda: kill.send_signal(signal.SIGKILL))
        timer.start()
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"obatch run failed ({proc.returncode}): {out}")
    found = re.search(r"\(([\d.]+) req/s", out)
    return (float(found.group(1)) if found else 0.0), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--decode-tps", type=float, default=400.0)
    args = parser.parse_args()
    small, small_url = start_sim("--num-parallel", "2", "--decode-tps", str(args.decode_tps))
    big, big_url = start_sim("--num-parallel", "6", "--decode-tps", str(args.decode_tps))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "in.jsonl"
            source.write_bytes(b"".join(orjson.dumps({
                "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "llama3.2:1b", "messages": [{"role": "user", "content": f"q{i}"}],
                         "max_tokens": args.tokens}}) + b"\n" for i in range(args.requests)))
            ideal = args.decode_tps / args.tokens
            print(f"{args.requests} chat requests of {args.tokens} tokens; each slot serves {ideal:.0f} req/s")
            a, _ = run(source, [small_url], Path(tmp) / "store")
            print(f"  host A alone (2 slots)  {a:7.1f} req/s")
            b, _ = run(source, [big_url], Path(tmp) / "store")
            print(f"  host B alone (6 slots)  {b:7.1f} req/s")
            both, out = run(source, [small_url, big_url], Path(tmp) / "store")
            print(f"  pool A + B              {both:7.1f} req/s = {both / (a + b):.2f} of the sum ({a + b:.1f})")
            print(f"  killing B a third of the way through a pool run ({args.requests / (a + b) / 3:.1f} s in):")
            _, out = run(source, [small_url, big_url], Path(tmp) / "store", kill=big,
                         kill_after=args.requests / (a + b) / 3)
            output = re.search(r"results: (\S+)", out)
            errors = re.search(r"errors:\s+(\S+)", out)
            assert output and errors
            ids = collections.Counter(orjson.loads(line)["custom_id"]
                                      for path in (output.group(1), errors.group(1))
                                      for line in Path(path).read_bytes().splitlines())
            once = ids == collections.Counter({f"r{i}": 1 for i in range(args.requests)})
            failed = sum(1 for _ in Path(errors.group(1)).read_bytes().splitlines())
            print(f"    {out.splitlines()[0]}")
            print(f"    every line exactly once: {once}; lines failed: {failed}")
            time.sleep(0.1)
    finally:
        for sim in (small, big):
            sim.terminate()
            sim.wait()


if __name__ == "__main__":
    main()
