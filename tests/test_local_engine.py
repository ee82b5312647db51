"""Real tokens end to end on the embedded engine (SmolLM2-135M via llama.cpp): a handful of requests, not parallel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from obatch.api import results_frame, run_batch_file
from obatch.backends.local import LocalBackend
from obatch.config import Settings
from tests.helpers import chat_line, write_jsonl

pytestmark = pytest.mark.engine


async def test_smollm2_batch_with_chat_completions_and_embeddings(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    lines = [chat_line(f"c{i}", question, model="smollm2:135m", max_tokens=12, temperature=0)
             for i, question in enumerate(["What is the capital of France?", "Say hello.", "Count to three."])]
    lines.append({"custom_id": "t0", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "smollm2:135m", "prompt": "The sky is", "max_tokens": 5}})
    lines.append({"custom_id": "e0", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "smollm2:135m", "input": ["a cat", "a dog"]}})
    lines.append(chat_line("x", model="not-served"))
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    settings = make_settings(backend="local")
    backend = LocalBackend(threads=2)
    try:
        report = await run_batch_file(path, settings=settings, backend=backend, concurrency=2, progress=False,
                                      stream=False)
        assert backend.engine.loads == 1  # one group, one load
        streamed = await backend.complete("/v1/chat/completions", lines[0]["body"], stream=True)
    finally:
        await backend.aclose()
    assert report.batch.status == "completed" and report.batch.completed == 5 and report.batch.failed == 1
    frame = await results_frame(settings, report.batch.id)
    rows = {row["custom_id"]: row for row in frame.iter_rows(named=True)}
    assert all(rows[c]["content"].strip() and rows[c]["finish_reason"] in ("stop", "length") for c in ("c0", "c1"))
    assert all(rows[c]["completion_tokens"] and rows[c]["prompt_tokens"] for c in ("c0", "c1", "c2", "t0"))
    assert rows["x"]["error_code"] == "model_not_found"
    assert rows["e0"]["status"] == "succeeded"
    assert streamed.timings.ttft_ms is not None and streamed.timings.decode_ms
    assert streamed.body["choices"][0]["message"]["content"] == rows["c0"]["content"]
