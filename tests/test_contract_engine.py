"""Responses on the real embedded engine (llama.cpp via xllamacpp, SmolLM2-135M): through obatch's server with the
SDK (mapped onto chat), and llama.cpp's own ``/v1/responses`` passed through the OpenAI-compatible backend."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from openai.types.responses import Response

from obatch.backends.local import LocalBackend
from obatch.backends.openai import OpenAIBackend
from obatch.engine import EngineUnavailable, default_model_path
from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import jsonl
from tests.serverkit import FINAL, ServerProcess, parse_jsonl, server_env

pytestmark = pytest.mark.engine
MODEL = "smollm2:135m"


@pytest.fixture
def model_file() -> Iterator[Path]:
    try:
        yield default_model_path()
    except EngineUnavailable as exc:
        pytest.skip(str(exc))


def test_responses_through_obatch_on_the_local_engine(model_file: Path, obatch_sim: OllamaSim,
                                                     tmp_path: Path) -> None:
    env = server_env(tmp_path / "data", obatch_sim.url, backend="local", local_model_alias=MODEL, local_threads=1,
                     concurrency=2)
    server = ServerProcess.start(tmp_path / "data", env)
    try:
        with OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120) as client:
            lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
                      "body": {"model": MODEL, "input": f"Count from 1 to {i + 50}, one number per line.",
                               "max_output_tokens": 6, "temperature": 0}}
                     for i in range(2)]
            file_id = client.files.create(file=("r.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
            batch = client.batches.create(input_file_id=file_id, endpoint="/v1/responses", completion_window="1h")
            deadline = time.monotonic() + 120
            while batch.status not in FINAL:
                assert time.monotonic() < deadline, batch
                time.sleep(0.2)
                batch = client.batches.retrieve(batch.id)
            assert batch.status == "completed" and batch.request_counts and batch.request_counts.completed == 2
            bodies = [Response.model_validate(line["response"]["body"])
                      for line in parse_jsonl(client.files.content(batch.output_file_id or "").text)]
            assert batch.usage and batch.usage.output_tokens == sum(b.usage.output_tokens for b in bodies if b.usage)
            reply = client.responses.create(model=MODEL, instructions="Answer in one word.",
                                            input="Name a colour.", max_output_tokens=4)
        # counting to 50 cannot fit 6 tokens: those answers are cut, and say so (greedy, since a sampled answer may be a
        # short refusal; a short answer that happens to end exactly at its cap is complete, so only a cut is checked on
        # the reply)
        assert all(b.status == "incomplete" for b in bodies), [b.status for b in bodies]
        for response in [*bodies, reply]:
            assert response.output_text and response.usage and 0 < response.usage.output_tokens <= 6
            if response.status == "incomplete":
                assert response.incomplete_details and response.incomplete_details.reason == "max_output_tokens"
                assert response.usage.output_tokens == response.max_output_tokens
    finally:
        server.stop()


async def test_llama_cpp_responses_passed_through(model_file: Path) -> None:
    local = LocalBackend(model_file, alias=MODEL, threads=1)
    try:
        await local.prepare(MODEL, num_ctx=1024, parallel=1)
        engine = await local._ready()
        passthrough = OpenAIBackend(engine.base_url)
        try:
            result = await passthrough.complete("/v1/responses", {"model": MODEL, "input": "Name a colour.",
                                                                  "max_output_tokens": 5})
            assert passthrough.serves_responses is True  # the pinned llama.cpp serves /v1/responses itself
        finally:
            await passthrough.aclose()
        response = Response.model_validate(result.body)
        assert response.output_text and response.usage and response.usage.output_tokens <= 5
        if response.usage.output_tokens == 5:
            assert response.status == "incomplete" and response.incomplete_details
            assert response.incomplete_details.reason == "max_output_tokens"
        assert await local.loaded_context(MODEL) == 1024
    finally:
        await local.aclose()
