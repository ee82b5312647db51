"""The 2026 OpenAI contract on the backends: Responses mapped onto chat, reasoning, structured outputs, logprobs,
the context Ollama really loaded — each checked by parsing with the ``openai`` package's own types."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from obatch import errors
from obatch.api import run_batch_file
from obatch.backends.base import complete_by_streaming
from obatch.backends.ollama import OllamaBackend, chat_payload
from obatch.backends.openai import OpenAIBackend
from obatch.backends.responses import to_chat
from obatch.config import Settings
from obatch.jsonl import check_line
from obatch.protocol import UNSERVABLE_ENDPOINTS
from obatch.testing.ollama_sim import THINK_WORDS, OllamaSim, SimConfig, SimModel
from tests.helpers import Scripted, write_jsonl

CHAT, THINKER = "llama3.2:1b", "qwen3:0.6b"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}


@pytest.fixture
async def ollama(sim: OllamaSim) -> AsyncIterator[OllamaBackend]:
    backend = OllamaBackend(sim.url)
    try:
        yield backend
    finally:
        await backend.aclose()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ refused endpoints


@pytest.mark.parametrize("endpoint", UNSERVABLE_ENDPOINTS)
def test_validation_refuses_endpoints_local_models_cannot_serve(endpoint: str) -> None:
    problem = check_line(3, {"custom_id": "a", "method": "POST", "url": endpoint, "body": {"model": "m"}})
    assert not isinstance(problem, type(None)) and getattr(problem, "code", None) == "unsupported_endpoint"
    assert endpoint in problem.message and "/v1/responses" in problem.message  # type: ignore[union-attr]
    assert "/v1/chat/completions" in problem.message  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------ reasoning


@pytest.mark.parametrize(("effort", "think"), [("low", "low"), ("medium", "medium"), ("xhigh", "high"),
                                               ("none", False)])
def test_reasoning_effort_becomes_think(effort: str, think: object) -> None:
    payload = chat_payload({"model": "m", "messages": user("hi"), "reasoning_effort": effort}, None, stream=False)
    assert payload["think"] == think
    with pytest.raises(errors.PermanentError, match="reasoning_effort"):
        chat_payload({"model": "m", "messages": user("hi"), "reasoning_effort": "lots"}, None, stream=False)


async def test_thinking_comes_back_as_reasoning_content_with_its_tokens(ollama: OllamaBackend) -> None:
    body = {"model": THINKER, "messages": user("Why is the sky blue?"), "reasoning_effort": "high"}
    plain = await ollama.complete("/v1/chat/completions", body)
    reply = ChatCompletion.model_validate(plain.body)
    message = reply.choices[0].message
    thinking = (message.model_extra or {})["reasoning_content"]
    assert thinking.startswith("Let me think") and message.content and thinking not in message.content
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    reasoning = reply.usage.completion_tokens_details.reasoning_tokens
    assert reasoning is not None and 0 < reasoning < reply.usage.completion_tokens

    streamed = await ollama.complete("/v1/chat/completions", body, stream=True)
    usage = streamed.body["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == THINK_WORDS["high"]  # one chunk per token
    assert streamed.body["choices"][0]["message"]["reasoning_content"] == thinking

    quiet = await ollama.complete("/v1/chat/completions", {**body, "reasoning_effort": "none"})
    assert "reasoning_content" not in quiet.body["choices"][0]["message"]
    assert "completion_tokens_details" not in quiet.body["usage"]


async def test_thinking_on_a_model_without_it_is_a_clear_error(ollama: OllamaBackend) -> None:
    with pytest.raises(errors.PermanentError, match="does not support thinking"):
        await ollama.complete("/v1/chat/completions",
                              {"model": CHAT, "messages": user("hi"), "reasoning_effort": "low"})


# ------------------------------------------------------------------------------------- structured outputs


async def test_json_schema_response_format_round_trip(ollama: OllamaBackend) -> None:
    body = {"model": CHAT, "messages": user("A city?"),
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}}
    reply = ChatCompletion.model_validate((await ollama.complete("/v1/chat/completions", body)).body)
    value = orjson.loads(reply.choices[0].message.content or "")
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


async def test_responses_text_format_json_schema(ollama: OllamaBackend) -> None:
    body = {"model": CHAT, "input": "A city?",
            "text": {"format": {"type": "json_schema", "name": "city", "schema": SCHEMA, "strict": True}}}
    response = Response.model_validate((await ollama.complete("/v1/responses", body)).body)
    value = orjson.loads(response.output_text)
    assert set(value) == {"city", "population"} and isinstance(value["city"], str)


# ---------------------------------------------------------------------------------------------- logprobs


async def test_chat_logprobs_both_ways(ollama: OllamaBackend) -> None:
    body = {"model": CHAT, "messages": user("hi"), "logprobs": True, "top_logprobs": 3, "max_tokens": 6}
    assert {k: v for k, v in chat_payload(body, None, stream=False).items() if "logprobs" in k} == {
        "logprobs": True, "top_logprobs": 3}
    for stream in (False, True):
        reply = ChatCompletion.model_validate((await ollama.complete("/v1/chat/completions", body,
                                                                     stream=stream)).body)
        logprobs = reply.choices[0].logprobs
        assert logprobs is not None and logprobs.content is not None and len(logprobs.content) == 6
        assert "".join(t.token for t in logprobs.content) == reply.choices[0].message.content
        assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0
                   for t in logprobs.content)
    with pytest.raises(errors.PermanentError, match="top_logprobs"):
        chat_payload({**body, "top_logprobs": 21}, None, stream=False)


async def test_completions_and_responses_logprobs(ollama: OllamaBackend) -> None:
    legacy = await ollama.complete("/v1/completions", {"model": CHAT, "prompt": "hi", "logprobs": 2,
                                                       "max_tokens": 4})
    choice = Completion.model_validate(legacy.body).choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.top_logprobs or []) == 4
    response = Response.model_validate((await ollama.complete(
        "/v1/responses", {"model": CHAT, "input": "hi", "top_logprobs": 2, "max_output_tokens": 5})).body)
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs is not None and len(part.logprobs) == 5  # type: ignore[union-attr]
    assert all(len(p.top_logprobs) == 2 for p in part.logprobs)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------ responses


def test_responses_request_maps_onto_chat() -> None:
    body = {"model": "m", "instructions": "Be brief.", "max_output_tokens": 9, "reasoning": {"effort": "low"},
            "input": [{"role": "developer", "content": "Rules."},
                      {"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "Look"},
                                   {"type": "input_image", "image_url": "data:image/png;base64,QUJD"}]},
                      {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "42"}],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"}}
    chat = to_chat(body)
    assert [m["role"] for m in chat["messages"]] == ["system", "system", "user", "assistant", "tool"]
    assert chat["messages"][2]["content"][1] == {"type": "image_url",
                                                 "image_url": {"url": "data:image/png;base64,QUJD"}}
    assert chat["messages"][3]["tool_calls"][0]["id"] == "c1" and chat["messages"][4]["tool_call_id"] == "c1"
    assert chat["max_completion_tokens"] == 9 and chat["reasoning_effort"] == "low"
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    with pytest.raises(errors.PermanentError, match="web_search"):
        to_chat({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})
    with pytest.raises(errors.PermanentError, match="previous_response_id"):
        to_chat({"model": "m", "input": "x", "previous_response_id": "resp_1"})


async def test_responses_on_ollama_status_usage_and_items(ollama: OllamaBackend) -> None:
    cut = Response.model_validate((await ollama.complete(
        "/v1/responses", {"model": CHAT, "input": "Tell me a story.", "max_output_tokens": 5})).body)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None and cut.usage.output_tokens == 5 and cut.usage.input_tokens > 0
    assert cut.usage.total_tokens == cut.usage.input_tokens + 5 and cut.output_text

    full = Response.model_validate((await ollama.complete(
        "/v1/responses", {"model": THINKER, "input": "Why?", "reasoning": {"effort": "low"}})).body)
    assert full.status == "completed" and full.incomplete_details is None and full.output_text
    assert [item.type for item in full.output] == ["reasoning", "message"]
    assert full.usage is not None and full.usage.output_tokens_details.reasoning_tokens > 0

    tool = Response.model_validate((await ollama.complete("/v1/responses", {
        "model": CHAT, "input": "What is the weather in Paris?",
        "tools": [{"type": "function", "name": "get_weather", "strict": True,
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]})).body)
    calls = [item for item in tool.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and "city" in orjson.loads(calls[0].arguments)


# ----------------------------------------------------------------------------- OpenAI-compatible engines


async def test_openai_backend_passes_responses_through_or_maps_them() -> None:
    seen: list[str] = []
    # What llama.cpp (xllamacpp 2026.10) answers: no tools / tool_choice / parallel_tool_calls, sparse usage, and
    # "completed" although the answer stopped at max_output_tokens.
    native = {"id": "resp_1", "object": "response", "created_at": 1, "completed_at": 1, "model": "m",
              "status": "completed", "output": [{"type": "message", "id": "msg_1", "role": "assistant",
                                                 "status": "completed", "content": [
                                                     {"type": "output_text", "annotations": [], "logprobs": [],
                                                      "text": "The colour"}]}],
              "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                        "input_tokens_details": {"cached_tokens": 0}}}
    chat = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}

    def handler(serves: bool) -> Callable[[str, Any], tuple[int, Any]]:
        def answer(path: str, _body: Any) -> tuple[int, Any]:
            seen.append(path)
            if path.endswith("/responses"):
                return (200, native) if serves else (404, {"error": "no"})
            return 200, chat
        return answer

    body = {"model": "m", "input": "hi", "max_output_tokens": 2}
    async with Scripted(handler(True)) as url:
        engine = OpenAIBackend(f"{url}/v1")
        passed = Response.model_validate((await engine.complete("/v1/responses", body)).body)
        await engine.aclose()
    assert passed.id == "resp_1" and passed.usage is not None and passed.usage.output_tokens == 2
    assert passed.status == "incomplete" and passed.incomplete_details is not None
    assert passed.incomplete_details.reason == "max_output_tokens" and passed.output_text == "The colour"
    assert seen == ["/v1/responses"]

    seen.clear()
    async with Scripted(handler(False)) as url:
        older = OpenAIBackend(f"{url}/v1")
        for _ in range(2):
            mapped = Response.model_validate((await older.complete("/v1/responses", body)).body)
            assert mapped.output_text == "hello" and mapped.usage is not None and mapped.usage.input_tokens == 3
            assert mapped.status == "completed"
        await older.aclose()
    assert seen == ["/v1/responses", "/v1/chat/completions", "/v1/chat/completions"]  # asked once, remembered


# ----------------------------------------------------------------------------------------------- context


async def test_num_ctx_never_exceeds_the_trained_context() -> None:
    sent: list[dict[str, Any]] = []
    done = {"model": "tiny", "message": {"role": "assistant", "content": "ok"}, "done": True,
            "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 1}

    def answer(path: str, body: Any) -> tuple[int, Any]:
        if path == "/api/show":
            return 200, {"model_info": {"llama.context_length": 1024}, "details": {}}
        sent.append(body)
        return 200, done

    async with Scripted(answer) as url:
        backend = OllamaBackend(url)
        assert (await backend.show("tiny")).context_length == 1024
        await backend.complete("/v1/chat/completions", {"model": "tiny", "messages": user("hi")}, num_ctx=8192)
        await complete_by_streaming(backend, {"model": "tiny", "messages": user("hi")}, num_ctx=4096)
        await backend.aclose()
    assert [s["options"]["num_ctx"] for s in sent] == [1024, 1024]


async def test_loaded_context_is_recorded_with_each_result(tmp_path: Path,
                                                           make_settings: Callable[..., Settings]) -> None:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "small", "input": f"Say {i}.", "max_output_tokens": 8}} for i in range(3)]
    config = SimConfig(models=(SimModel("small", context_length=8192),), default_num_ctx=4096)
    async with OllamaSim(config) as sim:
        report = await run_batch_file(write_jsonl(tmp_path / "in.jsonl", lines), settings=make_settings(sim.url),
                                      endpoint="/v1/responses", progress=False)
        async with httpx.AsyncClient(base_url=sim.url) as client:
            ps = (await client.get("/api/ps")).json()["models"]
    assert ps[0]["context_length"] == 2048  # the fitted window, not the server default
    output = [orjson.loads(line) for line in report.output.read_bytes().splitlines()]
    assert len(output) == 3 and not report.errors.read_bytes()
    for line in output:
        assert line["obatch"]["num_ctx"] == 2048 and line["obatch"]["loaded_context"] == 2048
        response = Response.model_validate(line["response"]["body"])
        assert response.status == "incomplete" and response.usage is not None
        assert response.usage.output_tokens == 8
    assert report.batch.output_tokens == 24 and report.batch.endpoint == "/v1/responses"


async def test_sim_default_context_is_configurable_and_reported(sim: OllamaSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as client:
        await client.post("/api/chat", json={"model": CHAT, "messages": user("hi"), "stream": False})
        assert (await client.get("/api/ps")).json()["models"][0]["context_length"] == 4096
    async with OllamaSim(SimConfig(default_num_ctx=32768)) as big, httpx.AsyncClient(base_url=big.url) as client:
        await client.post("/api/chat", json={"model": CHAT, "messages": user("hi"), "stream": False})
        await client.post("/api/chat", json={"model": "qwen2.5:0.5b", "messages": user("hi"), "stream": False})
        loaded = {m["name"]: m["context_length"] for m in (await client.get("/api/ps")).json()["models"]}
    assert loaded == {CHAT: 8192, "qwen2.5:0.5b": 32768}  # never above the trained context


async def test_sim_embedding_models_run_one_request_at_a_time() -> None:
    config = SimConfig(num_parallel=4, prompt_tps=2000, decode_tps=500,
                       models=(SimModel(CHAT), SimModel("embed", capabilities=("embedding",)),
                               SimModel("single", max_parallel=1)))
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=30) as client:
        calls = [client.post("/api/embed", json={"model": "embed", "input": "x" * 400}) for _ in range(4)]
        calls += [client.post("/api/chat", json={"model": name, "messages": user("hi"), "stream": False,
                                                 "options": {"num_predict": 20}})
                  for name in (CHAT, "single") for _ in range(4)]
        assert all(r.status_code == 200 for r in await asyncio.gather(*calls))
        seen = dict(sim.stats.max_concurrent_by_model)
    assert seen == {f"{CHAT}": 4, "embed:latest": 1, "single:latest": 1}
