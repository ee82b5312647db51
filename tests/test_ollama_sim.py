"""Tests for the Ollama simulator (obatch.testing.ollama_sim): shapes, latency/queue model, faults, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from obatch.testing.ollama_sim import (
    BUSY_MESSAGE,
    MESSAGE_OVERHEAD_TOKENS,
    PROMPT_OVERHEAD_TOKENS,
    OllamaSim,
    SimConfig,
    SimModel,
    chat_prompt_ids,
    chat_prompt_tokens,
    count_tokens,
    generate_prompt_ids,
    generate_prompt_tokens,
    run_in_thread,
)
from tests.helpers import ROOT

CHAT = "llama3.2:1b"
FINAL_INT_KEYS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                  "eval_duration")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def sim() -> AsyncIterator[OllamaSim]:
    async with OllamaSim() as server:
        yield server


@pytest.fixture
async def client(sim: OllamaSim) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
        yield c


async def chat(client: httpx.AsyncClient, text: str = "Why is the sky blue?", **extra: Any) -> httpx.Response:
    return await client.post("/api/chat", json={"model": CHAT, "messages": user(text), "stream": False, **extra})


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in response.text.splitlines() if line.strip()]


def assert_final(obj: dict[str, Any], done_reason: str = "stop") -> None:
    assert obj["done"] is True and obj["done_reason"] == done_reason
    for key in FINAL_INT_KEYS:
        assert isinstance(obj[key], int) and not isinstance(obj[key], bool), key
    assert obj["total_duration"] >= obj["prompt_eval_duration"] + obj["eval_duration"]
    assert obj["created_at"].endswith("Z")


# -- shapes ---------------------------------------------------------------------------------------------------


async def test_tokenizer_rule() -> None:
    assert [count_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    assert chat_prompt_tokens(user("abcdefgh")) == 3 + 4 + 2
    assert chat_prompt_tokens([{"role": "system", "content": "abcd"}, *user("abcd")]) == 3 + 5 + 5
    assert generate_prompt_tokens("abcdefgh") == chat_prompt_tokens(user("abcdefgh"))
    assert generate_prompt_tokens("abcdefgh", raw=True) == 2


async def test_chat_streams_ndjson_by_default(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", json={"model": CHAT, "messages": user("Why is the sky blue?")})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    chunks = ndjson(r)
    assert len(chunks) >= 2
    for c in chunks[:-1]:
        assert set(c) == {"model", "created_at", "message", "done"} and c["done"] is False
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
    final = chunks[-1]
    assert_final(final)
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["eval_count"] == len(chunks) - 1
    assert final["prompt_eval_count"] == chat_prompt_tokens(user("Why is the sky blue?"))
    streamed = "".join(c["message"]["content"] for c in chunks[:-1])
    assert streamed == (await chat(client)).json()["message"]["content"]  # deterministic, stream or not


async def test_chat_non_stream_shape(client: httpx.AsyncClient) -> None:
    r = await chat(client)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["model"] == CHAT and body["message"]["role"] == "assistant" and body["message"]["content"]
    assert_final(body)
    assert 8 <= body["eval_count"] <= 48  # natural length: 8 .. 2 * default_output_tokens


async def test_generate_shapes(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"model": CHAT, "prompt": "Why?", "system": "Be brief."})
    chunks = ndjson(r)
    assert all("response" in c and c["done"] is False for c in chunks[:-1])
    final = chunks[-1]
    assert_final(final)
    assert final["response"] == "" and final["prompt_eval_count"] == generate_prompt_tokens("Why?", "Be brief.")
    assert len(final["context"]) == final["prompt_eval_count"] + final["eval_count"]
    r = await client.post("/api/generate", json={"model": CHAT, "prompt": "Why?", "raw": True, "stream": False})
    body = r.json()
    assert body["response"] and "context" not in body and body["prompt_eval_count"] == count_tokens("Why?")


async def test_embed_shape(client: httpx.AsyncClient) -> None:
    texts = ["Why is the sky blue?", "Why is the grass green?"]
    body = (await client.post("/api/embed", json={"model": "nomic-embed-text", "input": texts})).json()
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert body["model"] == "nomic-embed-text" and len(body["embeddings"]) == 2
    assert body["prompt_eval_count"] == sum(count_tokens(t) for t in texts)
    for vector in body["embeddings"]:
        assert len(vector) == 32 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-9)
    single = (await client.post("/api/embed", json={"model": "nomic-embed-text:latest", "input": texts[0]})).json()
    assert single["embeddings"] == body["embeddings"][:1]  # deterministic, and "x" == "x:latest"
    cut = (await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x", "dimensions": 8}))
    assert len(cut.json()["embeddings"][0]) == 8


async def test_tags_show_ps_version(client: httpx.AsyncClient) -> None:
    tags = (await client.get("/api/tags")).json()["models"]
    assert [m["name"] for m in tags] == ["llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest", "qwen3:0.6b"]
    for m in tags:
        assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(m)
        assert {"parent_model", "format", "family", "families", "parameter_size", "quantization_level"} == set(
            m["details"])
    show = (await client.post("/api/show", json={"model": "qwen2.5:0.5b"})).json()
    assert {"modelfile", "parameters", "template", "details", "model_info", "capabilities"} <= set(show)
    assert show["model_info"]["general.architecture"] == "qwen2"
    assert show["model_info"]["qwen2.context_length"] == 32768 and show["capabilities"] == ["completion", "tools"]
    legacy = (await client.post("/api/show", json={"name": "nomic-embed-text"})).json()
    assert legacy["capabilities"] == ["embedding"]
    missing = await client.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    assert (await client.get("/api/ps")).json() == {"models": []}
    await chat(client, options={"num_ctx": 2048})
    ps = (await client.get("/api/ps")).json()["models"]
    assert len(ps) == 1 and ps[0]["name"] == CHAT and ps[0]["context_length"] == 2048
    assert {"name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"} == set(ps[0])
    assert (await client.get("/api/version")).json() == {"version": "0.12.6"}
    root = await client.get("/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert (await client.head("/")).status_code == 200


async def test_load_and_unload_with_empty_messages(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", json={"model": CHAT, "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["done"] is True
    assert len((await client.get("/api/ps")).json()["models"]) == 1
    r = await client.post("/api/chat", json={"model": CHAT, "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    assert (await client.get("/api/ps")).json() == {"models": []}
    await chat(client, keep_alive="0s")  # keep_alive 0 unloads after the answer
    assert (await client.get("/api/ps")).json() == {"models": []}


# -- generation rules -----------------------------------------------------------------------------------------


async def test_num_predict_gives_length(client: httpx.AsyncClient) -> None:
    body = (await chat(client, options={"num_predict": 3})).json()
    assert body["done_reason"] == "length" and body["eval_count"] == 3
    r = await client.post("/api/chat", json={"model": CHAT, "messages": user("hi"), "options": {"num_predict": 5}})
    chunks = ndjson(r)
    assert len(chunks) == 6 and chunks[-1]["done_reason"] == "length" and chunks[-1]["eval_count"] == 5
    big = (await chat(client, options={"num_predict": 1000})).json()
    assert big["done_reason"] == "stop" and big["eval_count"] < 1000


async def test_stop_strings(client: httpx.AsyncClient) -> None:
    full = (await chat(client)).json()["message"]["content"]
    stop = full.split()[2][:3]
    body = (await chat(client, options={"stop": [stop]})).json()
    assert body["message"]["content"] == full[: full.index(stop)] and body["done_reason"] == "stop"
    assert body["eval_count"] == len(full[: full.index(stop) + len(stop)].split())  # one token per word
    bad = await chat(client, options={"stop": "x"})
    assert bad.status_code == 400 and bad.json()["error"] == 'option "stop" must be of an array of strings'


async def test_prompt_truncated_silently_to_num_ctx(sim: OllamaSim, client: httpx.AsyncClient) -> None:
    long_text = "word " * 2000  # 2500 tokens
    r = await chat(client, long_text, options={"num_ctx": 1024})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == 1024
    r = await chat(client, long_text)  # default_num_ctx 4096: fits
    assert r.json()["prompt_eval_count"] == chat_prompt_tokens(user(long_text))
    r = await chat(client, long_text, options={"num_ctx": 100_000})  # clamped to the model's 8192
    assert r.json()["prompt_eval_count"] == chat_prompt_tokens(user(long_text))
    assert sim.stats.truncated == 1 and sim.stats.num_ctx_seen == {1024: 1, 4096: 1, 8192: 1}


async def test_format_json_and_schema(client: httpx.AsyncClient) -> None:
    body = (await chat(client, format="json")).json()
    assert isinstance(orjson.loads(body["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "available": {"type": "boolean"},
                                               "tags": {"type": "array", "items": {"type": "string"}}}}
    value = orjson.loads((await chat(client, format=schema)).json()["message"]["content"])
    assert isinstance(value["age"], int) and isinstance(value["available"], bool)
    assert all(isinstance(t, str) for t in value["tags"])
    bad = await chat(client, format="yaml")
    assert bad.status_code == 400


async def test_tool_call(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_current_weather", "parameters": {"type": "object", "properties": {
            "location": {"type": "string"}, "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]
    body = (await chat(client, "What is the weather today in Paris?", tools=tools)).json()
    assert body["done_reason"] == "stop" and body["message"]["content"] == ""
    (call,) = body["message"]["tool_calls"]
    assert call["function"]["name"] == "get_current_weather"
    assert call["function"]["arguments"]["format"] in ("celsius", "fahrenheit")
    plain = (await chat(client, "Tell me a story", tools=tools)).json()
    assert "tool_calls" not in plain["message"] and plain["message"]["content"]
    r = await client.post("/api/chat", json={"model": CHAT, "tools": tools, "messages": user("weather?")})
    assert any(c["message"].get("tool_calls") for c in ndjson(r))  # streamed tool call
    embed_only = await client.post("/api/chat", json={"model": "nomic-embed-text", "messages": user("hi")})
    assert embed_only.status_code == 400


async def test_determinism(client: httpx.AsyncClient) -> None:
    first = (await chat(client, "same prompt")).json()["message"]["content"]
    assert first == (await chat(client, "same prompt")).json()["message"]["content"]
    assert first != (await chat(client, "another prompt")).json()["message"]["content"]
    seeded = {(await chat(client, "same prompt", options={"seed": s})).json()["message"]["content"]
              for s in range(4)}
    assert len(seeded) > 1


async def test_client_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/chat", json={"model": "nope:7b", "messages": user("hi")})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope:7b" not found, try pulling it first'}
    r = await client.post("/api/chat", json={"messages": user("hi")})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    r = await client.post("/api/chat", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = await chat(client, options={"num_ctx": "big"})
    assert r.status_code == 400 and r.json()["error"] == 'option "num_ctx" must be of type integer'
    r = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x" * 40_000,
                                              "truncate": False})
    assert r.status_code == 400
    r = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x" * 40_000})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == 4096


# -- scheduling -----------------------------------------------------------------------------------------------


async def test_503_when_queue_full() -> None:
    config = SimConfig(num_parallel=1, max_queue=1, decode_tps=20)
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        replies = await asyncio.gather(*(chat(client, f"q{i}", options={"num_predict": 6}) for i in range(5)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 503, 503, 503]
    assert all(r.json() == {"error": BUSY_MESSAGE} for r in replies if r.status_code == 503)
    assert sim.stats.busy_503 == 3 and sim.stats.max_concurrent_seen == 1 and sim.stats.max_queued_seen == 1


async def test_concurrency_never_exceeds_num_parallel() -> None:
    async with OllamaSim(SimConfig(num_parallel=2, decode_tps=200)) as sim, \
            httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        replies = await asyncio.gather(*(chat(client, f"q{i}", options={"num_predict": 4}) for i in range(8)))
        streamed = await client.post("/api/chat", json={"model": CHAT, "messages": user("s")})
    assert all(r.status_code == 200 for r in [*replies, streamed])
    assert sim.stats.max_concurrent_seen == 2 and sim.stats.max_queued_seen >= 4
    assert sim.stats.served == 9 and sim.stats.model_requests[CHAT] == 9


async def test_a_request_that_leaves_the_queue_gives_no_slot_away() -> None:
    async with OllamaSim(SimConfig(num_parallel=1, decode_tps=20)) as sim, \
            httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        first = asyncio.ensure_future(chat(client, "first", options={"num_predict": 6}))  # 0.3 s on the slot
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/api/chat", timeout=0.1, json={"model": CHAT, "messages": user("gives up"),
                                                               "stream": False})
        after = await chat(client, "after", options={"num_predict": 2})
        assert (await first).status_code == after.status_code == 200
        await asyncio.sleep(0.05)  # the server notices the closed connection
    assert sim.stats.served == 2 and sim.stats.queued == 0 and sim.stats.running == 0
    assert sim.stats.max_concurrent_seen == 1


async def test_a_slot_freed_as_a_waiting_request_is_cancelled_goes_to_the_next_one() -> None:
    # The cancelled request's future is cancelled at once, its handler runs later: a slot freed in between must
    # pass over it to the next request (it was handed to the cancelled one and lost: every slot, in time).
    async with OllamaSim(SimConfig(num_parallel=1)) as sim:
        _, model = sim._model({"model": CHAT})
        held = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with sim._slot(model):
                held.set()
                await release.wait()

        async def waiter() -> int:
            async with sim._slot(model) as slot:
                return slot.id

        first = asyncio.ensure_future(holder())
        await held.wait()
        cancelled, next_one = asyncio.ensure_future(waiter()), asyncio.ensure_future(waiter())
        await asyncio.sleep(0)  # both queued behind the held slot
        assert sim.stats.queued == 2
        release.set()  # the holder frees its slot on the next turn of the loop, before the cancelled one's handler:
        cancelled.cancel()  # its future is cancelled at once, its handler runs after the holder's step
        await first
        assert await asyncio.wait_for(next_one, 5) == 0
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert sim.stats.queued == sim.stats.running == 0


async def test_reload_on_num_ctx_change_and_lru() -> None:
    config = SimConfig(load_seconds=0.05, max_loaded_models=1)
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        first = (await chat(client, options={"num_ctx": 2048})).json()
        again = (await chat(client, options={"num_ctx": 2048})).json()
        assert sim.stats.loads == 1
        assert first["load_duration"] >= 50_000_000 > again["load_duration"]
        reload = (await chat(client, options={"num_ctx": 4096})).json()
        assert sim.stats.loads == 2 and reload["load_duration"] >= 50_000_000
        await client.post("/api/chat", json={"model": "qwen2.5:0.5b", "messages": user("x"), "stream": False})
        ps = (await client.get("/api/ps")).json()["models"]
        assert [m["name"] for m in ps] == ["qwen2.5:0.5b"]  # LRU evicted llama
        assert sim.stats.loads == 3 and sim.stats.unloads == 2


async def test_latency_model() -> None:
    config = SimConfig(prompt_tps=1000, decode_tps=100)
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        body = (await chat(client, "x" * 400, options={"num_predict": 10})).json()
        elapsed = loop.time() - t0
    assert body["eval_duration"] == 100_000_000 and body["eval_count"] == 10
    assert body["prompt_eval_duration"] == body["prompt_eval_count"] * 1_000_000
    assert elapsed >= 0.2 and body["total_duration"] >= 200_000_000
    assert sim.stats.eval_tokens == 10


async def test_shared_prompt_rate_is_split_between_prompts_in_progress() -> None:
    config = SimConfig(num_parallel=2, prompt_tps=10_000, prompt_tps_shared=True)
    prompts = [user(f"{name} " * 1000) for name in ("ab", "cd")]  # 753 tokens each: 75 ms alone
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        alone = await ask(client, prompts[0])
        t1 = loop.time()
        both = await asyncio.gather(*(ask(client, p) for p in prompts))
        t2 = loop.time()
    nominal = alone["prompt_eval_count"] * 100_000
    assert nominal <= alone["prompt_eval_duration"] < 1.5 * nominal and t1 - t0 >= 0.075
    assert all(1.8 * nominal <= b["prompt_eval_duration"] < 3 * nominal for b in both)  # half the rate each
    assert t2 - t1 >= 0.15 and sim.stats.max_concurrent_seen == 2


# -- prompt cache ---------------------------------------------------------------------------------------------

FAST_PROMPT_TPS = 100_000  # 10 µs of modelled prompt time per token: prompt_eval_duration tells what was processed


def document(name: str, chars: int = 8000) -> str:
    """About ``chars`` characters of text; documents of other names differ from their first token on."""
    return " ".join(f"{name}-{i:05d}" for i in range(chars // (len(name) + 7)))


def asked(doc: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": doc}, {"role": "user", "content": question}]


async def ask(client: httpx.AsyncClient, messages: list[dict[str, str]], **options: Any) -> dict[str, Any]:
    r = await client.post("/api/chat", json={"model": CHAT, "messages": messages, "stream": False,
                                             "options": {"num_predict": 4, **options}})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def processed(body: dict[str, Any], tps: float = FAST_PROMPT_TPS) -> int:
    """The prompt tokens a request really processed, read back from its prompt_eval_duration."""
    return round(body["prompt_eval_duration"] * tps / 1e9)


def doc_prefix(doc: str) -> int:
    """Tokens that prompts asking about ``doc`` share: the system message and the user header."""
    return MESSAGE_OVERHEAD_TOKENS + count_tokens(doc) + PROMPT_OVERHEAD_TOKENS


async def test_prompt_ids_follow_the_token_count() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for messages in (user(""), user("abcdefghi"), asked("doc " * 50, "why?"), [*user("a"), {"role": "assistant",
                     "content": "b", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]):
        assert len(chat_prompt_ids(messages)) == chat_prompt_tokens(messages)
        assert len(chat_prompt_ids(messages, tools)) == chat_prompt_tokens(messages, tools)
    assert len(generate_prompt_ids("Why?", "Be brief.")) == generate_prompt_tokens("Why?", "Be brief.")
    assert len(generate_prompt_ids("Why?", raw=True, suffix="x")) == generate_prompt_tokens("Why?", raw=True,
                                                                                            suffix="x")
    one, two = chat_prompt_ids(asked("same document", "first?")), chat_prompt_ids(asked("same document", "other?"))
    shared = doc_prefix("same document")
    assert one[:shared] == two[:shared] and one[shared] != two[shared]
    assert chat_prompt_ids(user("same")) != chat_prompt_ids([{"role": "system", "content": "same"}])  # roles count


async def test_prompt_cache_is_off_by_default() -> None:
    async with OllamaSim(SimConfig(prompt_tps=FAST_PROMPT_TPS)) as sim, \
            httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        doc = document("a", 2000)
        await ask(client, asked(doc, "first?"))
        again = await ask(client, asked(doc, "second?"))
    assert processed(again) == again["prompt_eval_count"] == chat_prompt_tokens(asked(doc, "second?"))
    assert sim.stats.cached_prompt_tokens == 0 and sim.stats.cache_hits == 0


async def test_shared_prefix_on_one_slot_processes_only_the_new_suffix() -> None:
    tps = 4000.0
    doc = document("a")  # 2,000 tokens: 0.5 s of prompt at 4,000 tokens/s
    async with OllamaSim(SimConfig(prompt_tps=tps, prompt_cache=True)) as sim, \
            httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = await ask(client, asked(doc, "What is the claim?"))
        t1 = loop.time()
        second = await ask(client, asked(doc, "Who wrote it?"))
        t2 = loop.time()
    whole = chat_prompt_tokens(asked(doc, "Who wrote it?"))
    assert first["prompt_eval_count"] == processed(first, tps) == chat_prompt_tokens(asked(doc, "What is the claim?"))
    assert second["prompt_eval_count"] == whole  # Ollama counts the cached tokens too; only the duration shrinks
    assert processed(second, tps) == whole - doc_prefix(doc) == count_tokens("Who wrote it?") + 1 + 3  # + turn ends
    assert t1 - t0 >= 0.5 and t2 - t1 < (t1 - t0) / 4
    assert sim.stats.cached_prompt_tokens == doc_prefix(doc) and sim.stats.cache_hits == 1
    assert sim.stats.prompt_tokens == first["prompt_eval_count"] + whole


async def test_follow_up_lands_on_the_slot_holding_its_document() -> None:
    config = SimConfig(num_parallel=2, prompt_tps=FAST_PROMPT_TPS, decode_tps=40, prompt_cache=True)
    docs = {name: document(name) for name in "ab"}
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        firsts = await asyncio.gather(*(ask(client, asked(doc, "Summarise it.")) for doc in docs.values()))
        assert sim.stats.max_concurrent_seen == 2 and sim.stats.cached_prompt_tokens == 0
        assert all(processed(b) == b["prompt_eval_count"] for b in firsts)
        # b's document went to the second slot: the first free slot would be the wrong one
        on_b = await ask(client, asked(docs["b"], "And the second point?"))
        on_a = await ask(client, asked(docs["a"], "And the second point?"))
        both = await asyncio.gather(*(ask(client, asked(doc, "A third one?")) for doc in docs.values()))
    for body, doc in [(on_b, docs["b"]), (on_a, docs["a"]), *zip(both, docs.values(), strict=True)]:
        assert body["prompt_eval_count"] - processed(body) == doc_prefix(doc)
    assert sim.stats.cache_hits == 4


async def test_cache_is_per_slot_not_global() -> None:
    config = SimConfig(num_parallel=1, prompt_tps=FAST_PROMPT_TPS, prompt_cache=True)
    a, b = document("a"), document("b")
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        await ask(client, asked(a, "First?"))
        await ask(client, asked(b, "First?"))  # the only slot now holds b
        again = await ask(client, asked(a, "Second?"))
        assert again["prompt_eval_count"] - processed(again) == 3  # only the system header matches
        other_ctx = await ask(client, asked(a, "Third?"), num_ctx=8192)  # a reload empties every slot
        assert processed(other_ctx) == other_ctx["prompt_eval_count"]
    assert sim.stats.loads == 2


async def test_a_conversation_reuses_its_previous_turn() -> None:
    config = SimConfig(prompt_tps=FAST_PROMPT_TPS, prompt_cache=True)
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        turn = asked(document("a", 2000), "Why?")
        first = await ask(client, turn)
        answer = first["message"]["content"]
        second = await ask(client, [*turn, {"role": "assistant", "content": answer}, *user("Tell me more.")])
    # the whole first prompt and the answer are in the slot; the new turn starts at the answer's end of turn
    assert second["prompt_eval_count"] - processed(second) == first["prompt_eval_count"] + count_tokens(answer)
    assert sim.stats.cached_prompt_tokens == first["prompt_eval_count"] + count_tokens(answer)


async def test_a_prompt_found_whole_still_processes_one_token() -> None:
    async with OllamaSim(SimConfig(prompt_tps=FAST_PROMPT_TPS, prompt_cache=True)) as sim, \
            httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        r = await client.post("/api/generate", json={"model": CHAT, "prompt": "abcdefgh" * 100, "raw": True,
                                                      "stream": False, "options": {"num_predict": 1}})
        same = await client.post("/api/generate", json={"model": CHAT, "prompt": "abcdefgh" * 50, "raw": True,
                                                         "stream": False, "options": {"num_predict": 1}})
    assert r.status_code == same.status_code == 200
    assert same.json()["prompt_eval_count"] == 100 and processed(same.json()) == 1
    assert sim.stats.cached_prompt_tokens == 99


# -- faults ---------------------------------------------------------------------------------------------------


async def test_fault_rates_follow_seed() -> None:
    config = SimConfig(error_rate=0.2, reset_rate=0.1, seed=7)
    outcomes: list[str] = []
    async with OllamaSim(config) as sim, httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        for i in range(120):
            try:
                r = await chat(client, f"q{i}")
                outcomes.append(str(r.status_code))
            except httpx.TransportError:
                outcomes.append("reset")
        assert (await client.get("/api/version")).status_code == 200  # metadata endpoints never fail
    assert outcomes.count("500") == sim.stats.errors_injected and 12 <= outcomes.count("500") <= 40
    assert outcomes.count("reset") == sim.stats.resets_injected and 4 <= outcomes.count("reset") <= 24
    assert outcomes.count("200") == sim.stats.served == 120 - sim.stats.errors_injected - sim.stats.resets_injected
    async with OllamaSim(config) as replay, httpx.AsyncClient(base_url=replay.url, timeout=10) as client:
        for i in range(120):
            with pytest.raises(httpx.TransportError) if outcomes[i] == "reset" else contextlib.nullcontext():
                r = await chat(client, f"q{i}")
                assert str(r.status_code) == outcomes[i]  # same seed, same sequence


async def test_error_injection_body() -> None:
    async with OllamaSim(SimConfig(error_rate=1.0)) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        r = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    assert r.status_code == 500 and r.json() == {"error": "simulated internal error"}


async def test_reset_is_a_transport_error() -> None:
    async with OllamaSim(SimConfig(reset_rate=1.0)) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await chat(client)
        with pytest.raises(httpx.TransportError):
            await client.post("/api/chat", json={"model": CHAT, "messages": user("hi")})
    assert sim.stats.resets_injected == 2 and sim.stats.served == 0


async def test_hang_times_out_and_stop_is_quick() -> None:
    loop = asyncio.get_running_loop()
    async with OllamaSim(SimConfig(hang_rate=1.0)) as sim:
        async with httpx.AsyncClient(base_url=sim.url, timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await chat(client)
            pending = asyncio.ensure_future(chat(client, "second"))
            await asyncio.sleep(0.1)
            t0 = loop.time()
            await sim.stop()  # wakes the hung request: it is cut off, never answered
            with pytest.raises(httpx.TransportError):
                await pending
        assert loop.time() - t0 < 1.0
    assert sim.stats.hangs_injected == 2 and sim.stats.served == 0


async def test_stream_error_line() -> None:
    async with OllamaSim(SimConfig(stream_error_rate=1.0)) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        r = await client.post("/api/chat", json={"model": CHAT, "messages": user("hi")})
    chunks = ndjson(r)
    assert r.status_code == 200 and chunks[-1] == {"error": "simulated mid-stream error"}
    assert sim.stats.stream_errors_injected == 1 and sim.stats.served == 0


# -- outside an event loop ------------------------------------------------------------------------------------


def test_run_in_thread_from_sync_code() -> None:
    server = OllamaSim(SimConfig(models=(SimModel("tiny:1b"),)))
    url, stop = run_in_thread(sim=server)
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            r = client.post("/api/chat", json={"model": "tiny:1b", "messages": user("hi"), "stream": False})
            assert r.status_code == 200 and r.json()["done"] is True
        assert server.stats.served == 1
    finally:
        stop()
        stop()  # idempotent
    with pytest.raises(httpx.ConnectError), httpx.Client(base_url=url, timeout=2) as client:
        client.get("/api/version")
    url2, stop2 = run_in_thread(SimConfig())
    try:
        assert httpx.get(f"{url2}/api/version", timeout=5).json() == {"version": "0.12.6"}
    finally:
        stop2()


def test_cli_prints_url_and_serves() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "obatch.testing.ollama_sim", "--port", "0", "--num-parallel", "4",
         "--decode-tps", "2000", "--error-rate", "0", "--seed", "1", "--prompt-cache",
         "--prompt-tps", str(FAST_PROMPT_TPS)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.removeprefix("listening on ")
        assert httpx.get(f"{url}/api/version", timeout=5).json() == {"version": "0.12.6"}
        doc = document("a", 2000)
        for question in ("First?", "Second?"):
            body = httpx.post(f"{url}/api/chat", timeout=5, json={
                "model": CHAT, "messages": asked(doc, question), "stream": False}).json()
        assert body["prompt_eval_count"] - processed(body) == doc_prefix(doc)  # --prompt-cache
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
