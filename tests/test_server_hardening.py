"""What one careless or hostile client must not be able to do to a server its team shares: guess keys unlimited,
tune the shared engine, crash a route or a whole batch with nesting, slip odd text into stored fields, fill the
disk, or read other tenants' numbers. Each test fails on the server as it was before these limits."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from litestar.testing import AsyncTestClient

from obatch.config import Settings
from obatch.server import auth, create_app
from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import chat_line, jsonl
from tests.serverkit import assert_openai_error, settled

KEYS = {"alice": "sk-alice-0123456789abcdef", "bob": "sk-bob-0123456789abcdef"}
ADMIN = "sk-admin-0123456789abcdef"
CHAT = "/v1/chat/completions"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ALICE, BOB = bearer(KEYS["alice"]), bearer(KEYS["bob"])


@pytest.fixture
def server(obatch_sim: OllamaSim, make_settings: Callable[..., Settings]
           ) -> Callable[..., AsyncTestClient[Any]]:
    """An app with two tenant keys and an admin key (the simulator in its own thread behind it); keyword arguments
    override settings."""

    def build(**overrides: Any) -> AsyncTestClient[Any]:
        values: dict[str, Any] = {"api_keys": ",".join(KEYS.values()), "admin_keys": ADMIN,
                                  "worker_poll_interval": 0.05, "min_completion_window": 1}
        values.update(overrides)
        return AsyncTestClient(create_app(make_settings(obatch_sim.url, **values)))

    return build


@pytest.fixture
async def api(server: Callable[..., AsyncTestClient[Any]]) -> AsyncIterator[AsyncTestClient[Any]]:
    async with server() as client:
        yield client


async def upload(api: AsyncTestClient[Any], content: bytes, headers: dict[str, str] = ALICE,
                 name: str = "in.jsonl") -> Any:
    return await api.post("/v1/files", data={"purpose": "batch"}, headers=headers,
                          files={"file": (name, content, "application/octet-stream")})


async def run_batch(api: AsyncTestClient[Any], lines: list[dict[str, Any]] | bytes,
                    headers: dict[str, str] = ALICE) -> dict[str, Any]:
    stored = await upload(api, lines if isinstance(lines, bytes) else jsonl(lines), headers)
    assert stored.status_code == 200, stored.text
    created = await api.post("/v1/batches", headers=headers, json={
        "input_file_id": stored.json()["id"], "endpoint": CHAT, "completion_window": "24h"})
    assert created.status_code == 200, created.text
    return await settled(api, created.json()["id"], headers=headers)


def nested(depth: int) -> Any:
    """A value ``depth`` levels deep, objects and arrays alternating."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"x": value} if level % 2 else [value]
    return value


# ------------------------------------------------------------------------------------------ keys and limits


async def test_failed_logins_are_limited_per_address(server: Callable[..., AsyncTestClient[Any]]) -> None:
    async with server(auth_failures_per_minute=5) as api:
        for i in range(5):
            assert_openai_error(await api.get("/v1/batches", headers=bearer(f"sk-guess-{i}")), 401)
        refused = await api.get("/v1/batches", headers=bearer("sk-guess-6"))
        assert assert_openai_error(refused, 429)["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # the address is refused whatever it sends now: a right key cannot be told apart from a wrong one
        assert_openai_error(await api.get("/v1/batches", headers=ALICE), 429)
        assert (await api.get("/health")).status_code == 200


async def test_the_address_limit_counts_requests_of_every_key(server: Callable[..., AsyncTestClient[Any]]) -> None:
    async with server(address_rate_limit_per_minute=6, rate_limit_per_minute=1000) as api:
        for headers in (ALICE, BOB, ALICE, BOB, {}, bearer("sk-wrong")):
            assert (await api.get("/v1/batches", headers=headers)).status_code in (200, 401)
        assert_openai_error(await api.get("/v1/batches", headers=BOB), 429)


async def test_keys_are_compared_in_constant_time(api: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    compared: list[int] = []
    real = auth.hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        compared.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for headers, status in ((ALICE, 200), (bearer("sk-nobody"), 401), (bearer(ADMIN), 200)):
        compared.clear()
        assert (await api.get("/v1/batches", headers=headers)).status_code == status
        assert len(compared) == 3  # every known key, whether one matched early or none did


# ---------------------------------------------------------------------------------------- engine policy

REFUSED = {
    "options.num_gpu": ({"options": {"num_gpu": 99}}, "option_not_allowed"),
    "options.num_thread": ({"options": {"num_thread": 64}}, "option_not_allowed"),
    "options.num_ctx": ({"options": {"num_ctx": 10_000_000}}, "invalid_value"),
    "num_ctx": ({"num_ctx": 10_000_000}, "invalid_value"),
    "keep_alive": ({"keep_alive": "24h"}, "option_not_allowed"),
    "max_tokens -1": ({"max_tokens": -1}, "invalid_value"),
    "max_tokens 1e9": ({"max_tokens": 1e9}, "invalid_value"),
    "max_completion_tokens": ({"max_completion_tokens": 10**9}, "invalid_value"),
    "options.num_predict": ({"options": {"num_predict": -1}}, "invalid_value"),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_pass_through_refuses_engine_tuning(api: AsyncTestClient[Any], name: str) -> None:
    extra, code = REFUSED[name]
    body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], **extra}
    error = assert_openai_error(await api.post(CHAT, json=body, headers=ALICE), 400)
    assert error["code"] == code and error["param"] and name.split()[0] in error["param"], error
    assert "body." not in error["message"]


async def test_pass_through_allows_what_the_policy_allows(server: Callable[..., AsyncTestClient[Any]]) -> None:
    body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "options": {"temperature": 0.1, "seed": 3, "num_ctx": 4096}}
    async with server() as api:
        assert (await api.post(CHAT, json=body, headers=ALICE)).status_code == 200
        assert (await api.post(CHAT, json={**body, "keep_alive": "1m"}, headers=ALICE)).status_code == 400
    async with server(client_engine_options="temperature,seed,num_thread", allow_client_keep_alive=True,
                      max_client_num_ctx=0) as api:
        wider = {**body, "keep_alive": "1m", "options": {"num_thread": 2}}
        assert (await api.post(CHAT, json=wider, headers=ALICE)).status_code == 200
        no_ctx = await api.post(CHAT, json={**body, "options": {"num_ctx": 2048}}, headers=ALICE)
        assert assert_openai_error(no_ctx, 400)["code"] == "option_not_allowed"


async def test_batch_lines_that_tune_the_engine_fail_validation_on_their_line(api: AsyncTestClient[Any]) -> None:
    lines = [chat_line("ok", max_tokens=4)]
    lines += [chat_line(f"bad{i}", **extra) for i, (extra, _) in enumerate(REFUSED.values())]
    batch = await run_batch(api, lines)
    assert batch["status"] == "failed"
    found = {e["line"]: e["code"] for e in batch["errors"]["data"]}
    assert found == {i + 2: code for i, (_, code) in enumerate(REFUSED.values())}


# ---------------------------------------------------------------------------------------------- nesting


@pytest.mark.parametrize("path", ["/v1/batches", CHAT, "/v1/completions", "/v1/embeddings"])
async def test_deeply_nested_json_bodies_are_400(api: AsyncTestClient[Any], path: str) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    response = await api.post(path, content=body, headers={**ALICE, "content-type": "application/json"})
    assert assert_openai_error(response, 400)["code"] == "json_too_deep"
    inner = await api.post(path, json={"model": "m", "messages": nested(70), "input": "x", "prompt": "x",
                                       "input_file_id": "f", "endpoint": CHAT, "completion_window": "1h"},
                           headers=ALICE)
    assert assert_openai_error(inner, 400)["code"] == "json_too_deep"


@pytest.mark.parametrize("depth", [100, 300, 1000])
async def test_a_deeply_nested_line_fails_validation_on_its_line(api: AsyncTestClient[Any], depth: int) -> None:
    """256-1024 levels once passed validation, failed to serialise in the import and failed the whole batch with
    internal_error after its retries; now any line past the limit is an input error on its line."""
    deep = chat_line("deep")
    deep["body"]["metadata"] = "NESTED"
    line = orjson.dumps(deep).replace(b'"NESTED"', b"[" * depth + b"]" * depth)
    batch = await run_batch(api, jsonl([chat_line("a", max_tokens=4)]) + line + b"\n" +
                            jsonl([chat_line("c", max_tokens=4)]))
    assert batch["status"] == "failed", batch
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(2, "json_too_deep")]


# -------------------------------------------------------------------------------------- stored text


@pytest.mark.parametrize("window", ["\u0662\u0664h", " 24h", "24h\n", "24 h", "2" * 4301 + "h", "1234567h", "24H",
                                    "\uff12\uff14h"])
async def test_completion_window_is_strict_ascii(api: AsyncTestClient[Any], window: str) -> None:
    stored = await upload(api, jsonl([chat_line("a")]))
    response = await api.post("/v1/batches", headers=ALICE, json={
        "input_file_id": stored.json()["id"], "endpoint": CHAT, "completion_window": window})
    error = assert_openai_error(response, 400)
    assert error["param"] == "completion_window" and len(error["message"]) < 200


@pytest.mark.parametrize("model", ["m" * 100_000, "llama3.2:1b\nINFO forged log line", "a\x00b", "\u202emodel", ""])
async def test_batch_model_is_length_and_charset_limited(api: AsyncTestClient[Any], model: str) -> None:
    stored = await upload(api, jsonl([chat_line("a")]))
    response = await api.post("/v1/batches", headers=ALICE, json={
        "input_file_id": stored.json()["id"], "endpoint": CHAT, "completion_window": "24h", "model": model})
    assert assert_openai_error(response, 400)["param"] == "model"
    line = chat_line("a", model=model) if model else None
    if line is not None:
        batch = await run_batch(api, [line])
        assert batch["status"] == "failed" and batch["errors"]["data"][0]["param"] == "body.model"


async def test_upload_filenames_lose_control_characters(api: AsyncTestClient[Any]) -> None:
    raw = "a\x00b\x1b[31m\u202ec\tname.jsonl"
    boundary = "xYzBoundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{raw}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + jsonl([chat_line("a")]) + \
        f"\r\n--{boundary}--\r\n".encode()
    response = await api.post("/v1/files", content=body,
                              headers={**ALICE, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "ab[31mcname.jsonl"


async def test_storage_quota_per_key(server: Callable[..., AsyncTestClient[Any]]) -> None:
    content = jsonl([chat_line(f"r{i}") for i in range(4)])  # about 500 bytes
    async with server(max_storage_bytes_per_key=3 * len(content) // 2) as api:
        first = await upload(api, content)
        assert first.status_code == 200
        refused = await upload(api, content)
        assert assert_openai_error(refused, 400)["code"] == "storage_quota_exceeded"
        assert (await upload(api, content, BOB)).status_code == 200  # another key has its own quota
        listed = (await api.get("/v1/files", headers=ALICE)).json()["data"]
        assert [f["id"] for f in listed] == [first.json()["id"]]  # nothing of the refused upload was kept
        assert (await api.delete(f"/v1/files/{first.json()['id']}", headers=ALICE)).status_code == 200
        assert (await upload(api, content)).status_code == 200


# ------------------------------------------------------------------------------------------- disclosure


async def test_metrics_are_the_tenants_own_and_global_for_admins(api: AsyncTestClient[Any]) -> None:
    batch = await run_batch(api, [chat_line("a", max_tokens=4), chat_line("b", max_tokens=4)])
    assert batch["status"] == "completed"
    mine = (await api.get("/metrics", headers=ALICE)).text
    assert 'obatch_batches{status="completed"} 1.0' in mine and 'obatch_batch_lines{status="succeeded"} 2.0' in mine
    theirs = (await api.get("/metrics", headers=BOB)).text
    assert 'obatch_batches{status="completed"} 0.0' in theirs
    for text in (mine, theirs):
        assert "obatch_http_requests" not in text and "obatch_backend_request" not in text
    everything = (await api.get("/metrics", headers=bearer(ADMIN))).text
    assert "obatch_http_requests_total" in everything and 'obatch_batches{status="completed"} 1.0' in everything


async def test_every_response_reaches_the_access_log(api: AsyncTestClient[Any], caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    with caplog.at_level(logging.INFO, logger="obatch.server.access"):
        unknown = await api.get("/wp-admin/setup.php")
        wrong_method = await api.delete("/health")
        ok = await api.get("/v1/files", headers=ALICE)
    assert (unknown.status_code, wrong_method.status_code, ok.status_code) == (404, 405, 200)
    logged = [(r.path, r.status) for r in caplog.records if r.name == "obatch.server.access"]  # type: ignore[attr-defined]
    assert logged == [("/wp-admin/setup.php", 404), ("/health", 405), ("/v1/files", 200)]
    assert unknown.headers["x-request-id"].startswith("req_")


# ------------------------------------------------------------------------------- every door, one policy

ROUTE_BODIES = {  # the smallest valid body of each synchronous route
    CHAT: {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "llama3.2:1b", "prompt": "hi"},
    "/v1/responses": {"model": "llama3.2:1b", "input": "hi"},
    "/v1/embeddings": {"model": "nomic-embed-text", "input": "hi"},
}
EVERY_DOOR = REFUSED | {  # what no path to the engine may ask for
    "max_output_tokens 1e9": ({"max_output_tokens": 10**9}, "invalid_value"),
    "max_output_tokens -1": ({"max_output_tokens": -1}, "invalid_value"),
    "max_output_tokens 0": ({"max_output_tokens": 0}, "invalid_value"),
    "options.num_gpu+num_ctx+keep_alive": ({"max_tokens": -1, "keep_alive": "-1", "options": {
        "num_gpu": 99, "num_ctx": 10_000_000, "num_thread": 64}}, None),
}


@pytest.mark.parametrize("path", list(ROUTE_BODIES))
async def test_every_route_refuses_what_batch_lines_refuse(api: AsyncTestClient[Any], path: str) -> None:
    for name, (extra, code) in EVERY_DOOR.items():
        error = assert_openai_error(await api.post(path, json={**ROUTE_BODIES[path], **extra}, headers=ALICE), 400)
        assert code is None or error["code"] == code, (path, name, error)


async def test_a_pilot_runs_none_of_the_lines_a_batch_refuses(api: AsyncTestClient[Any], obatch_sim: OllamaSim
                                                              ) -> None:
    """A pilot (``/v1/benchmarks/estimate?pilot=N``) once sent every line's engine options as they were. (Without
    benchmark points the estimate itself then answers 404; the pilot has run by then.)"""
    lines = [chat_line("good", max_tokens=4)]
    lines += [chat_line(f"bad{i}", **extra) for i, (extra, _) in enumerate(EVERY_DOOR.values())]
    stored = await upload(api, jsonl(lines))
    before = obatch_sim.stats.served
    response = await api.get("/v1/benchmarks/estimate", headers=ALICE,
                             params={"input_file_id": stored.json()["id"], "pilot": str(len(lines))})
    assert response.status_code in (200, 404), response.text
    assert obatch_sim.stats.served - before == 1  # the good line only: no refused option reached the engine


@pytest.mark.usefixtures("db_url")
async def test_pilot_lines_belong_to_the_key_that_ran_them(api: AsyncTestClient[Any], obatch_sim: OllamaSim) -> None:
    """Two tenants upload the same bytes: Bob's pilot asks the engine again instead of reusing Alice's lines, his
    batch takes only his own, and Alice's batch still takes hers."""
    content = jsonl([chat_line(f"q{i}", f"question {i}", max_tokens=4) for i in range(12)])
    pilot, total = 4, 12

    async def run_pilot(headers: dict[str, str]) -> tuple[str, int]:
        stored = await upload(api, content, headers)
        before = obatch_sim.stats.answered["/api/chat"]
        response = await api.get("/v1/benchmarks/estimate", headers=headers,
                                 params={"input_file_id": stored.json()["id"], "pilot": str(pilot)})
        assert response.status_code in (200, 404), response.text  # 404: no benchmark points (the pilot ran)
        return stored.json()["id"], obatch_sim.stats.answered["/api/chat"] - before

    async def run_batch_of(file_id: str, headers: dict[str, str]) -> int:
        before = obatch_sim.stats.answered["/api/chat"]
        created = await api.post("/v1/batches", headers=headers, json={
            "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"})
        batch = await settled(api, created.json()["id"], headers=headers)
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == total
        return obatch_sim.stats.answered["/api/chat"] - before  # the lines (the slot count's go to /api/generate)

    alice_file, alice_sent = await run_pilot(ALICE)
    bob_file, bob_sent = await run_pilot(BOB)
    assert (alice_sent, bob_sent) == (pilot, pilot)  # Bob's pilot ran its lines: Alice's were not his to reuse
    assert await run_batch_of(bob_file, BOB) == total - pilot  # his own pilot lines, not hers
    assert await run_batch_of(alice_file, ALICE) == total - pilot  # hers are still there for her


# --------------------------------------------------------------------------------- typed request bodies

MALFORMED = {  # body fields of the wrong shape → the field named in a 400, never a 500 or an exception's text
    "messages of numbers": ({"messages": [1, 2]}, "messages[0]"),
    "stop a number": ({"stop": 5}, "stop"),
    "tool call without a function": ({"messages": [{"role": "assistant", "tool_calls": [{"x": 1}]}]},
                                     "messages[0].tool_calls[0].function"),
    "tool call with a null function": ({"messages": [{"role": "assistant", "tool_calls": [{"function": None}]}]},
                                       "messages[0].tool_calls[0].function"),
    "seed past 64 bits": ({"seed": 10**30}, "seed"),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    "n a string": ({"n": "2"}, "n"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_chat_bodies_are_400_naming_the_field(api: AsyncTestClient[Any], name: str) -> None:
    extra, field = MALFORMED[name]
    response = await api.post(CHAT, json={**ROUTE_BODIES[CHAT], "max_tokens": 4, **extra}, headers=ALICE)
    error = assert_openai_error(response, 400)
    assert error["param"] == field, error
    assert "Error" not in error["message"] and "object is not" not in error["message"], error


async def test_malformed_batch_lines_fail_validation_naming_the_field(api: AsyncTestClient[Any]) -> None:
    lines = [chat_line("ok", max_tokens=4)]
    for i, (extra, _) in enumerate(MALFORMED.values()):
        line = chat_line(f"bad{i}", max_tokens=4)
        line["body"].update(extra)
        lines.append(line)
    batch = await run_batch(api, "".join(json.dumps(line) + "\n" for line in lines).encode())  # 10**30: not orjson
    assert batch["status"] == "failed"
    found = {e["line"]: e["param"] for e in batch["errors"]["data"]}
    assert found == {i + 2: f"body.{field}" for i, (_, field) in enumerate(MALFORMED.values())}


async def test_what_clients_send_still_passes(api: AsyncTestClient[Any]) -> None:
    body = {**ROUTE_BODIES[CHAT], "max_tokens": 4, "stop": ["\n", "END"], "seed": 2**63 - 1, "temperature": 0,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "42"},
                         {"role": "user", "content": "and?"}]}
    assert (await api.post(CHAT, json=body, headers=ALICE)).status_code == 200
    for path in ("/v1/completions", "/v1/embeddings"):
        assert (await api.post(path, json={**ROUTE_BODIES[path], "max_tokens": 4} if path != "/v1/embeddings"
                               else ROUTE_BODIES[path], headers=ALICE)).status_code == 200


@pytest.mark.parametrize("path", [CHAT, "/v1/batches", "/v1/embeddings"])
async def test_the_depth_limit_holds_whatever_the_content_type_says(api: AsyncTestClient[Any], path: str) -> None:
    """A deep JSON body sent as multipart/… was decoded as JSON without the depth check: a RecursionError, 500."""
    body = b"[" * 100_000 + b"]" * 100_000
    for content_type in ("multipart/form-data; boundary=x", "text/plain", "application/x-www-form-urlencoded"):
        response = await api.post(path, content=body, headers={**ALICE, "content-type": content_type})
        assert assert_openai_error(response, 400)["code"] == "json_too_deep", content_type


# ------------------------------------------------------------------------------------------------ sweeps

SWEEP = {"models": ["llama3.2:1b"], "concurrency": [1], "requests": 4, "workload": "tiny"}


async def test_sweeps_take_an_admin_key_unless_tenants_may(server: Callable[..., AsyncTestClient[Any]]) -> None:
    async with server() as api:
        refused = await api.post("/v1/benchmarks/sweeps", json=SWEEP, headers=ALICE)
        assert assert_openai_error(refused, 403)["code"] == "permission_denied"
        started = await api.post("/v1/benchmarks/sweeps", json=SWEEP, headers=bearer(ADMIN))
        assert started.status_code == 200, started.text
        await api.post(f"/v1/benchmarks/sweeps/{started.json()['id']}/cancel", headers=bearer(ADMIN))


async def test_tenant_sweeps_have_a_size_limit_and_a_daily_budget(server: Callable[..., AsyncTestClient[Any]]
                                                                  ) -> None:
    async with server(tenant_sweeps=True, max_sweep_requests=64, sweep_requests_per_day=100) as api:
        big = {**SWEEP, "concurrency": [1, 2, 4, 8], "requests": 32}  # 4 points × 32 = 128 requests
        too_large = await api.post("/v1/benchmarks/sweeps", json=big, headers=ALICE)
        assert assert_openai_error(too_large, 400)["code"] == "sweep_too_large"
        ids = []
        for _ in range(2):  # 2 × 48 requests: within 100
            made = await api.post("/v1/benchmarks/sweeps", json={**SWEEP, "requests": 48}, headers=ALICE)
            assert made.status_code == 200, made.text
            ids.append(made.json()["id"])
        spent = await api.post("/v1/benchmarks/sweeps", json={**SWEEP, "requests": 8}, headers=ALICE)  # 104
        assert assert_openai_error(spent, 429)["code"] == "sweep_budget_exceeded"
        assert (await api.post("/v1/benchmarks/sweeps", json=SWEEP, headers=BOB)).status_code == 200  # its own
        assert (await api.post("/v1/benchmarks/sweeps", json=big, headers=bearer(ADMIN))).status_code == 200
        for sweep in (await api.get("/v1/benchmarks/sweeps", headers=bearer(ADMIN))).json()["data"]:
            await api.post(f"/v1/benchmarks/sweeps/{sweep['id']}/cancel", headers=bearer(ADMIN))


# ------------------------------------------------------------------------------------ what others see


async def test_health_says_up_or_down_without_a_key_and_hosts_only_to_admins(api: AsyncTestClient[Any]) -> None:
    anonymous = (await api.get("/health")).json()
    assert anonymous["status"] == "ok" and anonymous["backend"]["reachable"] is True
    assert not anonymous["backend"]["urls"] and not anonymous["backend"]["hosts"]
    assert anonymous["backend"]["version"] is None
    tenant = (await api.get("/health", headers=ALICE)).json()["backend"]
    assert tenant["version"] and not tenant["urls"] and not tenant["hosts"]
    admin = (await api.get("/health", headers=bearer(ADMIN))).json()["backend"]
    assert admin["version"] and admin["urls"] and admin["hosts"]
    assert_openai_error(await api.get("/health", headers=bearer("sk-wrong")), 401)  # a key sent is checked


async def test_sweep_names_stay_with_their_key(server: Callable[..., AsyncTestClient[Any]]) -> None:
    async with server(tenant_sweeps=True) as api:
        made = await api.post("/v1/benchmarks/sweeps", headers=BOB,
                              json={**SWEEP, "requests": 2, "name": "bob's private sweep"})
        assert made.status_code == 200, made.text
        for _ in range(600):
            sweep = (await api.get(f"/v1/benchmarks/sweeps/{made.json()['id']}", headers=BOB)).json()
            if sweep["run_id"] and sweep["status"] not in ("queued", "in_progress"):
                break
            await asyncio.sleep(0.05)
        named = {r["id"]: r["name"] for r in (await api.get("/v1/benchmarks/runs", headers=BOB)).json()["data"]}
        assert named[sweep["run_id"]] == "bob's private sweep"
        admin = {r["id"]: r["name"] for r in (await api.get("/v1/benchmarks/runs", headers=bearer(ADMIN))).json()[
            "data"]}
        assert admin[sweep["run_id"]] == "bob's private sweep"
        others = (await api.get("/v1/benchmarks/runs", headers=ALICE)).json()["data"]
        assert sweep["run_id"] in {r["id"] for r in others} and "bob's private" not in str(others)
        for fmt in ("csv", "json"):
            exported = await api.get("/v1/benchmarks/export", params={"format": fmt}, headers=ALICE)
            assert exported.status_code == 200 and "bob's private" not in exported.text


# ---------------------------------------------------------------------------------------------- audit log


async def test_the_audit_log_says_who_changed_what_and_never_the_key(
        server: Callable[..., AsyncTestClient[Any]], make_settings: Callable[..., Settings]) -> None:
    audit = make_settings().data_dir / "audit.log"
    async with server(audit_log_max_bytes=1024, audit_log_backups=20) as api:
        stored = (await upload(api, jsonl([chat_line("a", max_tokens=200)]))).json()["id"]
        batch = (await api.post("/v1/batches", headers=ALICE, json={
            "input_file_id": stored, "endpoint": CHAT, "completion_window": "24h"})).json()["id"]
        assert (await api.post(f"/v1/batches/{batch}/cancel", headers=ALICE)).status_code == 200
        assert (await api.post(f"/v1/batches/{batch}/cancel", headers=BOB)).status_code == 404
        assert (await api.delete(f"/v1/files/{stored}", headers=ALICE)).status_code == 200
        assert (await api.delete(f"/v1/files/{stored}", headers=bearer("sk-wrong"))).status_code == 401
        assert (await api.post(CHAT, json={**ROUTE_BODIES[CHAT], "max_tokens": 4}, headers=ALICE)).status_code == 200
        for _ in range(20):  # past 1 kB: rotated
            await api.delete("/v1/files/file-none", headers=ALICE)
    rotated = sorted(audit.parent.glob("audit.log*"), key=lambda p: int(p.suffix[1:] if p.suffix != ".log" else 0))
    text = "".join(p.read_text() for p in reversed(rotated))  # oldest first
    lines = [orjson.loads(line) for line in text.splitlines()]
    alice, bob = auth.owner_of(KEYS["alice"]), auth.owner_of(KEYS["bob"])
    assert [(e["key"], e["action"], e["object"], e["status"]) for e in lines[:6]] == [
        (alice, "file.create", stored, 200), (alice, "batch.create", batch, 200), (alice, "batch.cancel", batch, 200),
        (bob, "batch.cancel", batch, 404), (alice, "file.delete", stored, 200), (None, "file.delete", stored, 401)]
    assert all(e["request_id"].startswith("req_") and e["address"] for e in lines)
    assert len(lines) == 26 and (audit.parent / "audit.log.1").exists()  # the chat request is not audited
    for key in (*KEYS.values(), ADMIN):
        assert key not in text
