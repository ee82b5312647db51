"""Probe a live ``obatch serve`` the way a careless or hostile tenant would, and check that nobody else notices.

Starts an Ollama simulator (thread), stores a small benchmark sweep so estimates have points, starts
``obatch serve`` (subprocess, two tenant keys and an admin key) and replays the reproductions of the hardening
issue while another thread polls ``/health`` every 20 ms:

  estimate of 3,000,000 and 10^18 requests · 1,260 wrong keys · an idle socket, headers a line every 0.3 s, a
  stalled body, an upload at 16 bytes / 0.2 s · engine tuning (num_ctx 10^7, num_gpu, max_tokens -1 / 1e9,
  keep_alive) · 100,000-deep JSON on every JSON route · odd completion windows and models · a batch with one
  300-deep line · a batch with one line for a model the engine lacks · what a tenant's /metrics and runs show ·
  404/405 in the access log

and those of the second round: a pilot of lines the policy refuses · /v1/responses output budgets · 300 idle
sockets from one address · four concurrent uploads against the storage quota · a tenant's sweep · a deep body sent
as multipart/… and 900 levels inside a chat request · malformed chat bodies · wrong keys each with its own
X-Forwarded-For · a body at a byte a second · what /health and the benchmark runs tell a tenant · a small batch
after each (it must still complete).

Prints each answer and the figures (health latency max / p99, time each slow client was held), and exits 1 when a
check fails: any 5xx, /health slower than --health-ms, a slow client held past its limit, a wrong answer.

    python perf/probe_server.py [--health-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from obatch.bench.measure import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.testing.ollama_sim import SimConfig, SimModel, run_in_thread
from obatch.testing.server import ServerProcess, serve_env

CHAT = "llama3.2:1b"
TENANT, OTHER, ADMIN = "sk-probe-tenant-0123456789", "sk-probe-other-0123456789", "sk-probe-admin-0123456789"
LIMITS = {"header_timeout": 2.0, "body_idle_timeout": 2.0, "upload_timeout": 4.0,
          "max_storage_bytes_per_key": 3_000_000}
QUOTA_FILE = 1_260_000  # four of them at once against the quota: at most two fit
SIM = SimConfig(models=(SimModel(CHAT),), num_parallel=2, prompt_tps=20_000, decode_tps=3000)


class Probe:
    def __init__(self, url: str, health_ms: float) -> None:
        self.url, self.health_ms = url, health_ms
        self.failures: list[str] = []
        self.statuses: list[tuple[str, int]] = []
        self.http = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TENANT}"})

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        self.statuses.append((f"{method} {path}", response.status_code))
        return response

    def code(self, response: httpx.Response) -> str:
        try:
            return str(response.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            return "-"

    # ------------------------------------------------------------------------------------------ steps

    def estimate(self) -> None:
        print("estimate")
        query = {"model": CHAT, "prompt_tokens": 40, "output_tokens": 30}
        for n in (3_000_000, 10**18):
            started = time.perf_counter()
            response = self.call("GET", "/v1/benchmarks/estimate", params={**query, "num_requests": n})
            took = time.perf_counter() - started
            extra = f"low {response.json()['low']:.0f} s" if response.status_code == 200 else self.code(response)
            print(f"    num_requests={n}: {response.status_code} in {took:.3f} s ({extra})")
            self.check(response.status_code == (200 if n < 10**9 else 400) and took < 2, f"estimate n={n}")

    def engine_tuning(self) -> None:
        print("engine tuning through the pass-through")
        base = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for extra in ({"options": {"num_ctx": 10_000_000}}, {"options": {"num_gpu": 99}},
                      {"options": {"num_thread": 64}}, {"max_tokens": -1}, {"max_tokens": 1e9},
                      {"keep_alive": "24h"}, {"options": {"temperature": 0.2}}):
            response = self.call("POST", "/v1/chat/completions", json={**base, **extra})
            print(f"    {orjson.dumps(extra).decode()}: {response.status_code} {self.code(response)}")
            want = 200 if "temperature" in str(extra) else 400
            self.check(response.status_code == want, f"pass-through {extra}")

    def nesting_and_text(self) -> None:
        print("nesting, completion_window, model")
        deep = b"[" * 100_000 + b"]" * 100_000
        for path in ("/v1/batches", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            response = self.call("POST", path, content=deep, headers={"content-type": "application/json"})
            print(f"    100,000-deep body to {path}: {response.status_code} {self.code(response)}")
            self.check(response.status_code == 400, f"deep body {path}")
        file_id = self.upload(b"".join(orjson.dumps(line) + b"\n" for line in [chat_line("a")]))
        for field, value in (("completion_window", "2" * 4301 + "h"), ("completion_window", "\u0662\u0664h"),
                             ("completion_window", "24h\n"), ("model", "m" * 100_000), ("model", "a\nb")):
            body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                    field: value}
            response = self.call("POST", "/v1/batches", json=body)
            print(f"    {field}={value[:12]!r}…({len(value)} chars): {response.status_code} {self.code(response)}")
            self.check(response.status_code == 400, f"{field} {value[:12]!r}")

    def upload(self, content: bytes) -> str:
        response = self.call("POST", "/v1/files", data={"purpose": "batch"},
                             files={"file": ("probe.jsonl", content)})
        return str(response.json()["id"])

    def batch(self, content: bytes) -> dict[str, Any]:
        created = self.call("POST", "/v1/batches", json={"input_file_id": self.upload(content),
                                                         "endpoint": "/v1/chat/completions",
                                                         "completion_window": "24h"}).json()
        deadline = time.monotonic() + 60
        while created["status"] not in ("completed", "failed", "expired", "cancelled"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
            created = self.call("GET", f"/v1/batches/{created['id']}").json()
        return dict(created)

    def pathological_batches(self) -> None:
        print("batches with one pathological line")
        line = orjson.dumps(chat_line("deep", metadata="NESTED")).replace(b'"NESTED"', b"[" * 300 + b"]" * 300)
        good = b"".join(orjson.dumps(chat_line(f"ok{i}")) + b"\n" for i in range(3))
        deep = self.batch(good + line + b"\n")
        errors = [(e["line"], e["code"]) for e in (deep.get("errors") or {}).get("data", [])]
        print(f"    300-deep line 4: {deep['status']}, errors {errors}")
        self.check(deep["status"] == "failed" and errors == [(4, "json_too_deep")], "deep line named")
        missing = self.batch(good + orjson.dumps(chat_line("nomodel", model="no-such-model:1b")) + b"\n")
        counts = missing["request_counts"]
        print(f"    line for a missing model: {missing['status']}, {counts}")
        self.check(missing["status"] == "completed" and counts["completed"] == 3 and counts["failed"] == 1,
                   "valid lines of a batch run beside a failing one")

    def disclosure(self, log: Path) -> None:
        print("disclosure")
        mine = self.call("GET", "/metrics").text
        self.check("obatch_http_requests" not in mine and "obatch_batches" in mine, "tenant /metrics is its own")
        admin = self.call("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        self.check("obatch_http_requests_total" in admin, "admin /metrics is global")
        runs = self.call("GET", "/v1/benchmarks/runs").json()["data"]
        self.check(bool(runs) and runs[0].get("hostname") is None, "tenant runs without host details")
        self.call("GET", "/wp-login.php")
        self.call("DELETE", "/health")
        time.sleep(0.3)
        text = log.read_text(errors="replace")
        self.check('"status":404' in text and '"status":405' in text, "404 and 405 in the access log")

    def wrong_keys(self, n: int = 1260) -> None:
        print(f"{n} wrong keys, one after another, each with its own X-Forwarded-For")
        counts: dict[int, int] = {}
        started = time.perf_counter()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for i in range(n):
                status = client.get("/v1/batches", headers={"Authorization": f"Bearer sk-guess-{i}",
                                                            "X-Forwarded-For": f"198.51.{i // 250}.{i % 250}"}
                                    ).status_code
                counts[status] = counts.get(status, 0) + 1
                self.statuses.append(("GET /v1/batches (guess)", status))
        print(f"    {counts} in {time.perf_counter() - started:.1f} s")
        self.check(counts.get(401, 0) <= 20 and counts.get(429, 0) >= n - 20, "guessing is limited")

    # ------------------------------------------------------------------------------------- second round

    def small_batch_completes(self, after: str) -> None:
        done = self.batch(b"".join(orjson.dumps(chat_line(f"s{i}")) + b"\n" for i in range(3)))
        self.check(done["status"] == "completed", f"a small batch completes after {after}")

    def policy_everywhere(self) -> None:
        print("one policy at every door")
        bad = [{"max_tokens": -1, "keep_alive": "-1", "options": {"num_gpu": 99, "num_ctx": 10_000_000,
                                                                  "num_thread": 64}}, {"max_tokens": 10**9}]
        lines = [chat_line(f"good{i}") for i in range(4)] + [chat_line(f"bad{i}", **b) for i, b in enumerate(bad)]
        file_id = self.upload(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        response = self.call("GET", "/v1/benchmarks/estimate", params={"input_file_id": file_id, "pilot": "6"})
        pilot = response.json().get("pilot") or {} if response.status_code == 200 else {}
        print(f"    pilot=6 of 4 good + 2 refused lines: {response.status_code}, pilot {pilot.get('requests')} lines")
        self.check(response.status_code == 200 and pilot.get("requests") == 4, "the pilot runs only good lines")
        for budget in (10**9, -1, 0):
            answer = self.call("POST", "/v1/responses", json={"model": CHAT, "input": "hi",
                                                               "max_output_tokens": budget})
            print(f"    /v1/responses max_output_tokens={budget}: {answer.status_code} {self.code(answer)}")
            self.check(answer.status_code == 400, f"responses max_output_tokens={budget}")
        base = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for extra in ({"messages": [1, 2]}, {"stop": 5}, {"seed": 10**30},
                      {"messages": [{"role": "assistant", "tool_calls": [{"x": 1}]}]},
                      {"messages": [{"role": "assistant", "tool_calls": [{"function": None}]}]}):
            answer = self.call("POST", "/v1/chat/completions", content=orjson.dumps({**base, **extra})
                               if "seed" not in extra else f'{{"model":"{CHAT}","messages":[{{"role":"user",'
                               f'"content":"hi"}}],"seed":{10**30}}}'.encode(),
                               headers={"content-type": "application/json"})
            param = answer.json().get("error", {}).get("param") if answer.status_code == 400 else None
            print(f"    chat {str(extra)[:60]}: {answer.status_code} param={param}")
            self.check(answer.status_code == 400 and bool(param), f"malformed chat {str(extra)[:40]}")
        deep = b"[" * 100_000 + b"]" * 100_000
        answer = self.call("POST", "/v1/chat/completions", content=deep,
                           headers={"content-type": "multipart/form-data; boundary=x"})
        print(f"    100,000-deep body as multipart/…: {answer.status_code} {self.code(answer)}")
        self.check(answer.status_code == 400, "deep body as multipart")
        inner = orjson.dumps({**base, "metadata": "NESTED"}).replace(b'"NESTED"', b"[" * 900 + b"]" * 900)
        answer = self.call("POST", "/v1/chat/completions", content=inner, headers={"content-type": "application/json"})
        print(f"    900 levels inside a chat request: {answer.status_code} {self.code(answer)}")
        self.check(answer.status_code == 400, "900-deep chat request")
        self.small_batch_completes("the policy probes")

    def idle_sockets(self, count: int = 300, rounds: int = 3) -> None:
        print(f"{count} idle sockets from one address, opened again {rounds} times, while another address asks")
        host, port = self.url.removeprefix("http://").split(":")
        ok = asked = 0
        with httpx.Client(base_url=self.url, timeout=5, headers=self.http.headers,
                          transport=httpx.HTTPTransport(local_address="127.0.0.3")) as other:
            for _ in range(rounds):
                held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]
                until = time.monotonic() + 3
                while time.monotonic() < until:
                    asked += 1
                    with contextlib.suppress(httpx.TransportError):
                        ok += other.get("/v1/files").status_code == 200
                    time.sleep(0.05)
                for s in held:
                    s.close()
        print(f"    another address: {ok} of {asked} requests answered 200")
        self.check(asked > 0 and ok == asked, "idle sockets of one address leave the server to others")
        self.small_batch_completes("the idle sockets")

    def quota_race(self) -> None:
        print(f"four concurrent uploads of {QUOTA_FILE // 1000} kB, quota {LIMITS['max_storage_bytes_per_key']}")
        content = b"".join(orjson.dumps(chat_line(f"q{i}", metadata="x" * 900)) + b"\n"
                           for i in range(QUOTA_FILE // 1000))

        def send(_: int) -> int:
            with httpx.Client(base_url=self.url, timeout=60, headers=self.http.headers) as client:
                return client.post("/v1/files", data={"purpose": "batch"},
                                   files={"file": ("q.jsonl", content)}).status_code

        for f in self.call("GET", "/v1/files", params={"limit": 10_000}).json()["data"]:
            self.call("DELETE", f"/v1/files/{f['id']}")
        threads: list[int] = []
        workers = [threading.Thread(target=lambda: threads.append(send(0))) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        stored = sum(f["bytes"] for f in self.call("GET", "/v1/files", params={"limit": 10_000}).json()["data"])
        print(f"    statuses {sorted(threads)}, {stored} bytes stored")
        self.check(stored <= int(LIMITS["max_storage_bytes_per_key"]), "concurrent uploads stay within the quota")
        for f in self.call("GET", "/v1/files", params={"limit": 10_000}).json()["data"]:
            self.call("DELETE", f"/v1/files/{f['id']}")
        self.small_batch_completes("the quota race")

    def sweeps_and_views(self) -> None:
        print("sweeps and what a tenant sees")
        sweep = {"models": [CHAT], "concurrency": [256], "requests": 4096, "name": "tenant sweep"}
        answer = self.call("POST", "/v1/benchmarks/sweeps", json=sweep)
        print(f"    a tenant's sweep of 4,096 requests: {answer.status_code} {self.code(answer)}")
        self.check(answer.status_code == 403, "sweeps take an admin key")
        with httpx.Client(base_url=self.url, timeout=10) as anonymous:
            backend = anonymous.get("/health").json()["backend"]
        print(f"    anonymous /health backend: {backend}")
        self.check(not backend["urls"] and not backend["hosts"] and backend["version"] is None,
                   "anonymous /health says up or down only")
        runs = self.call("GET", "/v1/benchmarks/runs", headers={"Authorization": f"Bearer {OTHER}"}).json()["data"]
        self.check(all(not r["name"] for r in runs), "another key sees no run names")

    # ------------------------------------------------------------------------------------- slow clients

    def _socket(self) -> socket.socket:
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.settimeout(30)
        return sock

    def _held(self, name: str, send: Callable[[socket.socket], None], limit: float, out: dict[str, Any]) -> None:
        sock = self._socket()
        started = time.monotonic()
        stop = threading.Event()

        def keep_sending() -> None:
            with contextlib.suppress(OSError):
                send(sock)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
        stop.set()
        sock.close()
        out[name] = (time.monotonic() - started, data.split(b"\r\n", 1)[0].decode(errors="replace"), limit)

    def slow_clients(self) -> None:
        print("slow clients (at once)")
        auth = f"Authorization: Bearer {TENANT}\r\n"

        def idle(sock: socket.socket) -> None:
            pass

        def slow_headers(sock: socket.socket) -> None:
            sock.sendall(b"GET /v1/files HTTP/1.1\r\nHost: x\r\n")
            for i in range(200):
                time.sleep(0.3)
                sock.sendall(f"X-Slow-{i}: {i}\r\n".encode())

        def stalled_body(sock: socket.socket) -> None:
            sock.sendall(f"POST /v1/batches HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
                         f"Content-Length: 1000\r\n\r\n{{\"input".encode())

        def byte_a_second(sock: socket.socket) -> None:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json"
                         f"\r\nContent-Length: 1000\r\n\r\n".encode())
            for _ in range(600):
                sock.sendall(b" ")
                time.sleep(1.0)

        def trickle(sock: socket.socket) -> None:
            body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n\r\n" + b"x" * 8000
            sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: multipart/form-data; boundary=b"
                         f"\r\nContent-Length: {len(body) + 10}\r\n\r\n".encode())
            for i in range(0, len(body), 16):
                sock.sendall(body[i:i + 16])
                time.sleep(0.2)

        out: dict[str, Any] = {}
        threads = [threading.Thread(target=self._held, args=(name, send, limit, out)) for name, send, limit in (
            ("idle socket", idle, LIMITS["header_timeout"]),
            ("headers every 0.3 s", slow_headers, LIMITS["header_timeout"]),
            ("stalled body", stalled_body, LIMITS["body_idle_timeout"]),
            ("body 1 B / 1 s", byte_a_second, LIMITS["body_idle_timeout"]),
            ("upload 16 B / 0.2 s", trickle, LIMITS["upload_timeout"]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for name, (held, first, limit) in out.items():
            print(f"    {name}: closed after {held:.1f} s (limit {limit:g} s) {first!r}")
            self.check(held < limit + 3, f"{name} cut off")


def chat_line(custom_id: str, *, model: str = CHAT, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Say {custom_id}."}],
                     "max_tokens": 4, **body}}


PHASE = ["start"]  # the step running now, for the health poller's record


def poll_health(url: str, stop: threading.Event, lags: list[tuple[str, float]], statuses: list[int]) -> None:
    """From an address of its own (127.0.0.2): the probes' floods come from 127.0.0.1."""
    with httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as client:
        while not stop.is_set():
            started = time.perf_counter()
            statuses.append(client.get("/health").status_code)
            lags.append((PHASE[0], (time.perf_counter() - started) * 1000))
            time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--health-ms", type=float, default=100.0, help="slowest /health answer allowed (ms)")
    args = parser.parse_args()
    sim_url, stop_sim = run_in_thread(SIM)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        settings = Settings(_env_file=None, data_dir=data, backend="ollama", ollama_url=sim_url)  # type: ignore[call-arg]
        asyncio.run(run_sweep(SweepSpec(models=[CHAT], num_ctx=[2048], concurrency=[1, 2], requests=6,
                                        workload="short"), settings=settings, progress=False))
        env = serve_env(data, backend="ollama", ollama_url=sim_url, api_keys=f"{TENANT},{OTHER}", admin_keys=ADMIN,
                        worker_poll_interval=0.1, commit_interval=0.1, min_completion_window=1, **LIMITS)
        log = Path(tmp) / "server.log"
        try:
            server = ServerProcess.start(data, env, log_path=log, ready_within=60)
        except RuntimeError as exc:
            print(exc)
            stop_sim()
            return 2
        url = server.url
        try:
            probe = Probe(url, args.health_ms)
            lags: list[tuple[str, float]] = []
            health: list[int] = []
            stop = threading.Event()
            poller = threading.Thread(target=poll_health, args=(url, stop, lags, health))
            poller.start()
            try:
                for step in (probe.estimate, probe.engine_tuning, probe.nesting_and_text, probe.pathological_batches,
                             probe.policy_everywhere, probe.quota_race, probe.sweeps_and_views, probe.idle_sockets,
                             probe.slow_clients, functools.partial(probe.disclosure, log),
                             probe.wrong_keys):  # last: it locks this address out for a minute
                    PHASE[0] = getattr(step, "__name__", "disclosure")
                    step()
            finally:
                stop.set()
                poller.join()
            print("health")
            for phase in dict.fromkeys(p for p, _ in lags):
                mine = [ms for p, ms in lags if p == phase]
                print(f"    during {phase}: {len(mine)} polls, median {statistics.median(mine):.1f} ms, "
                      f"max {max(mine):.1f} ms")
            every = [ms for _, ms in lags]
            p99 = statistics.quantiles(every, n=100)[98] if len(every) >= 2 else float("nan")
            print(f"    all: {len(every)} polls, median {statistics.median(every):.1f} ms, p99 {p99:.1f} ms, "
                  f"max {max(every):.1f} ms")
            probe.check(max(every) < args.health_ms and set(health) == {200},
                        f"/health within {args.health_ms:g} ms")
            errors = [(what, status) for what, status in probe.statuses if status >= 500]
            probe.check(not errors, f"no 5xx ({len(probe.statuses)} answers){': ' + str(errors[:5]) if errors else ''}")
            probe.check('"level":"ERROR"' not in log.read_text(errors="replace"), "no error in the server log")
        finally:
            server.stop()
            stop_sim()
    print(f"{'FAILED: ' + '; '.join(probe.failures) if probe.failures else 'all checks passed'}")
    return 1 if probe.failures else 0


if __name__ == "__main__":
    sys.exit(main())
