"""Polars frames of the benchmark store, for notebooks, the UI, the CLI and the REST API.

``points`` is one row per measured point (a repeat of a configuration); ``summary`` folds repeats into one row per
configuration with the mean and the spread, leaving out points marked ``excluded`` (too many failures);
``saturation`` says, per model and num_ctx, the concurrency beyond which throughput stops growing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from sqlalchemy.ext.asyncio import AsyncSession

from obatch import errors
from obatch.bench.best import best_config
from obatch.bench.estimate.history import estimates_vs_actuals
from obatch.bench.schemas import BenchPoint
from obatch.config import Settings
from obatch.store import bench_repo
from obatch.store.bench_tables import BenchPointRow, BenchRunRow
from obatch.store.db import open_store

CONFIG = ["run_id", "backend", "model", "num_ctx", "concurrency", "rate", "arrival"]  # rate: None for concurrency
SATURATION_GAIN = 0.10  # a level that adds less than this share of throughput is past saturation

POINT_SCHEMA: dict[str, Any] = {
    "id": pl.Int64, "run_id": pl.Utf8, "backend": pl.Utf8, "model": pl.Utf8, "num_ctx": pl.Int64,
    "concurrency": pl.Int64, "repeat": pl.Int64, "rate": pl.Float64, "arrival": pl.Utf8,
    "achieved_rate": pl.Float64, "workload": pl.Utf8, "created_at": pl.Float64,
    "engine_version": pl.Utf8, "quantization": pl.Utf8, "parameter_size": pl.Utf8, "n_requests": pl.Int64,
    "n_completed": pl.Int64, "n_failed": pl.Int64, "success_rate": pl.Float64, "excluded": pl.Boolean,
    "wall_seconds": pl.Float64, "load_seconds": pl.Float64, "req_per_s": pl.Float64, "output_tps": pl.Float64,
    "prompt_tps": pl.Float64, "gen_tps": pl.Float64, "prompt_tokens_mean": pl.Float64,
    "completion_tokens_mean": pl.Float64,
    **{f"{m}_{s}": pl.Float64 for m in ("latency", "ttft", "tpot", "itl") for s in ("mean", "p50", "p90", "p99")},
    "errors_json": pl.Utf8, "samples_json": pl.Utf8,
}
ESTIMATE_SCHEMA: dict[str, Any] = {
    "batch_id": pl.Utf8, "source": pl.Utf8, "backend": pl.Utf8, "models": pl.Utf8, "requests": pl.Int64,
    "completed": pl.Int64, "concurrency": pl.Int64, "created_at": pl.Int64, "estimated_seconds": pl.Float64,
    "low": pl.Float64, "high": pl.Float64, "actual_seconds": pl.Float64, "error_pct": pl.Float64,
    "within_interval": pl.Boolean, "actual_req_per_s": pl.Float64,
}


def points_frame_of(rows: list[BenchPointRow]) -> pl.DataFrame:
    return pl.DataFrame([{k: getattr(r, k) for k in POINT_SCHEMA} for r in rows], schema=POINT_SCHEMA)


def frame_of_points(points: Sequence[BenchPoint]) -> pl.DataFrame:
    """Wire points back into the store's frame (what a client, or a test's fake server, summarises)."""
    records = []
    for p in points:
        record = p.model_dump(exclude={"errors", "sample_responses"})
        record |= {"errors_json": orjson.dumps(p.errors).decode(),
                   "samples_json": orjson.dumps(p.sample_responses).decode()}
        records.append({k: record.get(k) for k in POINT_SCHEMA})
    return pl.DataFrame(records, schema=POINT_SCHEMA)


async def points(session: AsyncSession, **filters: Any) -> pl.DataFrame:
    """Every point (filters: run_id, models, num_ctx, concurrency, backend, include_excluded)."""
    return points_frame_of(await bench_repo.list_points(session, **filters))


async def runs(session: AsyncSession) -> pl.DataFrame:
    """One row per sweep run, with its parameters and the machine it ran on."""
    records = []
    for r in await bench_repo.list_runs(session):
        env = orjson.loads(r.environment_json or "{}")
        records.append({
            "id": r.id, "name": r.name, "status": r.status, "created_at": r.created_at,
            "finished_at": r.finished_at, "backend": r.backend, "workload": r.workload,
            "models": ",".join(orjson.loads(r.models_json)), "num_ctx": orjson.dumps(orjson.loads(r.num_ctx_json)
                                                                                     ).decode(),
            "concurrency": orjson.dumps(orjson.loads(r.concurrency_json)).decode(), "rates": _rates_of(r),
            "requests": r.requests,
            "repeats": r.repeats, "hostname": env.get("hostname"), "cpu": env.get("cpu"),
            "engine_version": env.get("engine_version"), "obatch_version": r.obatch_version,
            "notebook_path": r.notebook_path,
        })
    schema = {"id": pl.Utf8, "name": pl.Utf8, "status": pl.Utf8, "created_at": pl.Float64,
              "finished_at": pl.Float64, "backend": pl.Utf8, "workload": pl.Utf8, "models": pl.Utf8,
              "num_ctx": pl.Utf8, "concurrency": pl.Utf8, "rates": pl.Utf8, "requests": pl.Int64, "repeats": pl.Int64,
              "hostname": pl.Utf8, "cpu": pl.Utf8, "engine_version": pl.Utf8, "obatch_version": pl.Utf8,
              "notebook_path": pl.Utf8}
    return pl.DataFrame(records, schema=schema)


def _rates_of(run: BenchRunRow) -> str | None:
    """``[2.0,4.0] poisson`` (``, ≤ 8 in flight``): the request rates a run measured, None for none."""
    if not run.rates_json:
        return None
    load = orjson.loads(run.rates_json)
    cap = load.get("max_concurrency") or 0
    return f"{orjson.dumps(load['rates']).decode()} {load['arrival']}" + (f", ≤ {cap} in flight" if cap else "")


def summary(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per configuration: means over the non-excluded repeats, with the spread of the throughputs."""
    kept = frame.filter(~pl.col("excluded"))
    return (
        kept.group_by(CONFIG, maintain_order=True)
        .agg(
            pl.len().alias("repeats"),
            pl.col("n_completed").sum(), pl.col("n_failed").sum(),
            pl.col("req_per_s").mean(), pl.col("req_per_s").std().alias("req_per_s_std"),
            pl.col("output_tps").mean(), pl.col("output_tps").std().alias("output_tps_std"),
            pl.col("gen_tps").mean(), pl.col("prompt_tps").mean(),
            pl.col("latency_mean").mean(), pl.col("latency_p50").mean(), pl.col("latency_p90").mean(),
            pl.col("latency_p99").mean(), pl.col("ttft_p50").mean(), pl.col("ttft_p90").mean(),
            pl.col("tpot_p50").mean(), pl.col("itl_p50").mean(), pl.col("load_seconds").mean(),
            pl.col("success_rate").mean(), pl.col("achieved_rate").mean(), pl.col("created_at").max(),
        )
        .join(frame.group_by(CONFIG).agg(pl.col("excluded").sum().alias("excluded")), on=CONFIG, how="left",
              nulls_equal=True)
        .sort(["model", "num_ctx", "rate", "concurrency"], nulls_last=False)
    )


def saturation(summary_frame: pl.DataFrame) -> pl.DataFrame:
    """Per (run, model, num_ctx): the concurrency where throughput saturates — the first level whose next level
    adds less than ``SATURATION_GAIN`` of req/s (the highest level when it keeps growing)."""
    rows = []
    closed = summary_frame.filter(pl.col("rate").is_null())  # the concurrency levels, not the request rates
    for key, group in closed.sort("concurrency").group_by(["run_id", "model", "num_ctx"], maintain_order=True):
        levels = group.select("concurrency", "req_per_s").rows()
        chosen = levels[-1]
        for (c, rps), (_, next_rps) in itertools.pairwise(levels):
            if rps > 0 and (next_rps - rps) / rps < SATURATION_GAIN:
                chosen = (c, rps)
                break
        rows.append({"run_id": key[0], "model": key[1], "num_ctx": key[2], "saturates_at": chosen[0],
                     "req_per_s": chosen[1], "still_growing": chosen == levels[-1] and len(levels) > 1
                     and (levels[-1][1] - levels[-2][1]) / max(levels[-2][1], 1e-9) >= SATURATION_GAIN})
    schema = {"run_id": pl.Utf8, "model": pl.Utf8, "num_ctx": pl.Int64, "saturates_at": pl.Int64,
              "req_per_s": pl.Float64, "still_growing": pl.Boolean}
    return pl.DataFrame(rows, schema=schema)


def latest_configs(summary_frame: pl.DataFrame) -> pl.DataFrame:
    """Per (backend, model, num_ctx, concurrency): the summary row of the newest run that measured it (a later
    sweep of a few levels updates those and leaves the others as they were measured)."""
    if summary_frame.is_empty():
        return summary_frame
    return (summary_frame.sort("created_at").group_by(CONFIG[1:], maintain_order=True).last()
            .select(summary_frame.columns).sort(["model", "num_ctx", "rate", "concurrency"], nulls_last=False))


def mark_best(summary_frame: pl.DataFrame) -> pl.DataFrame:
    """``summary_frame`` with a ``best`` column: True on each (backend, model)'s best row (``obatch.bench.best``)."""
    chosen: set[tuple[Any, ...]] = set()
    for _, group in summary_frame.group_by(["backend", "model"], maintain_order=True):
        best = best_config(group.to_dicts())
        if best is not None:
            chosen.add(tuple(best[c] for c in CONFIG))
    keys = [tuple(row) for row in summary_frame.select(CONFIG).rows()]
    return summary_frame.with_columns(pl.Series("best", [k in chosen for k in keys], dtype=pl.Boolean))


def best_configs(summary_frame: pl.DataFrame) -> pl.DataFrame:
    """Per model (and backend), its best configuration by the one rule of ``obatch.bench.best``, over each
    configuration's newest measurement. A model none of whose configurations qualifies has no row."""
    if summary_frame.is_empty():
        return summary_frame.with_columns(pl.lit(False).alias("best"))
    return mark_best(latest_configs(summary_frame)).filter(pl.col("best")).sort("model")


def pareto_front(frame: pl.DataFrame, *, latency: str = "latency_p50", throughput: str = "output_tps"
                 ) -> pl.DataFrame:
    """``frame`` (rows with model, latency and throughput) with a ``pareto`` column: True where no other row of
    the same model has lower-or-equal latency and higher-or-equal throughput, and is better in one of them."""
    rows = frame.drop_nulls([latency, throughput])
    flags = []
    for row in rows.iter_rows(named=True):
        same = rows.filter(pl.col("model") == row["model"])
        dominated = same.filter((pl.col(latency) <= row[latency]) & (pl.col(throughput) >= row[throughput])
                                & ((pl.col(latency) < row[latency]) | (pl.col(throughput) > row[throughput])))
        flags.append(dominated.is_empty())
    return rows.with_columns(pl.Series("pareto", flags, dtype=pl.Boolean))


async def estimates(session: AsyncSession) -> pl.DataFrame:
    """Estimate vs actual of every finished batch that was estimated before it ran."""
    return pl.DataFrame(await estimates_vs_actuals(session), schema=ESTIMATE_SCHEMA)


HOST_FIELDS = ("hostname", "cpu", "notebook_path")  # what a benchmark run tells about the machine and its files


async def export(session: AsyncSession, fmt: str, *, models: list[str] | None = None,
                 host_details: bool = True) -> bytes:
    """Every point (of ``models``) with the environment of the run that measured it: CSV (one row per point, the
    run's environment in ``env_*`` columns) or JSON (``{"runs": [... with "environment"], "points": [...]}``).
    Without ``host_details`` the machine's name, CPU and notebook paths and the runs' names are left out."""
    if fmt not in ("csv", "json"):
        raise errors.ConfigError(f"format is csv or json; got {fmt!r}.", param="format")
    rows = await bench_repo.list_points(session, models=models)
    runs = {r.id: r for r in await bench_repo.list_runs(session)}
    environments = {}
    for run_id, run in runs.items():
        env = {k: v for k, v in orjson.loads(run.environment_json or "{}").items()
               if k != "models" and (host_details or k not in HOST_FIELDS)}
        environments[run_id] = env
    frame = points_frame_of(rows)
    if fmt == "json":
        used = sorted({r.run_id for r in rows})
        body = {"object": "benchmark.export", "runs": [
            {"id": i, "name": runs[i].name if host_details else "", "backend": runs[i].backend,
             "workload": runs[i].workload,
             "created_at": runs[i].created_at, "notebook_path": runs[i].notebook_path if host_details else None,
             "environment": environments[i]} for i in used if i in runs],
            "points": [{**r, "errors": orjson.loads(r.pop("errors_json") or "{}"),
                        "sample_responses": orjson.loads(r.pop("samples_json") or "[]")} for r in frame.to_dicts()]}
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2)
    keys = sorted({k for env in environments.values() for k in env})
    env_rows = [{"run_id": i, "run_name": runs[i].name if host_details else "",
                 **{f"env_{k}": None if environments[i].get(k) is None else
                    (orjson.dumps(environments[i][k]).decode() if isinstance(environments[i][k], list | dict)
                     else str(environments[i][k])) for k in keys}} for i in runs]
    env_frame = pl.DataFrame(env_rows, schema={"run_id": pl.Utf8, "run_name": pl.Utf8,
                                               **{f"env_{k}": pl.Utf8 for k in keys}})
    return frame.drop("samples_json").join(env_frame, on="run_id", how="left").write_csv().encode()


def store_settings(data_dir: str | Path | None = None, settings: Settings | None = None) -> Settings:
    """``settings`` when given, else the environment's settings with ``data_dir`` (when given) as the store."""
    if settings is not None:
        return settings
    return Settings(data_dir=Path(data_dir)) if data_dir is not None else Settings()


@dataclass
class Report:
    runs: pl.DataFrame
    points: pl.DataFrame
    summary: pl.DataFrame
    saturation: pl.DataFrame
    best: pl.DataFrame
    estimates: pl.DataFrame


async def load_report(data_dir: str | Path | None = None, *, settings: Settings | None = None,
                      run_id: str | None = None, models: list[str] | None = None) -> Report:
    """Every frame the report notebook charts, read from the store of ``data_dir`` (or ``settings``)."""
    engine, sessions = await open_store(store_settings(data_dir, settings).db_url)
    try:
        async with sessions() as session:
            all_points = await points(session, run_id=run_id, models=models)
            summary_frame = summary(all_points)
            return Report(runs=await runs(session), points=all_points, summary=summary_frame,
                          saturation=saturation(summary_frame), best=best_configs(summary_frame),
                          estimates=await estimates(session))
    finally:
        await engine.dispose()
