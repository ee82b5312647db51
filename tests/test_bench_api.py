"""The benchmark endpoints of the server (Litestar's AsyncTestClient, the simulator behind it): best config per
model, a model's history, compare, estimate (token lengths and an uploaded file), the estimate-vs-actual record."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from obatch.bench.sweep import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.server import create_app
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel, run_in_thread
from tests.helpers import chat_line, jsonl

CHAT, OTHER = "llama3.2:1b", "qwen2.5:0.5b"


SIM = SimConfig(models=(SimModel(CHAT), SimModel(OTHER, context_length=32768)), num_parallel=2, prompt_tps=20_000,
                decode_tps=3000, default_output_tokens=4096)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding a 2 num_ctx × 3 concurrency sweep of two models (made once; each test gets a copy)."""
    data = tmp_path_factory.mktemp("swept") / "data"
    url, stop = run_in_thread(SIM)
    try:
        settings = Settings(_env_file=None, data_dir=data, backend="ollama", ollama_url=url)
        spec = SweepSpec(models=[CHAT, OTHER], num_ctx=[2048, 4096], concurrency=[1, 2, 4], requests=6,
                         workload="short", seed=2)
        asyncio.run(run_sweep(spec, settings=settings, progress=False))
    finally:
        stop()
    return data


@pytest.fixture
async def api(swept: Path, tmp_path: Path, make_settings: Callable[..., Settings]
              ) -> AsyncIterator[AsyncTestClient[Any]]:
    """The server on a copy of that store, the simulator behind it."""
    data = shutil.copytree(swept, tmp_path / "copy")
    async with OllamaSim(SIM) as sim:
        # worker_thread=False: the batch runs on this loop, beside the simulator, as the sweep behind the estimate did
        settings = make_settings(sim.url, data_dir=data, worker_poll_interval=0.05, concurrency=2, worker_thread=False)
        async with AsyncTestClient(app=create_app(settings)) as client:
            yield client


async def test_models_lists_the_best_config_of_each_model(api: AsyncTestClient[Any]) -> None:
    response = await api.get("/v1/benchmarks/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    best = {row["model"]: row for row in body["data"]}
    assert set(best) == {CHAT, OTHER}
    for row in best.values():
        assert row["concurrency"] in (2, 4) and row["num_ctx"] in (2048, 4096)  # 2 slots: c=1 is never best
        assert row["req_per_s"] > 0 and row["backend"] == "ollama" and row["repeats"] == 1


async def test_history_of_a_model_filters_by_num_ctx_and_concurrency(api: AsyncTestClient[Any]) -> None:
    everything = (await api.get(f"/v1/benchmarks/models/{CHAT}")).json()["data"]
    assert len(everything) == 6 and {p["model"] for p in everything} == {CHAT}
    point = everything[0]
    for key in ("req_per_s", "gen_tps", "prompt_tps", "ttft_p50", "itl_p50", "latency_p99", "success_rate",
                "engine_version", "sample_responses", "errors", "load_seconds", "wall_seconds"):
        assert key in point, key
    at = (await api.get(f"/v1/benchmarks/models/{CHAT}", params={"num_ctx": 4096, "concurrency": 2})).json()["data"]
    assert [(p["num_ctx"], p["concurrency"]) for p in at] == [(4096, 2)]
    missing = await api.get("/v1/benchmarks/models/nobody:7b")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = await api.get(f"/v1/benchmarks/models/{CHAT}", params={"concurrency": 0})
    assert bad.status_code == 400


async def test_compare_puts_models_side_by_side(api: AsyncTestClient[Any]) -> None:
    rows = (await api.get("/v1/benchmarks/compare", params={"models": f"{CHAT},{OTHER}", "num_ctx": 2048})).json()
    data = rows["data"]
    assert len(data) == 6 and {r["num_ctx"] for r in data} == {2048}
    assert [r["model"] for r in data[:2]] == sorted([CHAT, OTHER])  # side by side, per configuration
    assert (await api.get("/v1/benchmarks/compare", params={"models": " , "})).status_code == 400


async def test_estimate_from_token_lengths(api: AsyncTestClient[Any]) -> None:
    response = await api.get("/v1/benchmarks/estimate", params={
        "model": CHAT, "num_requests": 200, "prompt_tokens": 40, "output_tokens": 30})
    assert response.status_code == 200, response.text
    made = response.json()
    assert made["object"] == "benchmark.estimate" and made["model"] == CHAT
    assert made["low"] < made["seconds"] < made["high"]
    assert made["best"]["concurrency"] in (2, 4) and made["points"]
    assert {p["concurrency"] for p in made["points"]} == {made["concurrency"]}
    # token-aware: ten times the output takes longer; config-aware: one request at a time takes longer
    longer = (await api.get("/v1/benchmarks/estimate", params={
        "model": CHAT, "num_requests": 200, "prompt_tokens": 40, "output_tokens": 300})).json()
    serial = (await api.get("/v1/benchmarks/estimate", params={
        "model": CHAT, "num_requests": 200, "prompt_tokens": 40, "output_tokens": 30, "concurrency": 1})).json()
    assert longer["seconds"] > 2 * made["seconds"] and serial["seconds"] > 1.5 * made["seconds"]
    assert (await api.get("/v1/benchmarks/estimate", params={"model": CHAT})).status_code == 400
    assert (await api.get("/v1/benchmarks/estimate", params={
        "model": "nobody", "num_requests": 1, "prompt_tokens": 1, "output_tokens": 1})).status_code == 404


async def upload(api: AsyncTestClient[Any], lines: list[dict[str, Any]]) -> str:
    content = jsonl(lines)
    response = await api.post("/v1/files", data={"purpose": "batch"},
                              files={"file": ("held.jsonl", content, "application/octet-stream")})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


async def test_estimate_of_an_uploaded_file_and_the_estimate_vs_actual_record(api: AsyncTestClient[Any]) -> None:
    lines = [chat_line(f"r{i}", "tell me a story " * (5 + i % 20), max_tokens=20 + i % 40) for i in range(30)]
    file_id = await upload(api, lines)
    response = await api.get("/v1/benchmarks/estimate", params={"input_file_id": file_id, "concurrency": 2})
    assert response.status_code == 200, response.text
    made = response.json()
    assert made["num_requests"] == 30 and made["concurrency"] == 2 and made["model"] == CHAT
    mixed = await upload(api, lines[:10] + [chat_line(f"o{i}", "hi", model=OTHER, max_tokens=8) for i in range(5)])
    both = (await api.get("/v1/benchmarks/estimate", params={"input_file_id": mixed})).json()
    assert both["num_requests"] == 15 and {g["model"] for g in both["groups"]} == {CHAT, OTHER}
    assert both["seconds"] == pytest.approx(sum(g["seconds"] for g in both["groups"]))
    assert (await api.get("/v1/benchmarks/estimate", params={"input_file_id": "file-" + "0" * 24})
            ).status_code == 404

    created = await api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                  "completion_window": "24h"})
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 30
    while (await api.get(f"/v1/batches/{batch_id}")).json()["status"] != "completed":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    record = (await api.get("/v1/benchmarks/estimates")).json()["data"]
    assert [r["batch_id"] for r in record] == [batch_id]
    row = record[0]
    assert row["estimated_seconds"] == pytest.approx(made["seconds"], rel=0.05)  # made at start, same inputs
    assert row["actual_seconds"] > 0 and row["requests"] == 30 and row["concurrency"] == 2
    assert abs(row["error_pct"]) < 30, row
    runs = (await api.get("/v1/benchmarks/runs")).json()["data"]
    assert len(runs) == 1 and runs[0]["status"] == "completed"
