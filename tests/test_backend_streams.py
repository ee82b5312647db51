"""The backends' side of what clients send: text-completion streams in one shape from every engine, prompt lists
and token ids passed through to OpenAI-compatible engines, Responses events built from a chat stream (thinking,
text, tool calls sent in pieces), each event checked with the ``openai`` package's own types; and the same through
``obatch serve`` on the embedded engine with the SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import OpenAI
from openai.types import Completion
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from obatch.backends.base import chat_chunk
from obatch.backends.local import LocalBackend
from obatch.backends.ollama import OllamaBackend
from obatch.backends.openai import OpenAIBackend
from obatch.backends.pool import Pool
from obatch.backends.responses import stream_from_chat, to_chat
from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import Scripted
from tests.serverkit import ServerProcess, server_env
from tests.test_contract_engine import MODEL, model_file  # noqa: F401  (the engine model file, or a skip)

STREAM_EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


async def test_openai_backend_streams_completions_in_the_common_shape() -> None:
    """llama.cpp starts a stream with ``data: null`` and puts usage on the last choice chunk: the backend sends the
    chunks without it and the usage in a ``choices: []`` chunk of its own, as OpenAI and vLLM do."""
    sent: list[Any] = []
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}

    def answer(path: str, body: Any) -> tuple[int, Any]:
        sent.append((path, body))
        if body.get("stream"):
            return 200, sse(b"null", {**base, "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
                            {**base, "choices": [{"index": 0, "text": "lo", "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}, b"[DONE]")
        if path.endswith("/embeddings"):
            return 200, {"object": "list", "model": "m", "data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}}
        return 200, {**base, "choices": [{"index": i, "text": "x", "finish_reason": "stop", "logprobs": None}
                                         for i in range(2)],
                     "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}

    async with Scripted(answer) as url:
        engine = OpenAIBackend(f"{url}/v1")
        chunks = [c async for c in engine.stream_completion({"model": "m", "prompt": "Hi", "max_tokens": 2})]
        listed = await engine.complete("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 1})
        await engine.complete("/v1/embeddings", {"model": "m", "input": [[15339, 1917], [28, 29]]})
        await engine.aclose()
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["Hel", "lo"] and "usage" not in chunks[1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4
    assert sent[0][1]["stream"] is True and sent[0][1]["stream_options"] == {"include_usage": True}
    # prompt lists and token ids go to the engine as they came (it reads them itself)
    assert sent[1] == ("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 1, "stream": False})
    assert sent[2] == ("/v1/embeddings", {"model": "m", "input": [[15339, 1917], [28, 29]]})
    assert [c.index for c in Completion.model_validate(listed.body).choices] == [0, 1]


async def chat_stream(*deltas: dict[str, Any], finish: str = "stop") -> AsyncIterator[dict[str, Any]]:
    for delta in deltas:
        yield chat_chunk("c", "m", 1, delta)
    yield chat_chunk("c", "m", 1, {}, finish, usage={"prompt_tokens": 3, "completion_tokens": len(deltas),
                                                    "total_tokens": 3 + len(deltas)})


async def test_responses_events_from_thinking_text_and_calls_in_pieces() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    chunks = chat_stream({"role": "assistant", "reasoning_content": "Let"}, {"reasoning_content": " me"},
                         {"content": "Sure"}, {"tool_calls": [call]},
                         {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                         {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, finish="tool_calls")
    events = [STREAM_EVENT.validate_python(e) async for e in stream_from_chat(chunks, {"model": "m", "input": "?"})]
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    added = [e.output_index for e in events if e.type == "response.output_item.added"]  # type: ignore[union-attr]
    assert added == [0, 1, 2]
    call_item = final.output[2]
    assert call_item.type == "function_call" and call_item.call_id == "call_1"
    assert orjson.loads(call_item.arguments) == {"city": "Paris"}
    assert final.output_text == "Sure" and final.usage is not None and final.usage.output_tokens == 6


async def test_an_empty_answer_is_still_a_message() -> None:
    events = [STREAM_EVENT.validate_python(e) async for e in stream_from_chat(chat_stream(), {"model": "m"})]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == "completed" and [i.type for i in final.output] == ["message"] and final.output_text == ""
    assert "response.output_text.done" in [e.type for e in events]


@pytest.mark.engine
async def test_embedded_engine_prompt_lists_tokens_and_streams(model_file: Path) -> None:  # noqa: F811
    """llama.cpp reads token ids itself; a list of prompts runs one by one (its own answer to a list counts one
    prompt's usage), in one choice each and the usage of all; streams end with one usage chunk."""
    local = LocalBackend(model_file, alias=MODEL, threads=1)
    try:
        await local.prepare(MODEL, num_ctx=1024, parallel=2)
        one = {"model": MODEL, "max_tokens": 3, "temperature": 0}
        singles = [(await local.complete("/v1/completions", {**one, "prompt": p})).body
                   for p in ("Hello", [15339, 1917])]
        listed = Completion.model_validate((await local.complete(
            "/v1/completions", {**one, "prompt": ["Hello", [15339, 1917]]})).body)
        assert [c.index for c in listed.choices] == [0, 1]
        assert [c.text for c in listed.choices] == [s["choices"][0]["text"] for s in singles]
        assert listed.usage is not None and listed.usage.completion_tokens == 6
        assert listed.usage.prompt_tokens == sum(s["usage"]["prompt_tokens"] for s in singles)

        vectors = (await local.complete("/v1/embeddings", {"model": MODEL, "input": [[15339, 1917], [28, 29]]})).body
        assert len(vectors["data"]) == 2 and vectors["usage"]["prompt_tokens"] == 4

        chunks = [c async for c in local.stream_completion({**one, "prompt": ["Hello", "World"]})]
        assert all(c["choices"] for c in chunks[:-1]) and chunks[-1]["choices"] == []
        assert {c["choices"][0]["index"] for c in chunks[:-1]} == {0, 1}
        assert chunks[-1]["usage"]["completion_tokens"] == 6

        body = {"model": MODEL, "input": "Name a colour.", "max_output_tokens": 4}
        events = [STREAM_EVENT.validate_python(e)
                  async for e in stream_from_chat(local.stream_chat(to_chat(body)), body)]
        assert events[-1].type == "response.incomplete"
        assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens == 4
    finally:
        await local.aclose()


async def test_a_pool_streams_completions_on_a_leased_slot(sim: OllamaSim) -> None:
    """Through a pool of two hosts: the stream holds one slot while it runs and gives it back when the reader
    stops early."""
    pool = Pool([OllamaBackend(sim.url), OllamaBackend(sim.url)], concurrency=1)
    try:
        body = {"model": "llama3.2:1b", "prompt": ["One", "Two"], "max_tokens": 3}
        chunks = [c async for c in pool.stream_completion(body)]
        assert {c["choices"][0]["index"] for c in chunks[:-1]} == {0, 1}
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        stream = pool.stream_completion({**body, "max_tokens": 50})
        await anext(stream)
        assert sum(h.inflight for h in pool.hosts) == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert sum(h.inflight for h in pool.hosts) == 0
    finally:
        await pool.aclose()


@pytest.mark.engine
def test_the_sdk_on_the_embedded_engine(model_file: Path, obatch_sim: OllamaSim,  # noqa: F811
                                       tmp_path: Path) -> None:
    """The four through ``obatch serve`` on the embedded engine, with the SDK: a streamed response, a streamed
    prompt list, token ids as a prompt and as embeddings input."""
    env = server_env(tmp_path / "data", obatch_sim.url, backend="local", local_model_alias=MODEL, local_threads=1,
                     concurrency=2)
    server = ServerProcess.start(tmp_path / "data", env)
    try:
        with OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120) as client:
            events = list(client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=4,
                                                  stream=True))
            assert [e.sequence_number for e in events] == list(range(len(events)))
            assert events[0].type == "response.created" and events[-1].type in ("response.completed",
                                                                               "response.incomplete")
            final = events[-1].response  # type: ignore[union-attr]
            assert final.output_text and final.usage is not None and 0 < final.usage.output_tokens <= 4
            chunks = list(client.completions.create(model=MODEL, prompt=["Hello", "World"], max_tokens=3,
                                                    stream=True, stream_options={"include_usage": True}))
            assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
            tokens = client.completions.create(model=MODEL, prompt=[[15339, 1917], [28, 29]], max_tokens=2)
            assert [c.index for c in tokens.choices] == [0, 1] and tokens.usage and tokens.usage.prompt_tokens == 4
            vectors = client.embeddings.create(model=MODEL, input=[15339, 1917])
            assert len(vectors.data) == 1 and vectors.usage.prompt_tokens == 2
    finally:
        server.stop()
