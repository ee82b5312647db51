"""Keys, ownership and limits: 401 without a key on every /v1 route, 404 for another key's files and batches
in every operation, per-key rate limits (429 + Retry-After), CORS closed by default, no secrets stored or logged,
loopback-only without keys."""

from __future__ import annotations

import io
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from litestar.testing import AsyncTestClient
from openai import OpenAI

from obatch import cli
from obatch.config import Settings
from obatch.server import create_app
from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import jsonl
from tests.serverkit import (
    FINAL,
    KEYS,
    ServerProcess,
    assert_openai_error,
    chat_line,
    free_port,
    server_env,
    settled,
)

ROUTES = [
    ("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-0123456789abcdef01234567"),
    ("GET", "/v1/files/file-0123456789abcdef01234567/content"),
    ("DELETE", "/v1/files/file-0123456789abcdef01234567"),
    ("GET", "/v1/batches"), ("POST", "/v1/batches"), ("GET", "/v1/batches/batch-0123456789abcdef01234567"),
    ("POST", "/v1/batches/batch-0123456789abcdef01234567/cancel"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"), ("GET", "/v1/models/llama3.2:1b"), ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def http(obatch_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=obatch_server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic " + KEYS["alice"], "Bearer", KEYS["alice"]])
def test_every_route_needs_a_valid_key(http: httpx.Client, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    for method, path in ROUTES:
        response = http.request(method, path, headers=headers, json={} if method == "POST" else None)
        error = assert_openai_error(response, 401)
        assert error["code"] == "invalid_api_key", (method, path)
    assert http.get("/health").status_code == 200  # the one route open to all


def test_sdk_without_a_valid_key(obatch_server: ServerProcess) -> None:
    with OpenAI(base_url=obatch_server.v1, api_key="sk-not-a-key", max_retries=0) as client, \
            pytest.raises(openai.AuthenticationError):
        client.batches.list()


def test_another_keys_objects_are_not_found(obatch_server: ServerProcess) -> None:
    with OpenAI(base_url=obatch_server.v1, api_key=KEYS["alice"], max_retries=0) as alice, \
            OpenAI(base_url=obatch_server.v1, api_key=KEYS["bob"], max_retries=0) as bob:
        private = alice.files.create(file=("mine.jsonl", io.BytesIO(jsonl([chat_line("x", max_tokens=100)]))),
                                     purpose="batch")
        batch = alice.batches.create(input_file_id=private.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        attempts = {
            "retrieve file": lambda: bob.files.retrieve(private.id),
            "file content": lambda: bob.files.content(private.id),
            "delete file": lambda: bob.files.delete(private.id),
            "retrieve batch": lambda: bob.batches.retrieve(batch.id),
            "cancel batch": lambda: bob.batches.cancel(batch.id),
            "batch from another's file": lambda: bob.batches.create(
                input_file_id=private.id, endpoint="/v1/chat/completions", completion_window="24h"),
            "list batches after another's": lambda: bob.batches.list(after=batch.id),
            "list files after another's": lambda: bob.files.list(after=private.id),
        }
        for name, attempt in attempts.items():
            with pytest.raises(openai.NotFoundError):
                attempt()
                pytest.fail(f"{name} leaked across keys")
        assert private.id not in {f.id for f in bob.files.list()}
        assert batch.id not in {b.id for b in bob.batches.list()}
        # Nothing bob tried changed alice's objects.
        assert alice.files.retrieve(private.id).id == private.id
        assert alice.batches.retrieve(batch.id).status not in ("cancelling", "cancelled")
        done = alice.batches.retrieve(batch.id)
        for _ in range(300):
            if done.status in FINAL:
                break
            time.sleep(0.1)
            done = alice.batches.retrieve(batch.id)
        assert done.status == "completed" and done.output_file_id
        with pytest.raises(openai.NotFoundError):
            bob.files.content(done.output_file_id)


def test_keys_are_never_stored_or_logged(obatch_server: ServerProcess) -> None:
    """Each key stores a file and a batch here (the test may run first), then the store and the log are read."""
    for key in KEYS.values():
        with OpenAI(base_url=obatch_server.v1, api_key=key, max_retries=0) as client:
            file_id = client.files.create(file=("keys.jsonl", io.BytesIO(jsonl([chat_line("k")]))),
                                          purpose="batch").id
            client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    with sqlite3.connect(obatch_server.data_dir / "obatch.db") as db:
        owners = {row[0] for row in db.execute("SELECT owner FROM files UNION SELECT owner FROM batches")}
    db.close()
    assert len(owners) >= len(KEYS) and all(owner.startswith("key_") for owner in owners)
    log = obatch_server.log()
    for key in KEYS.values():
        assert all(key not in owner for owner in owners)
        assert key not in log
    assert '"level":"INFO"' in log and '"request_id"' in log  # JSON lines with request ids


@pytest.mark.parametrize("path", ["/v1/files/..%2F..%2Fobatch.db/content", "/v1/files/file-..%2Fx/content",
                                  "/v1/files/%2E%2E/content", "/v1/files/file-ZZZ/content"])
def test_file_ids_never_reach_paths(http: httpx.Client, path: str) -> None:
    assert_openai_error(http.get(path, headers={"Authorization": f"Bearer {KEYS['alice']}"}), 404)


def test_no_keys_means_loopback_only(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    for name in ("OBATCH_API_KEYS", "OBATCH_API_KEYS_FILE", "OBATCH_ALLOW_PUBLIC_BIND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path)]) == 2
    assert "refusing to bind 0.0.0.0" in capsys.readouterr().err


@pytest.fixture
async def limited(obatch_sim: OllamaSim, tmp_path: Path) -> AsyncIterator[AsyncTestClient[object]]:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# the team's keys\n{KEYS['alice']}\n{KEYS['bob']}  # bob\n")
    settings = Settings(_env_file=None, backend="ollama", ollama_url=obatch_sim.url,  # type: ignore[call-arg]
                        data_dir=tmp_path / "data", api_keys_file=keys_file, rate_limit_per_minute=3,
                        cors_origins="https://ui.example")
    async with AsyncTestClient(create_app(settings)) as client:
        yield client  # type: ignore[misc]


async def test_rate_limit_per_key_and_cors(limited: AsyncTestClient[object]) -> None:
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    for _ in range(3):
        assert (await limited.get("/v1/batches", headers=alice)).status_code == 200
    refused = await limited.get("/v1/batches", headers=alice)
    error = assert_openai_error(refused, 429)
    assert error["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    bob = {"Authorization": f"Bearer {KEYS['bob']}"}
    assert (await limited.get("/v1/batches", headers=bob)).status_code == 200  # limits are per key
    assert (await limited.get("/health")).status_code == 200  # health is never limited

    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    allowed = await limited.options("/v1/batches", headers=preflight)
    assert allowed.headers.get("access-control-allow-origin") == "https://ui.example"
    other = await limited.options("/v1/batches", headers={**preflight, "Origin": "https://evil.example"})
    assert other.headers.get("access-control-allow-origin") is None


async def test_cors_lets_a_browser_page_read_the_results_cursor(obatch_sim: OllamaSim, tmp_path: Path) -> None:
    """A page on an allowed origin pages ``/results`` by its ``x-obatch-*`` headers: a browser hides every response
    header the server does not list in ``access-control-expose-headers``."""
    settings = Settings(_env_file=None, backend="ollama", ollama_url=obatch_sim.url,  # type: ignore[call-arg]
                        data_dir=tmp_path / "data", api_keys=KEYS["alice"], cors_origins="https://ui.example",
                        worker_poll_interval=0.05)
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "Origin": "https://ui.example"}
    async with AsyncTestClient(create_app(settings)) as api:
        content = jsonl([chat_line(f"r{i}", max_tokens=4) for i in range(3)])
        stored = await api.post("/v1/files", data={"purpose": "batch"}, headers=headers,
                                files={"file": ("in.jsonl", content)})
        created = await api.post("/v1/batches", headers=headers, json={
            "input_file_id": stored.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        await settled(api, created.json()["id"], headers=headers)
        page = await api.get(f"/v1/batches/{created.json()['id']}/results", headers=headers)
    assert page.status_code == 200 and page.headers["x-obatch-next-after"] == "3"
    assert page.headers["access-control-allow-origin"] == "https://ui.example"
    exposed = {h.strip().lower() for h in page.headers["access-control-expose-headers"].split(",")}
    assert {"x-obatch-next-after", "x-obatch-finished", "x-request-id", "retry-after"} <= exposed


def test_cors_closed_by_default(http: httpx.Client) -> None:
    response = http.options("/v1/batches", headers={"Origin": "https://ui.example",
                                                    "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers


# ---------------------------------------------------------------- a real server, attacked on its sockets


@pytest.fixture
def start(obatch_sim: OllamaSim, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a real ``obatch serve`` with the test keys and these settings (stopped after the test)."""
    servers: list[ServerProcess] = []

    def started(**settings: object) -> ServerProcess:
        data = tmp_path / f"data{len(servers)}"
        env = server_env(data, obatch_sim.url, api_keys=",".join(KEYS.values()), **settings)
        servers.append(ServerProcess.start(data, env))
        return servers[-1]

    try:
        yield started
    finally:
        for server in servers:
            server.stop()


def _from(address: str, server: ServerProcess) -> httpx.Client:
    """A client whose connections leave from ``address`` (any of 127/8 is this machine)."""
    return httpx.Client(base_url=server.url, timeout=5, transport=httpx.HTTPTransport(local_address=address))


def _sockets(server: ServerProcess, count: int, address: str = "127.0.0.1") -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", server.port), source_address=(address, 0)) for _ in range(count)]


def test_idle_sockets_of_one_address_leave_the_server_to_the_others(start: Callable[..., ServerProcess]) -> None:
    """260 idle connections from one client once made every request of every client answer 503 (the cap on
    connections was global) until they timed out; now one address holds at most max_connections_per_address."""
    server = start()
    held = _sockets(server, 300)
    try:
        time.sleep(0.5)
        with _from("127.0.0.2", server) as other:
            took = []
            for _ in range(20):
                began = time.perf_counter()
                assert other.get("/health").status_code == 200
                took.append(time.perf_counter() - began)
        assert max(took) < 1.0, took
        refused = held[-1].recv(1024)  # the 65th and later were answered 429 and closed
        assert refused.startswith(b"HTTP/1.1 429"), refused
    finally:
        for s in held:
            s.close()


def test_idle_sockets_of_many_addresses_are_shed_near_the_cap(start: Callable[..., ServerProcess]) -> None:
    server = start(max_connections=64, max_connections_per_address=16)
    held = [s for i in range(3, 8) for s in _sockets(server, 12, f"127.0.0.{i}")]  # 60 of 64, none over 16
    try:
        time.sleep(1.5)  # idle past IDLE_SHED
        with _from("127.0.0.2", server) as other:
            assert [other.get("/health").status_code for _ in range(5)] == [200] * 5
        closed = 0
        for s in held:
            s.settimeout(2)
            closed += s.recv(1) == b""
        assert closed >= 10, closed  # the idle ones were closed to make room
    finally:
        for s in held:
            s.close()


def test_forwarded_headers_count_only_from_trusted_proxies(start: Callable[..., ServerProcess]) -> None:
    """Each wrong key with its own X-Forwarded-For was counted against a different address: never throttled."""
    server = start(auth_failures_per_minute=5)
    with httpx.Client(base_url=server.url, timeout=5) as client:
        statuses = [client.get("/v1/files", headers={"Authorization": f"Bearer sk-guess-{i}",
                                                    "X-Forwarded-For": f"203.0.113.{i}"}).status_code
                    for i in range(8)]
    assert statuses == [401] * 5 + [429] * 3, statuses


def test_a_trusted_proxy_is_believed_and_not_held_to_the_per_address_limit(
        start: Callable[..., ServerProcess]) -> None:
    server = start(trusted_proxies="127.0.0.1", max_connections_per_address=4, auth_failures_per_minute=3)
    held = _sockets(server, 10)  # the proxy's connections: many clients behind one address
    try:
        with httpx.Client(base_url=server.url, timeout=5) as proxy:
            assert proxy.get("/health").status_code == 200
            spread = [proxy.get("/v1/files", headers={"Authorization": f"Bearer sk-guess-{i}",
                                                      "X-Forwarded-For": f"203.0.113.{i}"}).status_code
                      for i in range(6)]
            one = [proxy.get("/v1/files", headers={"Authorization": "Bearer sk-guess",
                                                   "X-Forwarded-For": "198.51.100.7"}).status_code for _ in range(4)]
        assert spread == [401] * 6 and one == [401] * 3 + [429], (spread, one)  # counted per forwarded client
        for s in held:
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(1)  # none of the ten was answered 429 and closed
    finally:
        for s in held:
            s.close()


def test_a_trickled_body_is_cut_off_with_408(start: Callable[..., ServerProcess]) -> None:
    """A byte every 0.5 s stays within the idle timeout; it was held until upload_timeout, then logged as a 500."""
    server = start(body_idle_timeout=1, min_body_rate=100)
    for path, content_type in (("/v1/chat/completions", "application/json"),
                               ("/v1/files", "multipart/form-data; boundary=b")):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
                      f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n".encode())
            began, answer = time.monotonic(), b""
            s.settimeout(0.5)
            while not answer and time.monotonic() - began < 15:
                try:
                    s.sendall(b" ")
                    answer = s.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
            assert answer.startswith(b"HTTP/1.1 408"), (path, answer)
            assert time.monotonic() - began < 5
    assert '"status":500' not in server.log()


@pytest.mark.usefixtures("db_url")
def test_concurrent_uploads_never_pass_the_quota(start: Callable[..., ServerProcess], db_url: str | None) -> None:
    """Four uploads at once, quota for two and a half: all four were accepted (each saw the room before any was
    recorded)."""
    content = jsonl([chat_line(f"r{i}", content="x" * 4000) for i in range(200)])  # about 830 kB
    quota = 5 * len(content) // 2
    server = start(max_storage_bytes_per_key=quota, max_file_bytes=2 << 20, database_url=db_url)

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post("/v1/files", data={"purpose": "batch"}, headers={"Authorization": f"Bearer "
                               f"{KEYS['alice']}"}, files={"file": ("in.jsonl", content, "application/jsonl")})

    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(send, range(4)))
        kept = [a.json()["id"] for a in answers if a.status_code == 200]
        assert len(kept) <= 2, [a.status_code for a in answers]
        assert all(assert_openai_error(a, 400)["code"] == "storage_quota_exceeded" for a in answers
                   if a.status_code != 200)
        with httpx.Client(base_url=server.url, timeout=30,
                          headers={"Authorization": f"Bearer {KEYS['alice']}"}) as client:
            for file_id in kept:
                assert client.delete(f"/v1/files/{file_id}").status_code == 200


@pytest.mark.usefixtures("db_url")
def test_concurrent_sweeps_never_pass_the_daily_budget(start: Callable[..., ServerProcess], db_url: str | None) -> None:
    """Eight sweeps of 48 requests from one key at once, a budget of 100: each read the budget before any was
    recorded, and more than two were accepted. The budget is checked and the sweep recorded in one step now."""
    server = start(tenant_sweeps="true", max_sweep_requests=64, sweep_requests_per_day=100, database_url=db_url)
    sweep = {"models": ["llama3.2:1b"], "concurrency": [1], "requests": 48, "workload": "tiny"}
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post("/v1/benchmarks/sweeps", json=sweep, headers=alice)

    with httpx.Client(base_url=server.url, timeout=30, headers=alice) as client:
        for fitting in (2, 0):  # then again, with the budget spent
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(send, range(8)))
            assert sorted(a.status_code for a in answers) == [200] * fitting + [429] * (8 - fitting)
            assert all(assert_openai_error(a, 429)["code"] == "sweep_budget_exceeded" for a in answers
                       if a.status_code != 200)
            for made in answers:
                if made.status_code == 200:
                    assert client.post(f"/v1/benchmarks/sweeps/{made.json()['id']}/cancel").status_code == 200
        assert len(client.get("/v1/benchmarks/sweeps").json()["data"]) == 2


# -------------------------------------------------------------------------------------------------- TLS


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_the_sdk_round_trip_over_tls(obatch_sim: OllamaSim, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    env = server_env(data, obatch_sim.url, api_keys=KEYS["alice"], ssl_certfile=cert, ssl_keyfile=key)
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "obatch", "serve", "--port", str(port)], env=env, cwd=data,
                                stdout=log, stderr=subprocess.STDOUT)
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        with httpx.Client(verify=trusted, timeout=5) as https:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if https.get(f"https://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "server.log").read_text()
                    time.sleep(0.2)
        with pytest.raises(httpx.TransportError):  # plain HTTP is not spoken there
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        with OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=KEYS["alice"], max_retries=0,
                    http_client=httpx.Client(verify=trusted)) as client:
            stored = client.files.create(file=("tls.jsonl", io.BytesIO(jsonl([chat_line("t")]))), purpose="batch")
            batch = client.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            for _ in range(300):
                if (batch := client.batches.retrieve(batch.id)).status in FINAL:
                    break
                time.sleep(0.1)
            assert batch.status == "completed" and batch.output_file_id
            assert client.files.content(batch.output_file_id).text.count("\n") == 1
        with OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key=KEYS["alice"], max_retries=0) as unverified, \
                pytest.raises(openai.APIConnectionError):
            unverified.models.list()  # a client that does not trust the certificate refuses it
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_public_bind_over_plain_http_is_refused_unless_forced(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    for name in ("OBATCH_SSL_CERTFILE", "OBATCH_TRUSTED_PROXIES", "OBATCH_ALLOW_PLAIN_HTTP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OBATCH_API_KEYS", KEYS["alice"])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path)]) == 2
    said = capsys.readouterr().err
    assert "plain HTTP" in said and "--ssl-certfile" in said and "OBATCH_TRUSTED_PROXIES" in said
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path), "--allow-public"]) == 2
