"""The same SDK flow on the real embedded engine (llama.cpp via xllamacpp, SmolLM2-135M): a few short requests."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from openai import OpenAI

from obatch.engine import EngineUnavailable, default_model_path
from obatch.testing.ollama_sim import OllamaSim
from tests.helpers import jsonl
from tests.serverkit import FINAL, ServerProcess, assert_exactly_once, chat_line, parse_jsonl, server_env

pytestmark = pytest.mark.engine
MODEL = "smollm2:135m"


def test_sdk_on_the_local_engine(obatch_sim: OllamaSim, tmp_path: Path) -> None:
    try:
        default_model_path()
    except EngineUnavailable as exc:
        pytest.skip(str(exc))
    env = server_env(tmp_path / "data", obatch_sim.url, backend="local", local_model_alias=MODEL, local_threads=1,
                     concurrency=2)
    server = ServerProcess.start(tmp_path / "data", env)
    try:
        with OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120) as client:
            assert [m.id for m in client.models.list()] == [MODEL]
            # The batch starts the engine (num_ctx and slots fitted to its requests).
            lines = [chat_line(f"s{i}", model=MODEL, max_tokens=8, content=f"Count to {i + 2}.") for i in range(3)]
            for line in lines:  # greedy: a sampled answer may end at its first token, with no text
                line["body"]["temperature"] = 0
            file_id = client.files.create(file=("smol.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id
            batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="1h")
            deadline = time.monotonic() + 120
            while batch.status not in FINAL:
                assert time.monotonic() < deadline, batch
                time.sleep(0.2)
                batch = client.batches.retrieve(batch.id)
            assert batch.status == "completed" and batch.request_counts and batch.request_counts.completed == 3
            output = parse_jsonl(client.files.content(batch.output_file_id or "").text)
            # Interactive use on the engine the batch left running (no reload).
            reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                                   messages=[{"role": "user", "content": "Name a colour."}])
            assert reply.choices[0].message.content and reply.usage and 0 < reply.usage.completion_tokens <= 8
        assert_exactly_once([str(line["custom_id"]) for line in lines], output, [])
        assert all(line["response"]["body"]["choices"][0]["message"]["content"] for line in output)  # type: ignore[index]
    finally:
        server.stop()
