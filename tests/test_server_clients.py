"""What real OpenAI clients send, against ``obatch serve`` on the Ollama simulator: streamed Responses and text
completions, several prompts in one completions request, token-array embeddings (refused on Ollama, which cannot
detokenize), the same in batch lines, a stream the client leaves, and LangChain's calls that send them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from openai.types import Completion
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from obatch.testing.ollama_sim import OllamaSim, SimConfig, run_in_thread
from tests.serverkit import CHAT, DECODE_TPS, EMBED, KEYS, ServerProcess, parse_jsonl, server_env
from tests.test_contract_server import THINKER, finished, upload

KEY = KEYS["carol"]
STREAM_EVENT: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
SCHEMA = {"type": "json_schema", "name": "point", "strict": True,
          "schema": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                     "required": ["x", "y"], "additionalProperties": False}}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OllamaSim, ServerProcess]]:
    """A simulator of its own (its counters tell what the engine was asked) and a server in front of it."""
    sim = OllamaSim(SimConfig(num_parallel=4, decode_tps=DECODE_TPS, default_output_tokens=2000))
    _, stop = run_in_thread(sim=sim)
    data_dir: Path = tmp_path_factory.mktemp("clients") / "data"
    server = ServerProcess.start(data_dir, server_env(data_dir, sim.url, api_keys=KEY, min_completion_window=1))
    try:
        yield sim, server
    finally:
        server.stop()
        stop()


@pytest.fixture
def client(stack: tuple[OllamaSim, ServerProcess]) -> Iterator[OpenAI]:
    with OpenAI(base_url=stack[1].v1, api_key=KEY, max_retries=0, timeout=30) as sdk:
        yield sdk


def kinds(events: list[ResponseStreamEvent]) -> list[str]:
    """Event types, runs of deltas folded into one ``…delta*``."""
    out: list[str] = []
    for event in events:
        kind = event.type + ("*" if event.type.endswith(".delta") else "")
        if not (out and out[-1] == kind and kind.endswith("*")):
            out.append(kind)
    return out


def test_streamed_response_events_in_order_with_usage(client: OpenAI) -> None:
    events = list(client.responses.create(model=CHAT, input="Where is the point?", text={"format": SCHEMA},
                                          stream=True))  # type: ignore[call-overload]
    assert kinds(events) == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta*", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [STREAM_EVENT.validate_python(e.to_dict()) for e in events] == events  # OpenAI's shapes, validated
    created, last = events[0], events[-1]
    assert created.type == "response.created" and created.response.status == "in_progress"
    assert last.type == "response.completed"
    final = last.response
    assert final.id == created.response.id and final.status == "completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert orjson.loads(deltas).keys() == {"x", "y"}  # the schema's answer, streamed
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == deltas == final.output_text
    item = next(e for e in events if e.type == "response.output_item.done").item
    assert item.type == "message" and item.id == final.output[0].id and item.status == "completed"
    assert final.usage is not None and final.usage.input_tokens > 0
    assert final.usage.output_tokens == len([e for e in events if e.type == "response.output_text.delta"])
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    assert Response.model_validate(final.to_dict()) == final  # the SDK builds events without validating them


def test_streamed_response_cut_at_max_output_tokens_and_tool_calls(client: OpenAI) -> None:
    cut = list(client.responses.create(model=CHAT, input="Tell me about rivers.", max_output_tokens=5, stream=True))
    assert cut[-1].type == "response.incomplete"
    final = cut[-1].response
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.usage is not None and final.usage.output_tokens == 5
    assert len([e for e in cut if e.type == "response.output_text.delta"]) == 5

    called = list(client.responses.create(model=CHAT, input="What is the weather in Paris?", tools=[WEATHER],
                                          stream=True))  # type: ignore[list-item]
    assert kinds(called) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta*", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    call = called[-1].response.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and "city" in orjson.loads(call.arguments)
    arguments = next(e for e in called if e.type == "response.function_call_arguments.done")
    assert arguments.arguments == call.arguments and arguments.item_id == call.id


def test_streamed_response_thinking_first(client: OpenAI) -> None:
    events = list(client.responses.create(model=THINKER, input="Why?", reasoning={"effort": "low"},
                                          max_output_tokens=40, stream=True))
    assert kinds(events)[2:9] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta*",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added"]
    final = events[-1].response  # type: ignore[union-attr]
    thinking = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content and final.output[0].content[0].text == thinking and thinking.startswith("Let")
    assert final.usage is not None and final.usage.output_tokens == 40
    assert final.usage.output_tokens_details.reasoning_tokens == len(
        [e for e in events if e.type == "response.reasoning_text.delta"])


def test_streamed_response_errors_and_policy(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi", stream=True)
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):  # the same bound as on every path
        client.responses.create(model=CHAT, input="hi", max_output_tokens=10**6, stream=True)
    with pytest.raises(openai.BadRequestError, match="options"):
        client.responses.create(model=CHAT, input="hi", stream=True, extra_body={"options": {"num_gpu": 99}})


def test_streamed_completion_chunks_done_and_usage(stack: tuple[OllamaSim, ServerProcess], client: OpenAI) -> None:
    chunks = list(client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
    texts = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in texts] == [None] * (len(texts) - 1) + ["length"]
    assert "".join(c.choices[0].text for c in texts)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > 0

    plain = list(client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=3, stream=True))
    assert all(c.choices and c.usage is None for c in plain)  # no usage chunk unless asked
    with httpx.stream("POST", f"{stack[1].v1}/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": CHAT, "prompt": "Hi", "max_tokens": 2, "stream": True}) as raw:
        events = [e for e in raw.read().decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_several_prompts_one_choice_each(client: OpenAI) -> None:
    prompts = ["Once upon a time", "The river", "In the beginning"]
    answer = client.completions.create(model=CHAT, prompt=prompts, max_tokens=4)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    singles = [client.completions.create(model=CHAT, prompt=p, max_tokens=4) for p in prompts]
    assert [c.text for c in answer.choices] == [s.choices[0].text for s in singles]  # the sim is deterministic
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    assert answer.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles if s.usage)

    chunks = list(client.completions.create(model=CHAT, prompt=prompts[:2], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    by_index = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                for i in (0, 1)}
    assert all(by_index.values()) and all(singles[i].choices[0].text.startswith(by_index[i]) for i in (0, 1))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


def test_token_ids_are_refused_on_ollama_with_what_to_send(client: OpenAI) -> None:
    for tokens in ([15339, 1917], [[15339, 1917], [28, 29]]):
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=EMBED, input=tokens)
        assert refused.value.param == "input" and "list of strings" in refused.value.message
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=CHAT, prompt=tokens, max_tokens=2)
        assert refused.value.param == "prompt" and "token ids" in refused.value.message
    assert len(client.embeddings.create(model=EMBED, input=["one", "two"]).data) == 2


def test_prompt_lists_and_token_ids_in_batch_lines(client: OpenAI) -> None:
    lines = [{"custom_id": "list", "method": "POST", "url": "/v1/completions",
              "body": {"model": CHAT, "prompt": ["a", "b", "c"], "max_tokens": 2}},
             {"custom_id": "tokens", "method": "POST", "url": "/v1/completions",
              "body": {"model": CHAT, "prompt": [15339, 1917], "max_tokens": 2}}]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/completions",
                                  completion_window="24h")
    done = finished(client, batch.id)
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    body = Completion.model_validate(parse_jsonl(client.files.content(done.output_file_id or "").text)[0]
                                     ["response"]["body"])
    assert [c.index for c in body.choices] == [0, 1, 2] and body.usage and body.usage.completion_tokens == 6
    error = parse_jsonl(client.files.content(done.error_file_id or "").text)[0]
    assert error["custom_id"] == "tokens" and "token ids" in error["response"]["body"]["error"]["message"]


LONG = {"completions": {"max_tokens": 2000, "prompt": "Tell me everything."},
        "chat/completions": {"max_tokens": 2000, "messages": [{"role": "user", "content": "Tell me everything."}]},
        "responses": {"max_output_tokens": 2000, "input": "Tell me everything."}}


@pytest.mark.parametrize("route", sorted(LONG))
def test_leaving_a_stream_cancels_the_engine_request(stack: tuple[OllamaSim, ServerProcess], route: str) -> None:
    """A client that stops reading: the engine stops generating (the sim's slot frees well before the answer's
    2000 tokens at 200 tok/s would have taken)."""
    sim, server = stack
    body = {"model": CHAT, "stream": True, **LONG[route]}
    served = sim.stats.served
    with httpx.stream("POST", f"{server.v1}/{route}", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert sim.stats.running == 1
    deadline = time.monotonic() + 5
    while sim.stats.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.stats.running == 0 and sim.stats.served == served


def test_langchain_prompt_lists_and_responses_stream(stack: tuple[OllamaSim, ServerProcess]) -> None:
    """LangChain's ``OpenAI(...).batch`` sends its prompts as one list; ``ChatOpenAI(use_responses_api=True)
    .stream`` reads the Responses events."""
    langchain_openai = pytest.importorskip("langchain_openai")
    settings = {"model": CHAT, "base_url": stack[1].v1, "api_key": KEY, "max_retries": 0, "max_tokens": 4}
    llm = langchain_openai.OpenAI(**settings)
    prompts = ["Once upon a time", "The river", "In the beginning"]
    texts = llm.batch(prompts)
    with OpenAI(base_url=stack[1].v1, api_key=KEY, max_retries=0) as sdk:
        assert texts == [sdk.completions.create(model=CHAT, prompt=p, max_tokens=4).choices[0].text for p in prompts]

    chat = langchain_openai.ChatOpenAI(**settings, use_responses_api=True)
    pieces = list(chat.stream("Tell me about rivers."))
    assert len([p for p in pieces if p.text]) == 4
    whole = pieces[0]
    for piece in pieces[1:]:
        whole += piece
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] == 4
    assert whole.text == chat.invoke("Tell me about rivers.").text

    # What the refusal of token ids tells LangChain users to do on Ollama: send text
    embedder = langchain_openai.OpenAIEmbeddings(model=EMBED, base_url=stack[1].v1, api_key=KEY, max_retries=0,
                                                 check_embedding_ctx_length=False)
    assert [len(v) for v in embedder.embed_documents(["one", "two"])] == [32, 32]


def test_malformed_prompts_and_stream_options(stack: tuple[OllamaSim, ServerProcess]) -> None:
    with httpx.Client(base_url=stack[1].v1, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for prompt in ([1, "a"], [["a"]], [[1], 2], {"text": "a"}):
            refused = http.post("/completions", json={"model": CHAT, "prompt": prompt, "max_tokens": 2})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt", refused.text
        odd = http.post("/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2, "stream": True,
                                              "stream_options": "yes"})  # an object or nothing, as OpenAI types it
        assert odd.status_code == 400 and "stream_options" in odd.json()["error"]["param"], odd.text
        assert http.post("/embeddings", json={"model": EMBED, "input": "x", "stream": True}).status_code == 400
