"""A small real sweep on the embedded llama.cpp engine (SmolLM2-135M): 2 num_ctx × 3 concurrency levels, each a
real engine restart with that many slots, engine timings stored, served by the four benchmark endpoints, an
estimate made from them, and charted by notebooks/report.ipynb (papermill). Never in parallel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from obatch import bench
from obatch.bench.cli import run_notebook
from obatch.bench.measure import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.engine import DEFAULT_ALIAS
from obatch.server import create_app
from tests.helpers import ROOT, notebook_outputs

pytestmark = pytest.mark.engine


async def test_real_engine_sweep_is_stored_served_estimated_and_charted(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(backend="local")
    spec = SweepSpec(models=[DEFAULT_ALIAS], num_ctx=[512, 1024], concurrency=[1, 2, 4], requests=4,
                     workload="tiny", warmup=1, seed=3)

    report = await run_sweep(spec, settings=settings, progress=False)

    assert len(report.measured) == 6
    frames = await bench.load_report(settings=settings)
    points = frames.points
    assert points.height == 6 and (points["backend"] == "local").all()
    assert (points["n_completed"] == 4).all() and not points["excluded"].any()
    assert (points["load_seconds"] > 0).all()  # every point restarted llama.cpp with its num_ctx and slots
    assert (points["gen_tps"] > 0).all() and (points["prompt_tps"] > 0).all()  # llama.cpp's own timings
    assert (points["ttft_p50"] > 0).all() and points["engine_version"][0].startswith("xllamacpp")
    env = frames.runs.row(0, named=True)
    assert env["cpu"] and env["hostname"]

    async with AsyncTestClient(app=create_app(settings)) as api:
        [best] = (await api.get("/v1/benchmarks/models")).json()["data"]
        assert best["model"] == DEFAULT_ALIAS and best["backend"] == "local" and best["req_per_s"] > 0
        history = (await api.get(f"/v1/benchmarks/models/{DEFAULT_ALIAS}", params={"num_ctx": 1024})).json()["data"]
        assert sorted(p["concurrency"] for p in history) == [1, 2, 4]
        side = (await api.get("/v1/benchmarks/compare", params={"models": DEFAULT_ALIAS, "num_ctx": 512})).json()
        assert len(side["data"]) == 3
        response = await api.get("/v1/benchmarks/estimate", params={
            "model": DEFAULT_ALIAS, "num_requests": 50, "prompt_tokens": 20, "output_tokens": 10})
        assert response.status_code == 200, response.text
        made = response.json()
    assert made["backend"] == "local" and made["low"] < made["seconds"] < made["high"] and made["points"]
    assert made["load_seconds"] > 0 and made["num_ctx"] in (512, 1024)

    charted = await asyncio.to_thread(run_notebook, ROOT / "notebooks" / "report.ipynb", tmp_path / "report.ipynb",
                                      {"data_dir": str(settings.data_dir)}, cwd=ROOT)
    texts = notebook_outputs(charted)
    assert sum("vega" in t for t in texts) >= 4 and any(DEFAULT_ALIAS in t for t in texts)
