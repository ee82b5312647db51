"""Benchmarks that come true: measure points (engine timings, client TTFT/ITL, completed-only throughput), sweep
models × num_ctx × concurrency resumably, store them, view them as polars frames, and estimate workloads from them.

    report = await bench.run_sweep(bench.SweepSpec(models=["smollm2:135m"], num_ctx=[2048, 8192],
                                                   concurrency=[1, 2, 4], requests=32))
    frames = await bench.load_report("data")
    guess = await bench.estimate_workload("smollm2:135m", num_requests=500, prompt_tokens=300,
                                          output_tokens=120)
    made = await bench.estimate_file("data/samples/chat.jsonl", pilot="auto")  # a file, after a pilot of it

Charts live in ``obatch.bench.charts`` (imported on demand: altair is only needed there).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from obatch._lazy import lazy_names

if TYPE_CHECKING:
    from obatch.bench.estimate import ConfigFit, Estimate, Shape, estimate, estimates_vs_actuals, fits_for
    from obatch.bench.frames import Report, load_report
    from obatch.bench.measure import PointKey, SweepReport, SweepSpec, measure_point, plan, run_sweep, sweep_with
    from obatch.bench.metrics import Sample, percentile, summarise
    from obatch.bench.workloads import WORKLOADS, Lengths, Workload, parse_workload
    from obatch.config import Settings
    from obatch.protocol import DurationEstimate

# Names load on first use (PEP 562): `obatch.bench.cli` is part of every `obatch` command line, and the frames
# (polars) and the store behind these names are a large part of start-up that `obatch run` does not need.
_HOME = {
    **dict.fromkeys(["ConfigFit", "Estimate", "Shape", "estimate", "estimates_vs_actuals", "fits_for"],
                    "obatch.bench.estimate"),
    **dict.fromkeys(["Sample", "percentile", "summarise"], "obatch.bench.metrics"),
    **dict.fromkeys(["PointKey", "SweepReport", "SweepSpec", "measure_point", "plan", "run_sweep", "sweep_with"],
                    "obatch.bench.measure"),
    **dict.fromkeys(["Report", "load_report", "store_settings"], "obatch.bench.frames"),
    **dict.fromkeys(["WORKLOADS", "Lengths", "Workload", "parse_workload"], "obatch.bench.workloads"),
}
__getattr__ = lazy_names(__name__, _HOME, globals())


__all__ = [
    "WORKLOADS", "ConfigFit", "Estimate", "Lengths", "PointKey", "Report", "Sample", "Shape", "SweepReport",
    "SweepSpec", "Workload", "estimate", "estimate_file", "estimate_workload", "estimates_vs_actuals", "fits_for",
    "load_report", "measure_point", "parse_workload", "percentile", "plan", "run_sweep", "run_sweep_notebook",
    "summarise", "sweep_with",
]


def _as_list(value: Any, cast: type) -> list[Any]:
    """A list parameter given as a list, a single value, or a comma-separated string (CLI / papermill)."""
    if isinstance(value, str):
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return [cast(v) for v in value]
    return [cast(value)]


async def run_sweep_notebook(*, backend: str | None = None, url: str | None = None, models: Any,
                             num_ctx: Any, concurrency: Any, requests: int = 32, workload: str = "chat",
                             repeats: int = 1, warmup: int = 1, seed: int = 0, max_failure_rate: float = 0.05,
                             name: str = "", data_dir: str | Path | None = None,
                             output_notebook: str | None = None, progress: bool = True) -> Report:
    """The sweep notebook's one call: build the spec from its parameters, run (or resume) the sweep, record the
    parameters and the executed notebook's path with the run, and return the run's frames."""
    from obatch.bench.frames import load_report, store_settings
    from obatch.bench.measure import SweepSpec, run_sweep

    params: dict[str, Any] = {
        "backend": backend, "url": url, "models": _as_list(models, str), "num_ctx": _as_list(num_ctx, int),
        "concurrency": _as_list(concurrency, int), "requests": int(requests), "workload": workload,
        "repeats": int(repeats), "warmup": int(warmup), "seed": int(seed),
        "max_failure_rate": float(max_failure_rate), "name": name,
    }
    spec = SweepSpec(**params)
    settings = store_settings(data_dir)
    report = await run_sweep(spec, settings=settings, progress=progress,
                             params=params | {"data_dir": str(settings.data_dir)}, notebook=output_notebook)
    return await load_report(settings=settings, run_id=report.run_id)


async def estimate_workload(model: str, *, data_dir: str | Path | None = None, settings: Settings | None = None,
                            **kwargs: Any) -> Estimate:
    """``estimate`` on the store of ``data_dir`` (or ``settings``): for notebooks and scripts."""
    from obatch.bench.estimate import estimate
    from obatch.bench.frames import store_settings
    from obatch.store.db import open_store

    engine, sessions = await open_store(store_settings(data_dir, settings).db_url)
    try:
        async with sessions() as session:
            return await estimate(session, model, **kwargs)
    finally:
        await engine.dispose()


async def estimate_file(path: str | Path, *, pilot: int | str | None = None, backend: str | None = None,
                        data_dir: str | Path | None = None, settings: Settings | None = None,
                        **kwargs: Any) -> DurationEstimate:
    """How long a batch file will take, as ``obatch estimate --file`` and the server's estimate endpoint answer:
    ``pilot`` (lines, or ``"auto"``) runs a random sample of the file first on the settings' engine, whose batch
    later takes those lines as finished. ``backend``: prefer points measured on it; ``kwargs``: ``model``,
    ``num_ctx``, ``concurrency``."""
    import asyncio

    from obatch.bench.estimate.request import EstimateRequest, estimate_groups
    from obatch.bench.frames import store_settings
    from obatch.bench.pilot_run import file_sha256, pilot_size
    from obatch.bench.service import combined, piloted
    from obatch.store.db import open_store

    chosen, file, pilot = store_settings(data_dir, settings), Path(path), pilot_size(pilot)
    if not await asyncio.to_thread(file.is_file):
        from obatch import errors

        raise errors.ConfigError(f"No such file: {file}")
    engine, sessions = await open_store(chosen.db_url)
    try:
        async with sessions() as session:
            if pilot is None:
                sha = await asyncio.to_thread(file_sha256, file)
                return combined(await estimate_groups(session, EstimateRequest(backend=backend, file=file,
                                                                               file_sha256=sha, **kwargs)))
            from obatch.backends import open_backend

            opened = await open_backend(chosen)
            try:
                return await piloted(session, sessions, chosen, opened, file, pilot, backend=opened.name, **kwargs)
            finally:
                await opened.aclose()
    finally:
        await engine.dispose()
