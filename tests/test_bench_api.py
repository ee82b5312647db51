"""The benchmark endpoints of the server (Litestar's AsyncTestClient, the simulator behind it): best config per
model, a model's history, compare, estimate (token lengths and an uploaded file), the estimate-vs-actual record."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from obatch.bench.measure import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.server import create_app
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel, run_in_thread
from tests.helpers import chat_line, jsonl
from tests.serverkit import ServerProcess, server_env, settled

CHAT, OTHER = "llama3.2:1b", "qwen2.5:0.5b"


# Decoding slow enough that simulated time, not this process's overhead, makes a batch's duration: the
# estimate-vs-actual check then holds on a loaded machine too (at 3000 tokens/s it missed by 40-70% under load).
SIM = SimConfig(models=(SimModel(CHAT), SimModel(OTHER, context_length=32768)), num_parallel=2, prompt_tps=20_000,
                decode_tps=300, default_output_tokens=4096)


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
    assert (await settled(api, batch_id, pause=0.1))["status"] == "completed"

    record = (await api.get("/v1/benchmarks/estimates")).json()["data"]
    assert [r["batch_id"] for r in record] == [batch_id]
    row = record[0]
    assert row["estimated_seconds"] == pytest.approx(made["seconds"], rel=0.05)  # made at start, same inputs
    assert row["actual_seconds"] > 0 and row["requests"] == 30 and row["concurrency"] == 2
    assert abs(row["error_pct"]) < 30, row
    runs = (await api.get("/v1/benchmarks/runs")).json()["data"]
    assert len(runs) == 1 and runs[0]["status"] == "completed"


@pytest.mark.parametrize("params", [
    {"num_requests": 10**18}, {"num_requests": 0}, {"prompt_tokens": 1e300}, {"prompt_tokens": "nan"},
    {"output_tokens": "inf"}, {"output_tokens": -1}, {"concurrency": 100_000}, {"num_ctx": 10**12},
])
async def test_estimate_parameters_are_bounded(api: AsyncTestClient[Any], params: dict[str, Any]) -> None:
    query = {"model": CHAT, "num_requests": 100, "prompt_tokens": 40, "output_tokens": 30, **params}
    response = await api.get("/v1/benchmarks/estimate", params=query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in query


def test_a_huge_estimate_does_not_freeze_the_server(swept: Path, tmp_path: Path) -> None:
    """3,000,000 requests once built per-request lists on the event loop: 12 s of a frozen server (health, other
    tenants, the worker). On a real ``obatch serve``, the largest workload allowed now costs what a small one does,
    and /health, polled from another thread meanwhile, keeps answering."""
    url, stop = run_in_thread(SIM)
    server = ServerProcess.start(shutil.copytree(swept, tmp_path / "served"),
                                 server_env(tmp_path / "served", url))
    lags: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                lags.append(time.perf_counter() - started)
                time.sleep(0.01)

    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            query = {"model": CHAT, "prompt_tokens": 40, "output_tokens": 30}
            small = http.get("/v1/benchmarks/estimate", params={**query, "num_requests": 1000}).json()
            poller = threading.Thread(target=poll_health)
            poller.start()
            time.sleep(0.2)
            started = time.perf_counter()
            huge = http.get("/v1/benchmarks/estimate", params={**query, "num_requests": 10_000_000})
            elapsed = time.perf_counter() - started
            time.sleep(0.2)
            done.set()
            poller.join(timeout=30)
    finally:
        done.set()
        server.stop()
        stop()
    assert huge.status_code == 200, huge.text
    assert elapsed < 10  # generous for a loaded machine; listing 10^7 requests took minutes
    run = huge.json()["seconds"] - huge.json()["load_seconds"]
    assert run == pytest.approx((small["seconds"] - small["load_seconds"]) * 10_000, rel=0.05)
    assert huge.json()["low"] >= 0 and len(lags) >= 5 and max(lags) < 2, lags


async def test_benchmark_host_details_are_for_admin_keys(swept: Path, tmp_path: Path,
                                                         make_settings: Callable[..., Settings]) -> None:
    data = shutil.copytree(swept, tmp_path / "keyed")
    settings = make_settings("http://127.0.0.1:9", data_dir=data, api_keys="sk-tenant-0123456789",
                             admin_keys="sk-admin-0123456789")
    async with AsyncTestClient(app=create_app(settings)) as client:
        tenant = (await client.get("/v1/benchmarks/runs",
                                   headers={"Authorization": "Bearer sk-tenant-0123456789"})).json()["data"]
        admin = (await client.get("/v1/benchmarks/runs",
                                  headers={"Authorization": "Bearer sk-admin-0123456789"})).json()["data"]
    assert len(tenant) == len(admin) == 1
    assert admin[0]["hostname"] and "cpu" in admin[0] and "notebook_path" in admin[0]
    assert tenant[0]["hostname"] is None and tenant[0]["cpu"] is None and tenant[0]["notebook_path"] is None
    assert tenant[0]["models"] == admin[0]["models"]  # what was measured stays visible to all
