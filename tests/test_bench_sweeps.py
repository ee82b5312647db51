"""Sweeps the server runs (``/v1/benchmarks/sweeps``) and the one benchmark contract: what the real server sends
is exactly what ``obatch.client`` and the UI's views parse."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import polars as pl
import pytest
from litestar.testing import AsyncTestClient
from pydantic import BaseModel

from obatch.bench.schemas import BenchConfig, BenchPoint, BenchRun, Sweep
from obatch.client import ApiError, Client
from obatch.config import Settings
from obatch.server import create_app
from obatch.testing.ollama_sim import OllamaSim, SimConfig, SimModel, run_in_thread
from obatch.ui import views
from tests.helpers import chat_line, jsonl
from tests.serverkit import ServerProcess, server_env

CHAT, OTHER = "llama3.2:1b", "qwen2.5:0.5b"
SIM = SimConfig(models=(SimModel(CHAT), SimModel(OTHER)), num_parallel=2, prompt_tps=50_000, decode_tps=2000,
                default_output_tokens=4096)
SLOW = SimConfig(models=(SimModel(CHAT),), num_parallel=2, prompt_tps=50_000, decode_tps=150,
                 default_output_tokens=4096)


@pytest.fixture
def sim_url() -> Iterator[str]:
    url, stop = run_in_thread(SIM)
    try:
        yield url
    finally:
        stop()


def fields_of(model: type[BaseModel], sent: dict[str, Any]) -> None:
    """Every field the server sent is one the wire model declares, and every declared field was sent."""
    assert set(sent) == set(model.model_fields), (model.__name__, set(sent) ^ set(model.model_fields))


def test_a_sweep_on_the_server_and_the_contract_the_ui_parses(tmp_path: Path, sim_url: str) -> None:
    """A real ``obatch serve`` on the simulator: a sweep started through the client runs on the server's backend
    into its store; every benchmark answer has exactly the wire models' fields, and the UI's views, fed by the
    client, show the best configuration the server names."""
    server = ServerProcess.start(tmp_path / "data", server_env(tmp_path / "data", sim_url))
    try:
        with Client(server.url) as api:
            started = api.start_sweep(models=[CHAT, OTHER], num_ctx=[2048], concurrency=[1, 2], requests=4,
                                      workload="tiny")
            assert (started.status, started.points_total, started.points_done) in (("queued", 4, 0),
                                                                                   ("in_progress", 4, 0))
            seen: list[int] = []
            done = api.wait_sweep(started.id, poll=0.2, timeout=120, on_progress=lambda s: seen.append(s.points_done))
            assert done.status == "completed", done
            assert done.points_done == 4 and done.backend == "ollama" and done.run_id and done.error is None
            assert seen == sorted(seen) and seen[-1] == 4
            assert [s.id for s in api.list_sweeps()] == [started.id]

            raw = httpx.get(f"{server.url}/v1/benchmarks/models").json()["data"]
            fields_of(BenchConfig, raw[0])
            fields_of(BenchPoint, httpx.get(f"{server.url}/v1/benchmarks/models/{CHAT}").json()["data"][0])
            compared = httpx.get(f"{server.url}/v1/benchmarks/compare", params={"models": f"{CHAT},{OTHER}"})
            fields_of(BenchConfig, compared.json()["data"][0])
            fields_of(BenchRun, httpx.get(f"{server.url}/v1/benchmarks/runs").json()["data"][0])
            fields_of(Sweep, httpx.get(f"{server.url}/v1/benchmarks/sweeps/{started.id}").json())

            # the UI's path: client → wire models → views; its best table is the server's best, row for row
            best = api.benchmark_models()
            assert {b.model for b in best} == {CHAT, OTHER} and all(b.best for b in best)
            table = views.best_table(views.configs_frame(best))
            assert sorted(table.select("model", "num_ctx", "concurrency").rows()) == \
                sorted((b.model, b.num_ctx, b.concurrency) for b in best)
            points = views.points_frame(api.benchmark_history(CHAT))
            assert points.height == 2 and set(points["backend"].to_list()) == {"ollama"}
            assert points["output_tps"].min() > 0 and points["latency_p50"].min() > 0
            compare = api.benchmark_compare([CHAT, OTHER])
            assert {(c.model, c.num_ctx, c.concurrency) for c in compare if c.best} == \
                {(b.model, b.num_ctx, b.concurrency) for b in best}

            # export: every point with its run's environment
            csv = pl.read_csv(io.BytesIO(api.export_benchmarks("csv")))
            assert csv.height == 4 and {"env_cpu_count", "env_obatch", "env_engine_version", "output_tps",
                                        "latency_p99", "run_name"} <= set(csv.columns)
            exported = orjson.loads(api.export_benchmarks("json", models=[CHAT]))
            assert len(exported["points"]) == 2 and exported["runs"][0]["environment"]["backend"] == "ollama"
            assert httpx.get(f"{server.url}/v1/benchmarks/export", params={"format": "xml"}).status_code == 400

            # bad input: OpenAI's error shape, naming the parameter
            for body, param in (({"models": [CHAT], "concurrency": [0]}, "concurrency"),
                                ({"models": []}, "models"), ({"models": [CHAT], "speed": 1}, "speed"),
                                ({"models": [CHAT, OTHER], "num_ctx": list(range(1, 17)),
                                  "concurrency": list(range(1, 17))},
                                 "concurrency")):
                answer = httpx.post(f"{server.url}/v1/benchmarks/sweeps", json=body)
                assert answer.status_code == 400, answer.text
                error = answer.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and param in str(error["param"]), error
            with pytest.raises(ApiError) as missing:
                api.get_sweep("sweep-nope")
            assert missing.value.status == 404
            with pytest.raises(ApiError) as finished:
                api.cancel_sweep(started.id)
            assert finished.value.status == 409 and finished.value.code == "sweep_not_active"

        # the CLI's door: `obatch bench --server URL` starts one, waits, prints the server's points
        cli = subprocess.run([sys.executable, "-m", "obatch", "bench", "--server", server.url, "-m", OTHER,
                              "--num-ctx", "4096", "-c", "1", "-n", "2", "-w", "tiny"],
                             capture_output=True, text=True, timeout=120, env=server_env(tmp_path / "x", sim_url))
        assert cli.returncode == 0, cli.stderr
        assert "1 of 1 point(s)" in cli.stdout and f"{OTHER}: best configuration" in cli.stdout, cli.stdout
        with Client(server.url) as api:
            assert (4096, 1) in {(p.num_ctx, p.concurrency) for p in api.benchmark_history(OTHER)}
        written = subprocess.run([sys.executable, "-m", "obatch", "bench-export", str(tmp_path / "p.json"),
                                  "--server", server.url], capture_output=True, text=True, timeout=60)
        assert written.returncode == 0, written.stderr
        assert len(orjson.loads((tmp_path / "p.json").read_bytes())["points"]) == 5
        refused = subprocess.run([sys.executable, "-m", "obatch", "bench", "--server", server.url, "-m", OTHER,
                                  "-w", "data/samples/chat.jsonl"], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "cannot run on a server" in refused.stderr, refused.stderr
    finally:
        server.stop()


def test_a_killed_server_resumes_its_sweep_measuring_only_the_missing_points(tmp_path: Path) -> None:
    url, stop = run_in_thread(SLOW)
    data = tmp_path / "data"
    env = server_env(data, url)
    server = ServerProcess.start(data, env)
    try:
        with Client(server.url) as api:
            made = api.start_sweep(models=[CHAT], num_ctx=[1024, 2048], concurrency=[1, 2], requests=3,
                                   workload="short")
            deadline = time.monotonic() + 120
            while api.get_sweep(made.id).points_done < 1:
                assert time.monotonic() < deadline, api.get_sweep(made.id)
                time.sleep(0.1)
        server.kill()
        server = ServerProcess.start(data, env)
        with Client(server.url) as api:
            before = api.get_sweep(made.id)
            assert before.status == "in_progress" and 1 <= before.points_done < 4
            done = api.wait_sweep(made.id, poll=0.2, timeout=180)
            assert done.status == "completed" and done.points_done == 4, done
            points = api.benchmark_history(CHAT)
            assert sorted((p.num_ctx, p.concurrency) for p in points) == [(1024, 1), (1024, 2), (2048, 1),
                                                                          (2048, 2)]
            assert {p.run_id for p in points} == {done.run_id}
    finally:
        server.stop()
        stop()


@pytest.fixture
async def app(tmp_path: Path, make_settings: Callable[..., Settings]) -> AsyncIterator[AsyncTestClient[Any]]:
    async with OllamaSim(SLOW) as sim:
        settings = make_settings(sim.url, worker_poll_interval=0.05, concurrency=2, worker_thread=False,
                                 api_keys="sk-alice-0123456789,sk-bob-0123456789", admin_keys="sk-admin-0123456789",
                                 tenant_sweeps=True, max_sweep_requests=10**6, sweep_requests_per_day=10**6)
        async with AsyncTestClient(app=create_app(settings)) as client:
            yield client


ALICE = {"Authorization": "Bearer sk-alice-0123456789"}
BOB = {"Authorization": "Bearer sk-bob-0123456789"}
ADMIN = {"Authorization": "Bearer sk-admin-0123456789"}


async def _sweep(app: AsyncTestClient[Any], sweep_id: str, headers: dict[str, str]) -> Sweep:
    response = await app.get(f"/v1/benchmarks/sweeps/{sweep_id}", headers=headers)
    assert response.status_code == 200, response.text
    return Sweep.model_validate(response.json())


async def _until(app: AsyncTestClient[Any], sweep_id: str, check: Callable[[Sweep], bool],
                 within: float = 120) -> Sweep:
    deadline = time.monotonic() + within
    while not check(found := await _sweep(app, sweep_id, ALICE)):
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)
    return found


@pytest.mark.usefixtures("db_url")
async def test_a_sweep_waits_for_batches_and_belongs_to_its_key(app: AsyncTestClient[Any]) -> None:
    upload = await app.post("/v1/files", headers=ALICE, files={"file": ("b.jsonl", jsonl(
        [chat_line(f"q{i}", "Tell me a long story.", model=CHAT, max_tokens=150) for i in range(6)]))},
        data={"purpose": "batch"})
    batch = (await app.post("/v1/batches", headers=ALICE, json={
        "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})).json()
    made = await app.post("/v1/benchmarks/sweeps", headers=ALICE, json={
        "models": [CHAT], "num_ctx": [2048], "concurrency": [1], "requests": 2, "workload": "tiny"})
    assert made.status_code == 200, made.text
    sweep_id = made.json()["id"]
    waiting = await _until(app, sweep_id, lambda s: "waiting for" in (s.current or "") or not s.active)
    assert waiting.points_done == 0 and "batch" in str(waiting.current), waiting  # measured only after the batch
    assert (await app.get(f"/v1/benchmarks/sweeps/{sweep_id}", headers=BOB)).status_code == 404
    assert (await app.post(f"/v1/benchmarks/sweeps/{sweep_id}/cancel", headers=BOB)).status_code == 404
    assert (await app.get("/v1/benchmarks/sweeps", headers=BOB)).json()["data"] == []
    assert [s["id"] for s in (await app.get("/v1/benchmarks/sweeps", headers=ADMIN)).json()["data"]] == [sweep_id]
    done = await _until(app, sweep_id, lambda s: not s.active)
    assert done.status == "completed" and done.points_done == 1, done
    finished = (await app.get(f"/v1/batches/{batch['id']}", headers=ALICE)).json()
    assert finished["status"] == "completed"
    point = (await app.get(f"/v1/benchmarks/models/{CHAT}", headers=ALICE)).json()["data"][0]
    assert point["created_at"] >= finished["completed_at"] - 1  # measured after the batch had finished


@pytest.mark.usefixtures("db_url")
async def test_cancel_keeps_the_points_measured_so_far(app: AsyncTestClient[Any]) -> None:
    made = await app.post("/v1/benchmarks/sweeps", headers=ALICE, json={
        "models": [CHAT], "num_ctx": [1024, 2048, 4096], "concurrency": [1, 2], "requests": 3, "workload": "short"})
    sweep_id = made.json()["id"]
    await _until(app, sweep_id, lambda s: s.points_done >= 1)
    cancelling = await app.post(f"/v1/benchmarks/sweeps/{sweep_id}/cancel", headers=ALICE)
    assert cancelling.status_code == 200 and cancelling.json()["status"] in ("cancelling", "cancelled")
    done = await _until(app, sweep_id, lambda s: not s.active, within=30)
    assert done.status == "cancelled" and 1 <= done.points_done < 6, done
    points = (await app.get(f"/v1/benchmarks/models/{CHAT}", headers=ALICE)).json()["data"]
    assert len(points) == done.points_done
    queued = await app.post("/v1/benchmarks/sweeps", headers=ALICE, json={"models": [CHAT], "concurrency": [1]})
    again = await app.post(f"/v1/benchmarks/sweeps/{queued.json()['id']}/cancel", headers=ALICE)
    assert again.json()["status"] in ("cancelled", "cancelling")


@pytest.mark.usefixtures("db_url")
async def test_goodput_and_capacity_under_an_slo(app: AsyncTestClient[Any]) -> None:
    made = await app.post("/v1/benchmarks/sweeps", headers=ALICE, json={
        "models": [CHAT], "num_ctx": [2048], "concurrency": [1, 4], "requests": 4, "workload": "tiny"})
    done = await _until(app, made.json()["id"], lambda s: not s.active)
    assert done.status == "completed", done

    async def capacity(slo: str) -> dict[str, Any]:
        answer = await app.get("/v1/benchmarks/capacity", headers=ALICE, params={"model": CHAT, "slo": slo})
        assert answer.status_code == 200, answer.text
        [found] = answer.json()["data"]
        return dict(found)

    loose = await capacity("latency=600s,ttft=60s")
    assert loose["concurrency"] == 4 and loose["slo"] == {"latency": 600_000.0, "ttft": 60_000.0}
    assert [lv["slo_share"] for lv in loose["levels"]] == [1.0, 1.0]
    assert loose["goodput"] == pytest.approx(loose["req_per_s"])
    impossible = await capacity("ttft=0.001ms")
    assert impossible["concurrency"] is None and {lv["goodput"] for lv in impossible["levels"]} == {0.0}
    points = (await app.get(f"/v1/benchmarks/models/{CHAT}", headers=ALICE,
                            params={"slo": "tpot=10s"})).json()["data"]
    assert all(0 < p["goodput"] <= p["req_per_s"] * 1.0001 and p["slo_share"] == 1.0 for p in points)
    for bad in ("ttft", "ttft=fast", "speed=5ms", ""):
        answer = await app.get("/v1/benchmarks/capacity", headers=ALICE, params={"model": CHAT, "slo": bad})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "slo", answer.text


@pytest.mark.usefixtures("db_url")
async def test_a_server_sweep_of_request_rates(app: AsyncTestClient[Any]) -> None:
    """Rates through ``POST /v1/benchmarks/sweeps``: stored as rate points, reported with their capacity over
    rates, never named the best configuration."""
    made = await app.post("/v1/benchmarks/sweeps", headers=ALICE, json={
        "models": [CHAT], "num_ctx": [2048], "concurrency": [1], "rates": [50, 5], "arrival": "constant",
        "requests": 4, "workload": "tiny"})
    assert made.status_code == 200, made.text
    assert made.json()["points_total"] == 3 and made.json()["params"]["rates"] == [5.0, 50.0]
    done = await _until(app, made.json()["id"], lambda s: not s.active)
    assert done.status == "completed" and done.points_done == 3, done
    points = (await app.get(f"/v1/benchmarks/models/{CHAT}", headers=ALICE)).json()["data"]
    assert sorted((p["rate"] or 0, p["arrival"] or "", p["concurrency"]) for p in points) == [
        (0, "", 1), (5.0, "constant", 0), (50.0, "constant", 0)]
    assert all(p["achieved_rate"] > 0 for p in points if p["rate"])
    [best] = (await app.get("/v1/benchmarks/models", headers=ALICE)).json()["data"]
    assert (best["concurrency"], best["rate"]) == (1, None)
    answer = await app.get("/v1/benchmarks/capacity", headers=ALICE, params={"model": CHAT, "slo": "latency=600s"})
    by_load = {c["load"]: c for c in answer.json()["data"]}
    assert by_load["concurrency"]["concurrency"] == 1
    assert (by_load["rate"]["rate"], by_load["rate"]["arrival"]) == (50.0, "constant")
    for body, param in (({"models": [CHAT], "rates": [0]}, "rates"), ({"models": [CHAT], "rates": [1],
                                                                       "arrival": "bursty"}, "arrival"),
                        ({"models": [CHAT], "concurrency": []}, "concurrency")):
        answer = await app.post("/v1/benchmarks/sweeps", headers=ALICE, json=body)
        assert answer.status_code == 400 and param in str(answer.json()["error"]["param"]), answer.text
