"""The newest ``openai`` package, unchanged, against ``obatch serve`` (Ollama simulator behind it): Responses
(synchronous and as a batch), refused endpoints, file expiry, file listing, reasoning tokens per line and per batch."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from obatch.protocol import UNSERVABLE_ENDPOINTS
from tests.helpers import jsonl
from tests.serverkit import CHAT, FINAL, KEYS, ServerProcess, chat_line, parse_jsonl

THINKER = "qwen3:0.6b"


@pytest.fixture
def bob(obatch_server: ServerProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=obatch_server.v1, api_key=KEYS["bob"], max_retries=0, timeout=30) as client:
        yield client


def upload(client: OpenAI, lines: list[dict[str, object]], **extra: object) -> str:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch", **extra).id  # type: ignore[arg-type]


def finished(client: OpenAI, batch_id: str, timeout: float = 30.0) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in FINAL and time.monotonic() < deadline:
        time.sleep(0.1)
    return batch


def response_line(custom_id: str, **body: object) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses",
            "body": {"model": CHAT, "input": f"Say {custom_id}.", **body}}


def test_responses_create_through_obatch(bob: OpenAI) -> None:
    cut = bob.responses.create(model=CHAT, input="Tell me about rivers.", max_output_tokens=5)
    assert isinstance(cut, Response) and Response.model_validate(cut.model_dump()) == cut
    assert cut.status == "incomplete" and cut.incomplete_details and \
        cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text and cut.usage and cut.usage.output_tokens == 5
    full = bob.responses.create(model=THINKER, instructions="Be brief.", input=[{"role": "user", "content": "Why?"}],
                                reasoning={"effort": "medium"})
    assert full.status == "completed" and full.output_text and full.output[0].type == "reasoning"
    assert full.usage and 0 < full.usage.output_tokens_details.reasoning_tokens < full.usage.output_tokens
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="no-such-model", input="hi")


def test_responses_batch_end_to_end_with_reasoning_tokens(bob: OpenAI) -> None:
    lines = [response_line(f"r{i}", max_output_tokens=6) for i in range(4)] + [
        response_line(f"t{i}", model=THINKER, reasoning={"effort": "low"}) for i in range(3)]
    batch = bob.batches.create(input_file_id=upload(bob, lines), endpoint="/v1/responses", completion_window="24h")
    done = finished(bob, batch.id)
    assert done.status == "completed" and done.request_counts and done.request_counts.completed == 7, done
    output = parse_jsonl(bob.files.content(done.output_file_id or "").text)
    bodies = {line["custom_id"]: Response.model_validate(line["response"]["body"]) for line in output}
    assert {line["obatch"]["loaded_context"] for line in output} == {2048}  # /api/ps, once per model group
    assert sorted(bodies) == sorted(str(line["custom_id"]) for line in lines)
    assert all(bodies[f"r{i}"].status == "incomplete" and bodies[f"r{i}"].output_text for i in range(4))
    assert all(bodies[f"t{i}"].status == "completed" and bodies[f"t{i}"].output[0].type == "reasoning"
               for i in range(3))
    usages = [b.usage for b in bodies.values() if b.usage]
    assert done.usage is not None and len(usages) == 7
    assert done.usage.input_tokens == sum(u.input_tokens for u in usages)
    assert done.usage.output_tokens == sum(u.output_tokens for u in usages)
    reasoning = sum(u.output_tokens_details.reasoning_tokens for u in usages)
    assert reasoning > 0 and done.usage.output_tokens_details.reasoning_tokens == reasoning


def test_chat_batch_reasoning_tokens_per_line_and_on_the_batch(bob: OpenAI) -> None:
    lines = [chat_line(f"c{i}", model=THINKER, max_tokens=64) for i in range(3)]
    for line in lines:
        line["body"]["reasoning_effort"] = "high"  # type: ignore[index]
    batch = bob.batches.create(input_file_id=upload(bob, lines), endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = finished(bob, batch.id)
    output = parse_jsonl(bob.files.content(done.output_file_id or "").text)
    replies = [ChatCompletion.model_validate(line["response"]["body"]) for line in output]
    per_line = [r.usage.completion_tokens_details.reasoning_tokens for r in replies  # type: ignore[union-attr]
                if r.usage and r.usage.completion_tokens_details]
    assert len(per_line) == 3 and all(n and n > 0 for n in per_line)
    assert all((r.choices[0].message.model_extra or {}).get("reasoning_content") for r in replies)
    assert done.usage is not None and done.usage.output_tokens_details.reasoning_tokens == sum(per_line)  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", UNSERVABLE_ENDPOINTS)
def test_batch_creation_refuses_endpoints_local_models_cannot_serve(bob: OpenAI, endpoint: str) -> None:
    file_id = upload(bob, [chat_line("x")])
    with pytest.raises(openai.BadRequestError) as caught:
        bob.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "unsupported_endpoint" and error["param"] == "endpoint"
    assert endpoint in error["message"] and "/v1/responses" in error["message"]


def test_files_and_batch_outputs_expire_on_time(bob: OpenAI, obatch_server: ServerProcess) -> None:
    source = bob.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("e1")]))), purpose="batch",
                              expires_after={"anchor": "created_at", "seconds": 3})
    assert source.expires_at == source.created_at + 3
    kept = upload(bob, [chat_line("e2"), chat_line("bad", model="no-such-model")])
    batch = bob.batches.create(input_file_id=kept, endpoint="/v1/chat/completions", completion_window="24h",
                               output_expires_after={"anchor": "created_at", "seconds": 2})
    done = finished(bob, batch.id)
    assert done.output_file_id and done.error_file_id
    outputs = [bob.files.retrieve(done.output_file_id), bob.files.retrieve(done.error_file_id)]
    assert all(f.expires_at == f.created_at + 2 for f in outputs)
    assert bob.files.retrieve(kept).expires_at is None  # nothing expires unless asked
    stored = obatch_server.data_dir / "files"
    assert all((stored / f"{f.id}.jsonl").exists() for f in [source, *outputs])

    time.sleep(4.5)  # the latest expiry plus more than one sweep interval (0.5 s)
    for gone in (source.id, done.output_file_id, done.error_file_id):
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(gone)
        with pytest.raises(openai.NotFoundError):
            bob.files.content(gone)
        assert not (stored / f"{gone}.jsonl").exists()  # the bytes too, not only the row
    assert not {source.id, done.output_file_id, done.error_file_id} & {f.id for f in bob.files.list()}
    assert bob.files.retrieve(kept).id == kept
    assert bob.batches.retrieve(batch.id).status == "completed"


@pytest.mark.parametrize("policy", [{"anchor": "last_accessed_at", "seconds": 10}, {"anchor": "created_at",
                                                                                      "seconds": 0}])
def test_bad_expiry_policies_are_refused(bob: OpenAI, policy: dict[str, object]) -> None:
    with pytest.raises(openai.BadRequestError, match="expires_after"):
        bob.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("x")]))), purpose="batch",
                         expires_after=policy)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="output_expires_after"):
        bob.batches.create(input_file_id=upload(bob, [chat_line("y")]), endpoint="/v1/chat/completions",
                           completion_window="24h", output_expires_after=policy)  # type: ignore[arg-type]


def test_files_list_by_purpose_oldest_first_in_pages(obatch_server: ServerProcess) -> None:
    with OpenAI(base_url=obatch_server.v1, api_key=KEYS["dave"], max_retries=0, timeout=30) as dave:
        mine = [upload(dave, [chat_line(f"f{i}")]) for i in range(5)]
        other = dave.files.create(file=("notes.jsonl", io.BytesIO(b"{}\n")), purpose="user_data").id
        first = dave.files.list(purpose="batch", order="asc", limit=2)
        assert len(first.data) == 2 and first.has_more
        listed = list(dave.files.list(purpose="batch", order="asc", limit=2))  # the SDK follows `after`
        assert all(f.purpose == "batch" for f in listed) and other not in {f.id for f in listed}
        assert set(mine) <= {f.id for f in listed}
        assert [(f.created_at, f.id) for f in listed] == sorted((f.created_at, f.id) for f in listed)
        assert [f.id for f in listed[:2]] == [f.id for f in first.data]
        newest = dave.files.list(order="desc", limit=10_000)
        assert other in {f.id for f in newest.data} and not newest.has_more
        assert [(f.created_at, f.id) for f in newest.data] == sorted(((f.created_at, f.id) for f in newest.data),
                                                                      reverse=True)
        with pytest.raises(openai.BadRequestError):
            dave.files.list(limit=10_001)
