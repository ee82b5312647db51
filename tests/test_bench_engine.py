"""A small real sweep on the embedded llama.cpp engine (SmolLM2-135M): 2 num_ctx × 3 concurrency levels, each a
real engine restart with that many slots, engine timings stored, an estimate made from them. Never in parallel."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from obatch import bench
from obatch.bench.sweep import SweepSpec, run_sweep
from obatch.config import Settings
from obatch.engine import DEFAULT_ALIAS

pytestmark = pytest.mark.engine


async def test_real_engine_sweep_is_stored_and_estimates_from_it(make_settings: Callable[..., Settings]) -> None:
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
    made = await bench.estimate_workload(DEFAULT_ALIAS, settings=settings, num_requests=50, prompt_tokens=20,
                                         output_tokens=10)
    assert made.backend == "local" and made.low < made.seconds < made.high and made.points
    assert made.load_seconds > 0
