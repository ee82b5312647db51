"""OpenAI ↔ Ollama mapping, both ways, and the Ollama backend against the simulator."""

from __future__ import annotations

import base64
import struct

import pytest

from obatch import errors
from obatch.backends.ollama import (
    OllamaBackend,
    chat_payload,
    chat_response,
    embed_response,
    generate_payload,
    timings_of,
)
from obatch.testing.ollama_sim import OllamaSim, SimConfig


def test_chat_body_maps_to_native_options() -> None:
    body = {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0.2,
        "top_p": 0.9, "seed": 7, "stop": "END", "frequency_penalty": 0.5, "presence_penalty": 0.1,
        "response_format": {"type": "json_object"}, "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    payload = chat_payload(body, num_ctx=4096, stream=False)
    assert payload["options"] == {"num_predict": 12, "temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["END"],
                                  "frequency_penalty": 0.5, "presence_penalty": 0.1, "num_ctx": 4096}
    assert payload["format"] == "json" and payload["tools"] == body["tools"] and payload["stream"] is False


def test_request_settings_win_over_fitted_num_ctx() -> None:
    body = {"model": "m", "messages": [], "options": {"num_ctx": 512}, "max_completion_tokens": 3}
    assert chat_payload(body, num_ctx=4096, stream=True)["options"] == {"num_ctx": 512, "num_predict": 3}


def test_json_schema_images_and_tool_history() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {
        "model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        ],
    }
    payload = chat_payload(body, None, stream=False)
    assert payload["format"] == schema
    assert payload["messages"][0] == {"role": "user", "content": "look", "images": ["QUJD"]}
    assert payload["messages"][1]["tool_calls"] == [{"function": {"name": "f", "arguments": {"x": 1}}}]


@pytest.mark.parametrize("body", [{"n": 2}, {"logit_bias": {"1": 2}}])
def test_unsupported_fields_are_refused_not_ignored(body: dict[str, object]) -> None:
    with pytest.raises(errors.PermanentError):
        chat_payload({"model": "m", "messages": [], **body}, None, stream=False)


def test_native_answer_maps_back() -> None:
    data = {"model": "m", "message": {"role": "assistant", "content": "abc"}, "done": True, "done_reason": "length",
            "prompt_eval_count": 5, "eval_count": 7, "prompt_eval_duration": 2_000_000, "eval_duration": 70_000_000,
            "load_duration": 1_000_000, "total_duration": 80_000_000}
    out = chat_response(data)
    assert out["choices"][0]["finish_reason"] == "length" and out["choices"][0]["message"]["content"] == "abc"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    timings = timings_of(data)
    assert (timings.prompt_ms, timings.decode_ms, timings.load_ms) == (2.0, 70.0, 1.0)

    calls = {"model": "m", "done": True, "done_reason": "stop",
             "message": {"role": "assistant", "content": "", "tool_calls": [
                 {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}}
    choice = chat_response(calls)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}


def test_embeddings_base64_and_generate_prompt() -> None:
    out = embed_response({"model": "e", "embeddings": [[0.5, -1.0]], "prompt_eval_count": 3}, "base64")
    assert struct.unpack("<2f", base64.b64decode(out["data"][0]["embedding"])) == (0.5, -1.0)
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert generate_payload({"model": "m", "prompt": ["one"]}, None)["prompt"] == "one"
    with pytest.raises(errors.PermanentError):
        generate_payload({"model": "m", "prompt": ["one", "two"]}, None)


async def test_backend_against_the_simulator(sim: OllamaSim) -> None:
    backend = OllamaBackend(sim.url)
    try:
        chat = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 5}
        result = await backend.complete("/v1/chat/completions", chat, num_ctx=2048)
        assert result.body["object"] == "chat.completion"
        assert result.body["choices"][0]["finish_reason"] == "length"
        assert result.body["usage"]["completion_tokens"] == 5 == result.timings.completion_tokens
        assert sim.stats.num_ctx_seen[2048] == 1

        streamed = await backend.complete("/v1/chat/completions", chat, stream=True)
        assert streamed.body["choices"][0]["message"]["content"] == result.body["choices"][0]["message"]["content"]
        assert streamed.timings.ttft_ms is not None and streamed.timings.completion_tokens == 5

        embed = await backend.complete("/v1/embeddings", {"model": "nomic-embed-text", "input": ["a", "b"]})
        assert [d["index"] for d in embed.body["data"]] == [0, 1] and len(embed.body["data"][0]["embedding"]) == 32

        text = await backend.complete("/v1/completions", {"model": "llama3.2:1b", "prompt": "once", "max_tokens": 3})
        assert text.body["object"] == "text_completion" and text.body["usage"]["completion_tokens"] == 3

        info = await backend.show("qwen2.5:0.5b")
        assert info.context_length == 32768
        assert {m.id for m in await backend.models()} >= {"llama3.2:1b", "qwen2.5:0.5b"}
        assert await backend.version()
        with pytest.raises(errors.ModelNotFoundError):
            await backend.complete("/v1/chat/completions", {**chat, "model": "missing"})
    finally:
        await backend.aclose()


@pytest.mark.parametrize("slots", [1, 3, 20])
async def test_ollama_slots_are_counted_with_short_requests_sent_together(slots: int) -> None:
    """The engine runs the first ``slots`` of 16 at once: they are the count (16 where it runs them all); the rest,
    still waiting, are cancelled, and the model is loaded with the lines' ``num_ctx``, so the first line does not
    load it again."""
    # 0.4 s a generation: reading 16 answers (under coverage, on a loaded machine) stays well inside the half
    # generation the count waits for the rest of the first round (at 80 ms a CI run read 20 slots as fewer than 16)
    async with OllamaSim(SimConfig(num_parallel=slots, decode_tps=10)) as sim:
        backend = OllamaBackend(sim.url)
        try:
            counted = await backend.count_slots("llama3.2:1b", num_ctx=2048, most=16)
            line = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            await backend.complete("/v1/chat/completions", line, num_ctx=2048)
        finally:
            await backend.aclose()
    assert counted == min(slots, 16)
    assert sim.stats.requests["/api/generate"] == 16 and sim.stats.loads == 1
    assert sim.stats.served == min(slots, 16) + 1  # the requests that waited for a slot never ran


async def test_slots_are_not_counted_where_nothing_can_be_generated_or_the_engine_is_down() -> None:
    async with OllamaSim(SimConfig(num_parallel=4, decode_tps=50)) as sim:
        backend = OllamaBackend(sim.url)
        try:
            await backend.show("nomic-embed-text")
            assert await backend.count_slots("nomic-embed-text", num_ctx=None, most=16) is None
            assert await backend.count_slots("no-such-model", num_ctx=None, most=16) is None
        finally:
            await backend.aclose()
        assert sim.stats.requests["/api/generate"] == 16  # the unknown model's; the embedding model was not asked
    down = OllamaBackend(sim.url)  # the simulator has stopped: refused
    try:
        assert await down.count_slots("llama3.2:1b", num_ctx=None, most=16) is None
    finally:
        await down.aclose()
