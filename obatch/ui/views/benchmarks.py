"""Benchmark points from the API → one tidy frame → the Benchmarks page's curves, comparisons and best table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import altair as alt
import polars as pl

from obatch.ui.views._values import flatten, integer, number

BENCH_COLUMNS: dict[str, tuple[str, ...]] = {
    "model": ("model", "model_id", "name"),
    "num_ctx": ("num_ctx", "context", "context_window", "n_ctx"),
    "concurrency": ("concurrency", "parallel", "num_parallel"),
    "tokens_per_s": ("tokens_per_s", "output_tps", "output_tokens_per_s", "tokens_per_second", "tps"),
    "requests_per_s": ("requests_per_s", "req_per_s", "requests_per_second", "rps"),
    "latency_p50_ms": ("latency_p50_ms", "latency_p50", "p50_latency_ms", "latency_ms_p50", "p50_ms"),
    "latency_p90_ms": ("latency_p90_ms", "latency_p90", "p90_latency_ms", "latency_ms_p90", "p90_ms"),
    "latency_p99_ms": ("latency_p99_ms", "latency_p99", "p99_latency_ms", "latency_ms_p99", "p99_ms"),
    "ttft_p50_ms": ("ttft_p50_ms", "ttft_p50", "p50_ttft_ms", "ttft_ms_p50"),
    "gen_tps": ("gen_tps", "decode_tps"),
    "success_rate": ("success_rate",),
    "num_requests": ("num_requests", "n_requests", "requests"),
    "run_id": ("run_id",),
    "excluded": ("excluded",),
    "backend": ("backend",),
    "created_at": ("created_at", "measured_at", "timestamp", "finished_at"),
}
BENCH_SCHEMA = {
    "model": pl.Utf8, "num_ctx": pl.Int64, "concurrency": pl.Int64, "tokens_per_s": pl.Float64,
    "requests_per_s": pl.Float64, "latency_p50_ms": pl.Float64, "latency_p90_ms": pl.Float64,
    "latency_p99_ms": pl.Float64, "ttft_p50_ms": pl.Float64, "gen_tps": pl.Float64, "success_rate": pl.Float64,
    "num_requests": pl.Int64, "run_id": pl.Utf8, "backend": pl.Utf8, "created_at": pl.Float64, "excluded": pl.Boolean,
}
METRIC_TITLES = {
    "tokens_per_s": "output tokens / s", "requests_per_s": "requests / s", "latency_p50_ms": "p50 latency (ms)",
    "latency_p90_ms": "p90 latency (ms)", "latency_p99_ms": "p99 latency (ms)", "ttft_p50_ms": "p50 TTFT (ms)",
    "gen_tps": "decode tokens / s per request",
}
PERCENTILES = {"latency_p50_ms": "p50", "latency_p90_ms": "p90", "latency_p99_ms": "p99"}


def bench_frame(points: Iterable[Mapping[str, Any]], *, model: str | None = None) -> pl.DataFrame:
    """Benchmark points (any of the API's spellings) → one tidy frame with ``BENCH_SCHEMA``."""
    rows = []
    for point in points:
        flat = flatten(point)
        row: dict[str, Any] = {}
        for column, names in BENCH_COLUMNS.items():
            value = next((flat[n] for n in names if flat.get(n) is not None), None)
            if BENCH_SCHEMA[column] == pl.Boolean:
                row[column] = value is True  # a point's flag (a summary row's count of excluded repeats is not)
            elif BENCH_SCHEMA[column] == pl.Utf8:
                row[column] = None if value is None else str(value)
            elif BENCH_SCHEMA[column] == pl.Int64:
                row[column] = integer(value)
            else:
                row[column] = number(value)
        if row["model"] is None:
            row["model"] = model
        rows.append(row)
    return pl.DataFrame(rows, schema=BENCH_SCHEMA)


def latest_points(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per (model, num_ctx, concurrency): the mean over the repeats of its newest run, leaving out points
    marked ``excluded`` (too many failures to count as a speed)."""
    config = ["model", "num_ctx", "concurrency"]
    frame = frame.filter(~pl.col("excluded").fill_null(False))
    if frame.is_empty():
        return frame
    keyed = frame.with_columns(
        pl.coalesce(pl.col("run_id"), pl.col("created_at").cast(pl.Utf8), pl.lit("")).alias("_run"))
    newest = keyed.sort("created_at", nulls_last=False).group_by(config).agg(pl.col("_run").last().alias("_newest"))
    kept = keyed.join(newest, on=config, nulls_equal=True).filter(pl.col("_run") == pl.col("_newest"))
    numeric = [c for c, t in BENCH_SCHEMA.items() if t == pl.Float64 and c != "created_at"]
    return (kept.group_by(config, maintain_order=True)
            .agg(*[pl.col(c).mean() for c in numeric], pl.col("num_requests").sum(), pl.col("run_id").last(),
                 pl.col("backend").last(), pl.col("created_at").max(), pl.col("excluded").any())
            .select(list(BENCH_SCHEMA)).sort(config))


def best_per(frame: pl.DataFrame, x: str, *, metric: str = "tokens_per_s") -> pl.DataFrame:
    """For each (model, ``x``) keep the row with the highest ``metric`` (e.g. the best concurrency per context)."""
    if frame.is_empty():
        return frame
    return (frame.sort(metric, nulls_last=False)
            .unique(subset=["model", x], keep="last", maintain_order=True).sort("model", x))


def along(frame: pl.DataFrame, x: str, *, fixed: str, value: int | None) -> pl.DataFrame:
    """The curve along ``x`` (num_ctx or concurrency) with the other knob at ``value`` (None: its best)."""
    frame = latest_points(frame).filter(pl.col(x).is_not_null())
    if value is not None:
        return frame.filter(pl.col(fixed) == value).sort("model", x)
    return best_per(frame, x)


def _x_axis(x: str) -> alt.X:
    """Windows and concurrency levels double: an ordinal axis spaces them evenly and labels each measured one."""
    title = {"num_ctx": "context window (num_ctx, tokens)", "concurrency": "concurrency (requests in flight)"}[x]
    return alt.X(f"{x}:O", title=title, sort="ascending", axis=alt.Axis(labelAngle=0))


def _model_colour(**kwargs: Any) -> alt.Color:
    """One clearly different colour per model (Streamlit's theme would shade them all blue)."""
    return alt.Color("model:N", title="model", scale=alt.Scale(scheme="tableau10"), **kwargs)


def metric_chart(frame: pl.DataFrame, x: str, metric: str) -> alt.Chart:
    """One line per model: ``metric`` against ``x`` (log₂ axis, since windows and concurrency double)."""
    data = frame.select("model", "num_ctx", "concurrency", metric).drop_nulls([x, metric]).sort("model", x)
    chart: alt.Chart = (alt.Chart(data, title=f"{METRIC_TITLES[metric]} vs {x}")
            .mark_line(point=True)
            .encode(x=_x_axis(x), y=alt.Y(f"{metric}:Q", title=METRIC_TITLES[metric]),
                    color=_model_colour(),
                    tooltip=["model:N", "num_ctx:Q", "concurrency:Q", alt.Tooltip(f"{metric}:Q", format=".2f")]))
    return chart


def latency_chart(frame: pl.DataFrame, x: str) -> alt.Chart:
    """Latency percentiles against ``x``: colour is the model, dash is the percentile."""
    present = [c for c in PERCENTILES if frame[c].drop_nulls().len() > 0]
    long = (frame.select("model", "num_ctx", "concurrency", *present)
            .unpivot(index=["model", "num_ctx", "concurrency"], on=present, variable_name="percentile",
                     value_name="latency_ms")
            .with_columns(pl.col("percentile").replace_strict(PERCENTILES, default=None))
            .drop_nulls([x, "latency_ms"]).sort("model", "percentile", x)) if present else pl.DataFrame(
                schema={"model": pl.Utf8, "num_ctx": pl.Int64, "concurrency": pl.Int64, "percentile": pl.Utf8,
                        "latency_ms": pl.Float64})
    chart: alt.Chart = (alt.Chart(long, title=f"latency percentiles vs {x}")
            .mark_line(point=True)
            .encode(x=_x_axis(x), y=alt.Y("latency_ms:Q", title="latency (ms)"),
                    color=_model_colour(),
                    strokeDash=alt.StrokeDash("percentile:N", title="percentile", sort=list(PERCENTILES.values())),
                    tooltip=["model:N", "percentile:N", "num_ctx:Q", "concurrency:Q",
                             alt.Tooltip("latency_ms:Q", format=".0f")]))
    return chart


def compare_chart(frame: pl.DataFrame, metric: str = "tokens_per_s") -> alt.Chart:
    """Models side by side at their best configuration (bars), labelled with that configuration."""
    data = best_per(latest_points(frame), "model", metric=metric).with_columns(
        config=pl.format("ctx {} · c {}", pl.col("num_ctx"), pl.col("concurrency")))
    chart: alt.Chart = (alt.Chart(data, title=f"best {METRIC_TITLES[metric]} per model")
            .mark_bar()
            .encode(x=alt.X(f"{metric}:Q", title=METRIC_TITLES[metric]), y=alt.Y("model:N", sort="-x"),
                    color=_model_colour(legend=None),
                    tooltip=["model:N", "config:N", alt.Tooltip(f"{metric}:Q", format=".2f")]))
    return chart


def best_table(frame: pl.DataFrame) -> pl.DataFrame:
    """The "best known configuration" table: the columns a person compares, rounded."""
    columns = ["model", "backend", "num_ctx", "concurrency", "tokens_per_s", "requests_per_s", "latency_p50_ms",
               "latency_p99_ms", "ttft_p50_ms", "success_rate"]
    return frame.select(columns).with_columns(pl.col(pl.Float64).round(2)).sort("model")
