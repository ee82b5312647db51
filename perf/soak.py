"""Soak: ``obatch serve`` SIGKILLed at random moments under upstream faults; nothing lost, nothing doubled.

The Ollama simulator (in this process) fails 20% of inference requests with a 500, resets 5%, hangs 5% (the client
times out) and turns away everything that would queue for 0.5 s in every 4 s (503 bursts). A batch runs on
``obatch serve``; at ``--kills`` random moments (drawn over its lines) a server is killed with SIGKILL and started
again. At the end every input line must be in the output file exactly once (all transient failures retried to
success), and the upstream requests are counted against the lines (no retry storm: ≤ 1.5×).

    python perf/soak.py                      # one server, SQLite, 2,000 lines, 10 kills
    python perf/soak.py --servers 2 --batches 4 --postgres   # two servers on PostgreSQL, one of them killed
    python perf/soak.py --servers 2 --batches 4 --postgres --lines 2400 --kills 1 --no-restart \
        --error-rate 0 --reset-rate 0 --hang-rate 0 --no-bursts   # no faults: count what runs twice

Loopback only; bounded by ``--timeout``. PostgreSQL comes from Debian's binaries (a throwaway cluster) unless
``--database-url`` names one.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson

from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from obatch.testing.postgres import postgres_server
from obatch.testing.server import ServerProcess, free_port, serve_env

MODEL = "llama3.2:1b"


def bursts(sim: OllamaSim, stop: threading.Event, every: float = 4.0, length: float = 0.5) -> None:
    """503 bursts: the engine's queue is closed for ``length`` seconds in every ``every``."""
    normal = sim.config.max_queue
    while not stop.wait(every - length):
        sim.config.max_queue = 0
        stop.wait(length)
        sim.config.max_queue = normal


def lines_of(batch: int, n: int) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"b{batch}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Say {batch}-{i}."}], "max_tokens": 8},
    }) + b"\n" for i in range(n))


def alive(servers: list[ServerProcess]) -> ServerProcess:
    return next(s for s in servers if s.proc.poll() is None)


def request(servers: list[ServerProcess], method: str, path: str, **kwargs: object) -> httpx.Response:
    """Ask any live server (one may be down between a kill and its restart)."""
    for _ in range(600):
        with contextlib.suppress(httpx.TransportError, StopIteration):
            response = httpx.request(method, f"{alive(servers).url}{path}", timeout=30, **kwargs)  # type: ignore[arg-type]
            response.raise_for_status()
            return response
        time.sleep(0.1)
    raise RuntimeError(f"no server answered {method} {path}")


def soak(args: argparse.Namespace, database_url: str | None) -> int:
    rng = random.Random(args.seed)
    # Fewer engine slots than requests in flight: some always queue, so a closed queue answers them 503.
    config = SimConfig(num_parallel=max(1, args.concurrency // 4), max_queue=64, decode_tps=400,
                       error_rate=args.error_rate, reset_rate=args.reset_rate, hang_rate=args.hang_rate, seed=args.seed)
    sim = OllamaSim(config)
    sim_url, stop_sim = run_in_thread(sim=sim)
    stop = threading.Event()
    burster = threading.Thread(target=bursts, args=(sim, stop), daemon=True)
    if args.bursts:
        burster.start()
    root = Path(tempfile.mkdtemp(prefix="obatch-soak-"))
    data = root / "data"
    data.mkdir()
    env = serve_env(data, backend="ollama", ollama_url=sim_url, server_concurrency=args.concurrency,
                    request_timeout=1.0, max_attempts=30, retry_initial_wait=0.5, retry_max_wait=5.0,
                    worker_poll_interval=0.25, lease_ttl=args.lease_ttl, lease_heartbeat=args.lease_ttl / 4,
                    rate_limit_per_minute=0, max_lines=max(args.lines, 50_000), commit_interval=args.commit_interval,
                    batch_worker=args.batch_worker, database_url=database_url)
    servers = [ServerProcess.start(data, env, log_path=root / f"server-{port}.log", port=port, ready_within=120)
               for port in (free_port() for _ in range(args.servers))]
    per_batch = args.lines // args.batches
    total = per_batch * args.batches
    started = time.monotonic()
    batch_ids = []
    for b in range(args.batches):
        file_id = request(servers, "POST", "/v1/files", files={"file": (f"soak{b}.jsonl", lines_of(b, per_batch))},
                          data={"purpose": "batch"}).json()["id"]
        batch_ids.append(request(servers, "POST", "/v1/batches", json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()["id"])
    # Kill moments: random points over the lines (as fractions of all lines finished), sorted.
    moments = sorted(rng.uniform(0.03, 0.95) for _ in range(args.kills))
    victim, kills = servers[0], 0
    deadline = started + args.timeout
    batches: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        batches = [request(servers, "GET", f"/v1/batches/{b}").json() for b in batch_ids]
        done = sum(int(b["request_counts"]["completed"]) + int(b["request_counts"]["failed"])  # type: ignore[index]
                   for b in batches)
        if all(b["status"] in ("completed", "failed", "expired", "cancelled") for b in batches):
            break
        if moments and done >= moments[0] * total:
            moments.pop(0)
            victim.kill()
            kills += 1
            print(f"  kill {kills}: SIGKILL at {done}/{total} lines, {time.monotonic() - started:.1f} s",
                  flush=True)
            if args.restart:
                restarted = ServerProcess.start(data, env, port=victim.port, log_path=victim.log_path,
                                                ready_within=120)
                servers[servers.index(victim)] = restarted
                victim = restarted
            else:  # the other servers take its batches over once its leases expire
                moments.clear()
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    stop.set()
    ids: Counter[str] = Counter()
    errors: list[dict[str, object]] = []
    for b in batches:
        if b.get("output_file_id"):
            for line in request(servers, "GET", f"/v1/files/{b['output_file_id']}/content").content.splitlines():
                ids[orjson.loads(line)["custom_id"]] += 1
        if b.get("error_file_id"):
            for line in request(servers, "GET", f"/v1/files/{b['error_file_id']}/content").content.splitlines():
                errors.append(orjson.loads(line))
                ids[orjson.loads(line)["custom_id"]] += 1
    for server in servers:
        server.stop()
    stop_sim()
    stats = sim.stats
    chat = stats.requests.get("/api/chat", 0)
    engine = chat - stats.busy_503
    expected = {f"b{b}-{i}" for b in range(args.batches) for i in range(per_batch)}
    missing = expected - set(ids)
    doubled = [k for k, n in ids.items() if n > 1]
    statuses = Counter(str(b["status"]) for b in batches)
    store = "PostgreSQL" if database_url else "SQLite"
    print(f"\nsoak: {args.servers} server(s) on {store}, {args.batches} batch(es), {total} lines, {kills} SIGKILLs, "
          f"{elapsed:.0f} s")
    print(f"  batches: {dict(statuses)}; output+error lines {sum(ids.values())}, missing {len(missing)}, "
          f"doubled {len(doubled)}, error lines {len(errors)}")
    print(f"  faults injected: {stats.errors_injected} × 500, {stats.resets_injected} resets, "
          f"{stats.hangs_injected} hangs, {stats.busy_503} × 503 (queue closed)")
    print(f"  upstream /api/chat requests {chat} = {chat / total:.2f} × lines; reaching the engine (not 503) "
          f"{engine} = {engine / total:.2f} × lines; answered in full {stats.served} = {stats.served / total:.3f} "
          f"× lines ({stats.served - total} answers re-run after a kill)")
    fault_floor = 1 / (1 - args.error_rate - args.reset_rate - args.hang_rate)
    print(f"  the fault model alone needs {fault_floor:.2f} × lines; beyond it: "
          f"{engine / total / fault_floor:.3f} × (re-runs after kills, 503 retries)")
    ok = (not missing and not doubled and not errors and statuses == Counter({"completed": len(batch_ids)})
          and chat <= 1.5 * total)
    print("  PASS" if ok else "  FAIL", flush=True)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=16, help="engine requests in flight per server")
    p.add_argument("--commit-interval", type=float, default=0.05,
                   help="how often results are committed: answers not yet committed are run again after a kill")
    p.add_argument("--error-rate", type=float, default=0.20)
    p.add_argument("--reset-rate", type=float, default=0.05)
    p.add_argument("--hang-rate", type=float, default=0.05)
    p.add_argument("--no-bursts", dest="bursts", action="store_false")
    p.add_argument("--no-restart", dest="restart", action="store_false",
                   help="kill once and leave the server down (with --servers 2: the other one finishes)")
    p.add_argument("--lease-ttl", type=float, default=3.0)
    p.add_argument("--postgres", action="store_true", help="run on a throwaway PostgreSQL cluster")
    p.add_argument("--database-url", default=None)
    p.add_argument("--batch-worker", choices=["process", "thread", "loop"], default="process",
                   help="where each server drives its batches (OBATCH_BATCH_WORKER)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.postgres and not args.database_url:
        with contextlib.contextmanager(postgres_server)() as pg:
            return soak(args, pg.create_database())
    return soak(args, args.database_url)


if __name__ == "__main__":
    raise SystemExit(main())
