"""The official OpenAI SDK (sync and async) against a real ``obatch serve`` with the Ollama simulator behind it:
upload, create, poll, download, list with pagination, cancel mid-run, expiry, delete, pass-through, metrics."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types import Batch

from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import jsonl
from tests.serverkit import (
    ADMIN_KEY,
    CHAT,
    EMBED,
    FINAL,
    KEYS,
    ServerProcess,
    assert_exactly_once,
    chat_line,
    embed_line,
    parse_jsonl,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest) -> ServerProcess:
    """Every test here runs against the server on SQLite and against the one on PostgreSQL."""
    name = "obatch_server" if request.param == "sqlite" else "obatch_server_pg"
    served: ServerProcess = request.getfixturevalue(name)
    return served


@pytest.fixture
def alice(server: ServerProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key=KEYS["alice"], max_retries=0, timeout=30) as client:
        yield client


def upload(client: OpenAI, lines: list[dict[str, object]], name: str = "input.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch").id


def wait(client: OpenAI, batch_id: str, until: tuple[str, ...] = FINAL, timeout: float = 30.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(0.1)


def results(client: OpenAI, batch: Batch) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    output = parse_jsonl(client.files.content(batch.output_file_id).text) if batch.output_file_id else []
    errors = parse_jsonl(client.files.content(batch.error_file_id).text) if batch.error_file_id else []
    return output, errors


def test_sync_sdk_batch_round_trip(alice: OpenAI) -> None:
    lines = [chat_line(f"ok-{i}") for i in range(24)] + [chat_line(f"bad-{i}", model="no-such-model") for i in range(3)]
    file_id = upload(alice, lines)
    created = alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                   metadata={"project": "round-trip"})
    assert created.status == "validating" and created.metadata == {"project": "round-trip"}

    done = wait(alice, created.id)

    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (27, 24, 3)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.usage is not None and done.usage.output_tokens == 24 * 4 and done.usage.input_tokens > 0
    assert done.metadata == {"project": "round-trip"}
    output, errors = results(alice, done)
    assert_exactly_once([str(line["custom_id"]) for line in lines], output, errors)
    assert {e["custom_id"] for e in errors} == {"bad-0", "bad-1", "bad-2"}
    assert all(e["error"]["code"] == "model_not_found" for e in errors)  # type: ignore[index]
    out_file = alice.files.retrieve(done.output_file_id or "")
    assert out_file.purpose == "batch_output" and out_file.bytes > 0


async def test_async_sdk_embeddings_batch_and_delete(server: ServerProcess) -> None:
    async with AsyncOpenAI(base_url=server.v1, api_key=KEYS["alice"], max_retries=0) as client:
        uploaded = await client.files.create(file=("emb.jsonl", jsonl(embed_line(f"e{i}") for i in range(6))),
                                             purpose="batch")
        assert uploaded.filename == "emb.jsonl" and uploaded.purpose == "batch"
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                            completion_window="1h", extra_body={"concurrency": 1})
        for _ in range(300):
            batch = await client.batches.retrieve(batch.id)
            if batch.status in FINAL:
                break
            await asyncio.sleep(0.1)
        assert batch.status == "completed" and batch.error_file_id is None and batch.output_file_id
        content = await client.files.content(batch.output_file_id)
        output = parse_jsonl(content.text)
        assert sorted(line["custom_id"] for line in output) == [f"e{i}" for i in range(6)]
        assert output[0]["response"]["body"]["data"][0]["object"] == "embedding"

        listed = [f.id async for f in client.files.list(purpose="batch")]
        assert uploaded.id in listed
        deleted = await client.files.delete(uploaded.id)
        assert deleted.deleted and deleted.id == uploaded.id
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.content(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.delete(uploaded.id)
        # The batch keeps its results after its input file is gone.
        assert (await client.batches.retrieve(batch.id)).status == "completed"


def test_list_pagination_newest_first(server: ServerProcess) -> None:
    """Other tests may have stored carol's batches and files before: the newest five are this test's, in order."""
    with OpenAI(base_url=server.v1, api_key=KEYS["carol"], max_retries=0) as carol:
        older = [b.id for b in carol.batches.list(limit=100)]
        older_files = {f.id for f in carol.files.list(limit=100, purpose="batch")}
        file_ids = [upload(carol, [chat_line(f"p{i}")], name=f"p{i}.jsonl") for i in range(5)]
        created = [carol.batches.create(input_file_id=f, endpoint="/v1/chat/completions",
                                        completion_window="24h").id for f in file_ids]
        expected = created[::-1] + older

        first = carol.batches.list(limit=2)
        assert [b.id for b in first.data] == expected[:2] and first.has_more
        second = carol.batches.list(limit=2, after=first.data[-1].id)
        assert [b.id for b in second.data] == expected[2:4] and second.has_more
        last = carol.batches.list(limit=2, after=second.data[-1].id)
        assert [b.id for b in last.data] == expected[4:6] and last.has_more == (len(expected) > 6)
        assert [b.id for b in carol.batches.list(limit=2)] == expected  # the SDK's auto-pagination

        pages = carol.files.list(limit=2, purpose="batch")
        assert len(pages.data) == 2 and pages.has_more
        listed = [f.id for f in carol.files.list(limit=2, purpose="batch")]
        assert len(listed) == len(set(listed)) and set(listed) == older_files | set(file_ids)
        for batch_id in created:
            assert wait(carol, batch_id).status == "completed"


def test_cancel_mid_run_keeps_finished_lines(alice: OpenAI, obatch_sim: OllamaSim) -> None:
    lines = [chat_line(f"slow-{i}", max_tokens=240) for i in range(16)]  # 1.2 s each, 4 at a time
    batch = alice.batches.create(input_file_id=upload(alice, lines), endpoint="/v1/chat/completions",
                                 completion_window="24h")
    running = batch
    deadline = time.monotonic() + 20
    while running.request_counts is None or running.request_counts.completed < 4:
        assert time.monotonic() < deadline, running
        time.sleep(0.1)
        running = alice.batches.retrieve(batch.id)

    cancelling = alice.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    started = time.monotonic()
    done = wait(alice, batch.id, timeout=10)
    assert done.status == "cancelled" and time.monotonic() - started < 3, done
    served = obatch_sim.stats.requests["/api/chat"]
    time.sleep(0.5)
    assert obatch_sim.stats.requests["/api/chat"] == served  # the work stopped

    output, errors = results(alice, done)
    assert_exactly_once([str(line["custom_id"]) for line in lines], output, errors)
    assert len(output) >= 4 and len(errors) >= 4
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}  # type: ignore[index]
    # OpenAI counts the unrun lines as failed; obatch's own field tells them apart (the UI shows them cancelled)
    assert done.request_counts is not None and done.request_counts.failed == len(errors)
    assert done.to_dict()["obatch"]["not_run"] == len(errors)
    assert alice.batches.list(limit=5).data[0].to_dict()["obatch"]["not_run"] == len(errors)
    with pytest.raises(openai.ConflictError):
        alice.batches.cancel(wait(alice, created_and_completed(alice)).id)


def created_and_completed(client: OpenAI) -> str:
    return client.batches.create(input_file_id=upload(client, [chat_line("quick")]),
                                 endpoint="/v1/chat/completions", completion_window="24h").id


def test_expiry_with_a_short_window(alice: OpenAI) -> None:
    lines = [chat_line(f"late-{i}", max_tokens=200) for i in range(12)]  # 1 s each, 4 at a time: 3 s of work
    batch = alice.batches.create(input_file_id=upload(alice, lines), endpoint="/v1/chat/completions",
                                 completion_window="2s")
    done = wait(alice, batch.id, timeout=15)
    assert done.status == "expired" and done.expired_at, done
    output, errors = results(alice, done)
    assert_exactly_once([str(line["custom_id"]) for line in lines], output, errors)
    assert errors and all(e["error"]["code"] == "batch_expired" for e in errors)  # type: ignore[index]
    assert done.request_counts is not None and done.request_counts.failed == len(errors)
    assert done.to_dict()["obatch"]["not_run"] == len(errors)


def test_batches_share_the_engine_fairly(alice: OpenAI) -> None:
    ids = [alice.batches.create(input_file_id=upload(alice, [chat_line(f"{tag}-{i}", max_tokens=20)
                                                             for i in range(16)]),
                                endpoint="/v1/chat/completions", completion_window="24h").id for tag in "ab"]
    while True:
        a, b = (alice.batches.retrieve(i) for i in ids)
        if a.status in FINAL or b.status in FINAL:
            break
        time.sleep(0.05)
    other = b if a.status in FINAL else a
    assert other.request_counts is not None and other.request_counts.completed >= 6, other  # not starved
    assert all(wait(alice, i).status == "completed" for i in ids)


def test_pass_through_chat_stream_embeddings_models(alice: OpenAI) -> None:
    reply = alice.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens == 5
    with alice.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       stream=True) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason == "length"
    vectors = alice.embeddings.create(model=EMBED, input=["one", "two"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 32
    models = [m.id for m in alice.models.list()]
    assert CHAT in models and any(m.startswith(EMBED) for m in models)
    assert alice.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}],
                                      stream=True)


async def test_async_chat_stream(server: ServerProcess) -> None:
    """The stream as the wire carries it: ``data:`` events holding one completion's chunks, the role first, no
    finish_reason until the last choice (``length`` at max_tokens), usage on the last chunk, then ``[DONE]``."""
    request = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
               "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=server.v1, timeout=30,
                                 headers={"Authorization": f"Bearer {KEYS['alice']}"}) as http, \
            http.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = [event for event in raw.split("\n\n") if event.strip()]
    assert all(event.startswith("data: ") for event in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert len(chunks) >= 2
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["delta"].get("role") == "assistant"
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert "".join(c["delta"].get("content") or "" for c in choices)
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    async with AsyncOpenAI(base_url=server.v1, api_key=KEYS["alice"], max_retries=0) as client:
        stream = await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=4, stream=True,
                                                      stream_options={"include_usage": True})
        parsed = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    assert parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == 4


def test_health_and_metrics(server: ServerProcess, alice: OpenAI) -> None:
    # a batch of its own, so the series below exist whichever tests ran before (a histogram shows once observed)
    assert wait(alice, created_and_completed(alice)).status == "completed"
    with httpx.Client(base_url=server.url, timeout=10) as http:
        health = http.get("/health")
        assert health.status_code == 200
        assert health.json()["db"] == "ok" and health.json()["backend"]["reachable"] is True
        assert http.get("/metrics").status_code == 401
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        for name in ("obatch_http_requests_total", "obatch_batch_lines{status=\"succeeded\"}", "obatch_queue_depth",
                     "obatch_backend_request_duration_seconds_bucket", "obatch_batches{status=\"completed\"}"):
            assert name in text, name
        assert http.get("/schema/openapi.json").json()["info"]["title"] == "obatch"
        assert health.headers["x-request-id"].startswith("req_")
        echoed = http.get("/health", headers={"X-Request-ID": "trace-42"})
        assert echoed.headers["x-request-id"] == "trace-42"
