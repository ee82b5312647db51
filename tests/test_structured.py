"""Structured answers checked: a line that asks for JSON (by schema, json_object, or Ollama's ``format``) gets JSON
that matches, asked again a bounded number of times when it does not, and then ends as ``invalid_output`` with the
answer kept. A line that asks for no JSON is never checked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from litestar.testing import AsyncTestClient

import obatch
from obatch import errors, structured
from obatch.api import results_frame, run_batch_file
from obatch.backends.base import Result
from obatch.backends.pool import Pool
from obatch.config import Settings
from obatch.runner import Job, RetryPolicy, call_with_retries
from obatch.server import create_app
from obatch.testing.ollama_sim import OllamaSim, SimConfig
from tests.helpers import chat_line, jsonl, write_jsonl
from tests.serverkit import settled

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
CHAT_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def chat(content: str) -> dict[str, Any]:
    return {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": content}}]}


class Answers:
    """A backend that answers each request with the next of a list of texts (and counts the requests)."""

    name = "scripted"

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.calls = 0

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        self.calls += 1
        return Result(chat(self.texts.pop(0)))


async def run_one(backend: Answers, body: dict[str, Any], *, retries: int = 2, url: str = "/v1/chat/completions"
                  ) -> tuple[Result | None, errors.BackendError | None, int]:
    pool = Pool.of(backend, concurrency=1)  # type: ignore[arg-type]
    job = Job(1, "c1", url, body)
    return await call_with_retries(pool, job, RetryPolicy(output_retries=retries, initial_wait=0.0), model=None)


# ---------------------------------------------------------------------------------------------- the check


def test_what_a_body_asks_for() -> None:
    assert structured.expectation("/v1/chat/completions", {"messages": []}) is None
    assert structured.expectation("/v1/chat/completions", {"response_format": {"type": "text"}}) is None
    assert structured.expectation("/v1/embeddings", {"format": "json"}) is None
    assert structured.expectation("/v1/chat/completions", {"response_format": {"type": "json_object"}}) == \
        structured.Expectation("json_object")
    assert structured.expectation("/v1/completions", {"format": "json"}) == structured.Expectation("json_object")
    for url, body in (("/v1/chat/completions", {"response_format": CHAT_SCHEMA}),
                      ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "p", "schema": PERSON}}}),
                      ("/v1/chat/completions", {"format": PERSON})):
        expect = structured.expectation(url, body)
        assert expect is not None and expect.kind == "json_schema"
        assert structured.problem(expect, chat('{"name": "Ada", "age": 36}')) is None
        assert "age" in (structured.problem(expect, chat('{"name": "Ada"}')) or "")
        assert "not valid JSON" in (structured.problem(expect, chat('{"name": "Ada", "age": 3')) or "")


def test_a_schema_that_is_no_schema_fails_the_line() -> None:
    with pytest.raises(errors.PermanentError, match="not a valid JSON Schema"):
        structured.expectation("/v1/chat/completions", {"format": {"type": 12}})


async def test_an_invalid_answer_is_asked_again_and_the_valid_one_kept() -> None:
    backend = Answers('{"name": "Ada"', '{"name": "Ada", "age": 36}')
    result, error, attempts = await run_one(backend, {"response_format": CHAT_SCHEMA})
    assert error is None and result is not None and result.refused == 1
    assert orjson.loads(result.body["choices"][0]["message"]["content"]) == {"name": "Ada", "age": 36}
    assert attempts == 2 and backend.calls == 2


async def test_answers_invalid_past_the_budget_end_as_invalid_output_with_the_last_answer() -> None:
    backend = Answers("no", '{"name": 1, "age": 2}', '{"age": -1}', '{"name": "late", "age": 1}')
    result, error, attempts = await run_one(backend, {"response_format": CHAT_SCHEMA}, retries=2)
    assert result is None and isinstance(error, structured.InvalidOutput)
    assert error.code == "invalid_output" and error.refused == 3 and attempts == 3 and backend.calls == 3
    assert error.answer.body["choices"][0]["message"]["content"] == '{"age": -1}'


async def test_json_object_needs_only_json() -> None:
    backend = Answers("Sure! {", "[1, 2]")
    result, error, _ = await run_one(backend, {"response_format": {"type": "json_object"}})
    assert error is None and result is not None and result.refused == 1


async def test_a_line_without_a_schema_is_never_checked() -> None:
    backend = Answers("not json at all {")
    result, error, attempts = await run_one(backend, {"messages": []}, retries=5)
    assert error is None and result is not None and result.refused == 0 and attempts == 1 and backend.calls == 1


async def test_no_retries_means_the_first_invalid_answer_ends_the_line() -> None:
    backend = Answers("{", "{}")
    _, error, _ = await run_one(backend, {"format": "json"}, retries=0)
    assert isinstance(error, structured.InvalidOutput) and backend.calls == 1


# ----------------------------------------------------------------------------------- through the simulator


def person_line(i: int, **extra: Any) -> dict[str, Any]:
    return chat_line(f"person{i}", f"person {i}", response_format=CHAT_SCHEMA, **extra)


async def test_cli_path_retries_invalid_answers_then_keeps_them_as_invalid_output(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [person_line(i) for i in range(40)] + [chat_line(f"plain{i}", f"hi {i}") for i in range(10)]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    async with OllamaSim(SimConfig(num_parallel=4, invalid_json_rate=0.5, seed=5)) as sim:
        report = await run_batch_file(path, settings=make_settings(sim.url), concurrency=4, progress=False,
                                      output_retries=1)
        injected = sim.stats.invalid_json_injected
    output = [orjson.loads(line) for line in report.output.read_bytes().splitlines()]
    errors_ = [orjson.loads(line) for line in report.errors.read_bytes().splitlines()]
    assert sorted(line["custom_id"] for line in output + errors_) == sorted(line["custom_id"] for line in lines)
    invalid = [line for line in errors_ if line["error"]["code"] == "invalid_output"]
    assert invalid and len(invalid) == len(errors_)  # about a quarter of 40 (two cut answers in a row)
    for line in invalid:
        assert line["obatch"]["refused_answers"] == 2 and line["obatch"]["attempts"] == 2
        raw = line["response"]["body"]["choices"][0]["message"]["content"]
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(raw)  # the raw answer is kept, as the engine gave it
        assert line["response"]["status_code"] == 200 and "not valid JSON" in line["error"]["message"]
    people = [line for line in output if line["custom_id"].startswith("person")]
    for line in people:
        answer = orjson.loads(line["response"]["body"]["choices"][0]["message"]["content"])
        assert set(answer) == {"name", "age"} and isinstance(answer["age"], int)
    retried = [line for line in people if line["obatch"]["refused_answers"]]
    assert retried and all(line["obatch"]["refused_answers"] == 1 for line in retried)
    assert all(not line["obatch"]["refused_answers"] for line in output if line["custom_id"].startswith("plain"))
    refused = sum(line["obatch"]["refused_answers"] or 0 for line in output + errors_)
    assert refused == injected  # every cut answer was caught, and no valid one refused
    batch = report.batch
    assert batch.invalid_output == len(invalid) and batch.refused_answers == refused
    assert batch.failed == len(invalid) and batch.completed == 50 - len(invalid)
    frame = await results_frame(make_settings(), batch.id)
    assert frame["refused_answers"].fill_null(0).sum() == refused
    assert frame.filter(frame["error_code"] == "invalid_output").height == len(invalid)


async def test_the_notebook_run_takes_its_retries_as_a_keyword(make_settings: Callable[..., Settings]) -> None:
    async with OllamaSim(SimConfig(num_parallel=2, invalid_json_rate=1.0)) as sim:
        frame = await obatch.run(["a", "b"], model="llama3.2:1b", settings=make_settings(sim.url), progress=False,
                                 output_retries=0, response_format={"type": "json_object"}, max_tokens=8)
        asked = sim.stats.invalid_json_injected
    assert asked == 2  # no retry: one answer a line
    assert frame["error_code"].to_list() == ["invalid_output"] * 2 and frame["refused_answers"].to_list() == [1, 1]
    assert frame["content"].to_list()[0] and frame["host"].to_list() == [sim.url] * 2


# ------------------------------------------------------------------------------------------------ server


@pytest.fixture
async def api(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[AsyncTestClient[Any], OllamaSim]]:
    async with OllamaSim(SimConfig(num_parallel=4, invalid_json_rate=1.0)) as sim:
        app = create_app(make_settings(sim.url, worker_poll_interval=0.05, output_retries=3))
        async with AsyncTestClient(app) as client:
            yield client, sim


async def test_server_batch_sets_its_retries_by_metadata_and_counts_invalid_output(
        api: tuple[AsyncTestClient[Any], OllamaSim]) -> None:
    client, sim = api
    stored = await client.post("/v1/files", data={"purpose": "batch"},
                               files={"file": ("in.jsonl", jsonl([person_line(i) for i in range(3)]))})
    create = {"input_file_id": stored.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    refused = await client.post("/v1/batches", json={**create, "metadata": {"obatch_output_retries": "many"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "metadata"
    created = await client.post("/v1/batches", json={**create, "metadata": {"obatch_output_retries": "1"}})
    batch = await settled(client, created.json()["id"])
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert batch["obatch"]["invalid_output"] == 3 and batch["obatch"]["refused_answers"] == 6  # 1 retry, not 3
    assert sim.stats.invalid_json_injected == 6
    errors_file = (await client.get(f"/v1/files/{batch['error_file_id']}/content")).content
    lines = [orjson.loads(line) for line in errors_file.splitlines()]
    assert {line["error"]["code"] for line in lines} == {"invalid_output"}
    assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in lines)
