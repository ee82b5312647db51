"""Keys, ownership and limits: 401 without a key on every /v1 route, 404 for another key's files and batches
in every operation, per-key rate limits (429 + Retry-After), CORS closed by default, no secrets stored or logged,
loopback-only without keys."""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
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
from tests.serverkit import FINAL, KEYS, ServerProcess, assert_openai_error, chat_line

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


def test_cors_closed_by_default(http: httpx.Client) -> None:
    response = http.options("/v1/batches", headers={"Origin": "https://ui.example",
                                                    "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers
