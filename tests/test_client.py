"""obatch.client: the UI's HTTP client — request shapes, auth, and errors as two clear exceptions."""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
import orjson
import pytest
from pydantic import ValidationError

from obatch.client import DEFAULT_SERVER_URL, ApiError, Client, ServerUnavailable
from obatch.protocol import Health
from obatch.testing.server import free_port
from tests.ui_fake import FakeServer


def test_from_env_reads_url_and_key_and_strips_v1() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"object": "list", "data": []})

    api = Client.from_env({"OBATCH_SERVER_URL": "http://example.test:9000/v1/", "OBATCH_API_KEY": "sk-1"},
                          transport=httpx.MockTransport(handler))
    assert api.base_url == "http://example.test:9000"
    assert api.list_batches(limit=5).data == []
    assert str(seen[0].url) == "http://example.test:9000/v1/batches?limit=5"
    assert seen[0].headers["authorization"] == "Bearer sk-1"
    assert Client.from_env({}).base_url == DEFAULT_SERVER_URL
    assert "authorization" not in Client.from_env({})._http.headers


def test_files_and_batches_round_trip() -> None:
    fake = FakeServer()
    with fake.client() as api:
        stored = api.upload_file(b'{"a": 1}\n', "in.jsonl")
        assert (stored.filename, stored.purpose, stored.bytes) == ("in.jsonl", "batch", 9)
        assert api.file_content(stored.id) == b'{"a": 1}\n'
        batch = api.create_batch(stored.id, endpoint="/v1/chat/completions", model="m", concurrency=3,
                                 metadata={"k": "v"})
        sent = orjson.loads(fake.sent("POST", "/v1/batches")[0].content)
        assert sent == {"input_file_id": stored.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                        "metadata": {"k": "v"}, "model": "m", "concurrency": 3}
        assert api.get_batch(batch.id).status == "in_progress"
        assert [b.id for b in api.list_batches()] == [batch.id]
        assert api.cancel_batch(batch.id).status == "cancelling"
        assert fake.sent("POST", "/v1/files")[0].headers["authorization"] == "Bearer sk-test"


def test_error_body_becomes_api_error_with_openai_message() -> None:
    api = FakeServer().client()
    with pytest.raises(ApiError) as caught:
        api.get_batch("batch-nope")
    assert (caught.value.status, caught.value.code, caught.value.message) == (404, "not_found",
                                                                                "No such batch: batch-nope")
    plain = Client("http://x", transport=httpx.MockTransport(lambda r: httpx.Response(500, text="boom")))
    with pytest.raises(ApiError, match="boom"):
        plain.list_models()
    litestar = Client("http://x", transport=httpx.MockTransport(
        lambda r: httpx.Response(400, json={"status_code": 400, "detail": "bad limit"})))
    with pytest.raises(ApiError, match="bad limit"):
        litestar.list_batches()


def test_nothing_listening_is_server_unavailable() -> None:
    api = Client(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(ServerUnavailable) as caught:
        api.health()
    assert "cannot be reached" in caught.value.message
    assert api.base_url in caught.value.message


def test_health_503_is_a_report_not_an_error() -> None:
    down = {"status": "error", "db": "unreachable: OperationalError",
            "backend": {"name": "ollama", "reachable": True, "version": "0.9.0", "urls": [], "hosts": []}}
    api = Client("http://x", transport=httpx.MockTransport(lambda r: httpx.Response(503, json=down)))
    report = api.health()
    assert isinstance(report, Health) and not report.server_ok
    assert report.db == "unreachable: OperationalError"
    assert report.backend.reachable and report.backend.version == "0.9.0"


def test_a_health_answer_of_another_shape_fails_loudly() -> None:
    """The server owns the shape: an answer that is not obatch's (a proxy's page, an older server) is an error,
    not a guess."""
    proxy = Client("http://x", transport=httpx.MockTransport(lambda r: httpx.Response(503, text="<html>busy")))
    with pytest.raises(ApiError, match="non-JSON"):
        proxy.health()
    other = Client("http://x", transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"status": "healthy", "backend": "ollama"})))
    with pytest.raises(ValidationError):
        other.health()


def test_benchmark_calls_encode_their_parameters() -> None:
    fake = FakeServer()
    api = fake.client()
    assert len(api.benchmark_history("llama3.2:1b")) == 9  # 3 windows × 2 concurrency levels, 3 request rates
    assert {p.num_ctx for p in api.benchmark_compare(["llama3.2:1b", "qwen2.5:0.5b"], num_ctx=4096)} == {4096}
    made = api.estimate(input_file_id="file-1")
    assert (made.seconds, made.low, made.high) == (42.0, 30.0, 60.0) and made.answers and not made.answers.known
    piloted = api.estimate(input_file_id="file-1", pilot=16)
    assert piloted.pilot is not None and piloted.pilot.requests == 16 and piloted.done_requests == 16
    urls = [str(r.url) for r in fake.requests]
    assert "http://fake.obatch/v1/benchmarks/compare?models=llama3.2%3A1b%2Cqwen2.5%3A0.5b&num_ctx=4096" in urls
    assert "http://fake.obatch/v1/benchmarks/estimate?input_file_id=file-1" in urls
    assert "http://fake.obatch/v1/benchmarks/estimate?input_file_id=file-1&pilot=16" in urls


def test_client_and_views_import_no_ui_framework() -> None:
    """The client and the view builders stay plain Python (usable from a notebook); only pages import Streamlit."""
    root = Path(__file__).resolve().parents[1] / "obatch"
    for path in (root / "client.py", *sorted((root / "ui" / "views").glob("*.py"))):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {n for n in names if n.split(".")[0] in ("streamlit", "litestar")}, path
