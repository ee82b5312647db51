"""Benchmark answers (``obatch.bench.schemas`` models, as ``obatch.client`` parses them) → frames → the Benchmarks
page's curves, comparison, best table, request-rate curves and goodput under an SLO. Column names are the wire's;
the best configuration is the one the server marks (``best``) and the capacity the one it computes, never chosen
here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt
import polars as pl

from obatch.bench.charts import load_label
from obatch.bench.schemas import BenchConfig, BenchPoint, Capacity

POINT_COLUMNS: dict[str, Any] = {
    "model": pl.Utf8, "backend": pl.Utf8, "run_id": pl.Utf8, "num_ctx": pl.Int64, "concurrency": pl.Int64,
    "rate": pl.Float64, "arrival": pl.Utf8, "repeat": pl.Int64, "created_at": pl.Float64, "excluded": pl.Boolean,
    "n_requests": pl.Int64, "success_rate": pl.Float64, "output_tps": pl.Float64, "req_per_s": pl.Float64,
    "gen_tps": pl.Float64, "latency_p50": pl.Float64, "latency_p90": pl.Float64, "latency_p99": pl.Float64,
    "ttft_p50": pl.Float64, "achieved_rate": pl.Float64, "goodput": pl.Float64, "slo_share": pl.Float64,
}
LOAD = ["model", "num_ctx", "concurrency", "rate", "arrival"]  # a configuration; rate None: closed loop
CONFIG_COLUMNS: dict[str, Any] = {
    "model": pl.Utf8, "backend": pl.Utf8, "run_id": pl.Utf8, "num_ctx": pl.Int64, "concurrency": pl.Int64,
    "repeats": pl.Int64, "created_at": pl.Float64, "success_rate": pl.Float64, "output_tps": pl.Float64,
    "req_per_s": pl.Float64, "gen_tps": pl.Float64, "latency_p50": pl.Float64, "latency_p90": pl.Float64,
    "latency_p99": pl.Float64, "ttft_p50": pl.Float64, "best": pl.Boolean,
}
METRIC_TITLES = {
    "output_tps": "output tokens / s", "req_per_s": "requests / s", "latency_p50": "p50 latency (ms)",
    "latency_p90": "p90 latency (ms)", "latency_p99": "p99 latency (ms)", "ttft_p50": "p50 TTFT (ms)",
    "gen_tps": "decode tokens / s per request", "achieved_rate": "achieved requests / s",
}
PERCENTILES = {"latency_p50": "p50", "latency_p90": "p90", "latency_p99": "p99"}
DASHES = {"p50": [1, 0], "p90": [6, 3], "p99": [2, 2]}  # solid, dashed, dotted: told apart without colour
SHAPES = {"p50": "circle", "p90": "triangle-up", "p99": "square"}  # apart at a single x too, where no line is drawn
LINE_STYLES = "{'p50': 'p50 · solid line', 'p90': 'p90 · dashed line', 'p99': 'p99 · dotted line'}[datum.label]"
AXIS_TITLES = {  # ordinal: the measured levels (which double) are evenly spaced, like a log₂ axis
    "num_ctx": "num_ctx, tokens (ordinal axis)",
    "concurrency": "concurrency (ordinal axis)",
    "rate": "offered rate, requests / s (ordinal axis)",
}


def points_frame(points: Sequence[BenchPoint]) -> pl.DataFrame:
    """Measured points → one row each, with ``POINT_COLUMNS``."""
    return pl.DataFrame([p.model_dump(include=set(POINT_COLUMNS)) for p in points], schema=POINT_COLUMNS)


def configs_frame(configs: Sequence[BenchConfig]) -> pl.DataFrame:
    """Configurations (best per model, or a comparison) → one row each, with ``CONFIG_COLUMNS``."""
    return pl.DataFrame([c.model_dump(include=set(CONFIG_COLUMNS)) for c in configs], schema=CONFIG_COLUMNS)


def latest_points(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per configuration (model, num_ctx, concurrency or request rate): the mean over the repeats of its
    newest run, leaving out points marked ``excluded`` (too many failures to count as a speed)."""
    frame = frame.filter(~pl.col("excluded"))
    if frame.is_empty():
        return frame
    newest = frame.sort("created_at").group_by(LOAD).agg(pl.col("run_id").last().alias("_newest"))
    kept = frame.join(newest, on=LOAD, nulls_equal=True).filter(pl.col("run_id") == pl.col("_newest"))
    numeric = [c for c, t in POINT_COLUMNS.items() if t == pl.Float64 and c not in ("created_at", "rate")]
    return (kept.group_by(LOAD, maintain_order=True)
            .agg(*[pl.col(c).mean() for c in numeric], pl.col("n_requests").sum(), pl.col("repeat").max(),
                 pl.col("run_id").last(), pl.col("backend").last(), pl.col("created_at").max(),
                 pl.col("excluded").any())
            .select(list(POINT_COLUMNS)).sort(["model", "num_ctx", "rate", "concurrency"], nulls_last=False))


def closed_points(frame: pl.DataFrame) -> pl.DataFrame:
    """The concurrency (closed-loop) rows: what the context-window and concurrency curves draw."""
    return frame.filter(pl.col("rate").is_null())


def rate_points(frame: pl.DataFrame, num_ctx: int | None = None) -> pl.DataFrame:
    """The request-rate rows' newest measurements (at one ``num_ctx`` when given), by model and offered rate."""
    rated = latest_points(frame.filter(pl.col("rate").is_not_null()))
    if num_ctx is not None:
        rated = rated.filter(pl.col("num_ctx") == num_ctx)
    return rated.sort("model", "rate")


def along(frame: pl.DataFrame, x: str, *, fixed: str, value: int | None, best: pl.DataFrame) -> pl.DataFrame:
    """The curve along ``x`` (num_ctx or concurrency) with the other knob at ``value``; None: at each model's best
    configuration's ``fixed`` (as ``best``, the server's best configurations, names it)."""
    frame = closed_points(latest_points(frame))
    if value is not None:
        return frame.filter(pl.col(fixed) == value).sort("model", x)
    chosen = best.select("model", pl.col(fixed).alias("_at"))
    return frame.join(chosen, on="model").filter(pl.col(fixed) == pl.col("_at")).drop("_at").sort("model", x)


def _x_axis(x: str) -> alt.X:
    """Windows and concurrency levels double: an ordinal axis spaces them evenly and labels each measured one."""
    return alt.X(f"{x}:O", title=AXIS_TITLES[x], sort="ascending", axis=alt.Axis(labelAngle=0))


def _model_colour(**kwargs: Any) -> alt.Color:
    """One clearly different colour per model (Streamlit's theme would shade them all blue); full names."""
    return alt.Color("model:N", title="model", scale=alt.Scale(scheme="tableau10"),
                     **({"legend": alt.Legend(labelLimit=0, orient="bottom", columns=1)} | kwargs))


def _model_offset() -> alt.XOffset:
    """Each model's marks side by side at an x value, so models measured alike do not hide one another."""
    return alt.XOffset("model:N", scale=alt.Scale(paddingOuter=0.5))


def metric_chart(frame: pl.DataFrame, x: str, metric: str) -> alt.Chart:
    """One line per model: ``metric`` against ``x``."""
    index = list(dict.fromkeys(["model", "num_ctx", "concurrency", x]))
    data = frame.select(*index, metric).drop_nulls([x, metric]).sort("model", x)
    chart: alt.Chart = (alt.Chart(data, title=f"{METRIC_TITLES[metric]} vs {x}")
            .mark_line(point=True)
            .encode(x=_x_axis(x), xOffset=_model_offset(), y=alt.Y(f"{metric}:Q", title=METRIC_TITLES[metric]),
                    color=_model_colour(),
                    tooltip=[*(f"{c}:N" if c == "model" else f"{c}:Q" for c in index),
                             alt.Tooltip(f"{metric}:Q", format=".2f")]))
    return chart


def latency_chart(frame: pl.DataFrame, x: str) -> alt.TopLevelMixin:
    """Latency percentiles against ``x``: colour is the model, line style and mark shape the percentile (p50 solid
    with circles, p90 dashed with triangles, p99 dotted with squares; one legend draws both), so the percentiles
    stay apart with one model, and with one ``x`` value (where no line is drawn)."""
    present = [c for c in PERCENTILES if frame[c].drop_nulls().len() > 0]
    index = list(dict.fromkeys(["model", "num_ctx", "concurrency", x]))
    empty = pl.DataFrame(schema={"model": pl.Utf8, "num_ctx": pl.Int64, "concurrency": pl.Int64, "rate": pl.Float64,
                                 "percentile": pl.Utf8, "latency_ms": pl.Float64}).select(*index, "percentile",
                                                                                          "latency_ms")
    long = (frame.select(*index, *present)
            .unpivot(index=index, on=present, variable_name="percentile", value_name="latency_ms")
            .with_columns(pl.col("percentile").replace_strict(PERCENTILES, default=None))
            .drop_nulls([x, "latency_ms"]).sort("model", "percentile", x)) if present else empty
    names = list(PERCENTILES.values())
    dash = alt.StrokeDash("percentile:N", title="percentile", sort=names,
                          scale=alt.Scale(domain=names, range=[DASHES[n] for n in names]),
                          legend=alt.Legend(symbolType="stroke", symbolStrokeWidth=2, symbolSize=400,
                                            symbolStrokeColor="black", labelExpr=LINE_STYLES))
    base = alt.Chart(long).encode(x=_x_axis(x), xOffset=_model_offset(), color=_model_colour(),
                                  y=alt.Y("latency_ms:Q", title="latency (ms)"),
                                  tooltip=["model:N", "percentile:N", *(f"{c}:Q" for c in index[1:]),
                                           alt.Tooltip("latency_ms:Q", format=".0f")])
    # the dots are a layer of their own: on the line mark itself they would turn the line-style legend blank
    shape = alt.Shape("percentile:N", title="percentile", sort=names,
                      scale=alt.Scale(domain=names, range=[SHAPES[n] for n in names]),
                      legend=alt.Legend(labelExpr=LINE_STYLES))  # Vega-Lite merges it with the line styles' one
    lines = base.mark_line().encode(strokeDash=dash, detail="percentile:N")
    dots = base.mark_point(filled=False, size=80, strokeWidth=2).encode(shape=shape)  # hollow: both seen if they meet
    chart: alt.TopLevelMixin = alt.layer(lines, dots, title=f"latency percentiles vs {x}")
    return chart


def compare_chart(configs: pl.DataFrame, metric: str = "output_tps") -> alt.TopLevelMixin:
    """Each model's best configuration (the server's ``best`` rows) as one bar, its full name beside it, labelled
    with that configuration; the chart grows with the number of models instead of squashing the bars."""
    data = configs.filter(pl.col("best")).with_columns(
        config=pl.format("num_ctx {} · concurrency {}", pl.col("num_ctx"), pl.col("concurrency")))
    height = 40 * max(data.height, 1) + 20
    top = max([1e-9, *data[metric].drop_nulls().to_list()]) * 1.5  # room right of the longest bar for its label
    bars = (alt.Chart(data, height=height)  # on the layers, not the layered chart: Streamlit drops a top height
            .mark_bar(size=24)
            .encode(x=alt.X(f"{metric}:Q", title=METRIC_TITLES[metric], scale=alt.Scale(domain=[0, top])),
                    y=alt.Y("model:N", sort="-x", title=None, axis=alt.Axis(labelLimit=0)),
                    color=_model_colour(legend=None),
                    tooltip=["model:N", "config:N", alt.Tooltip(f"{metric}:Q", format=".2f")]))
    text = bars.mark_text(align="left", dx=4).encode(text="config:N", color=alt.value("gray"))
    layered: alt.TopLevelMixin = alt.layer(bars, text, title=f"{METRIC_TITLES[metric]} at each model's best "
                                                             "configuration")
    return layered


BEST_FORMATS = {"output tok/s": "%.1f", "req/s": "%.2f", "p50 latency (ms)": "%.0f", "p99 latency (ms)": "%.0f",
                "p50 TTFT (ms)": "%.0f", "success (%)": "%.1f"}  # ``best_table``'s numbers as the page writes them
RATE_FORMATS = {"goodput (req/s)": "%.2f", "req/s": "%.2f", "met (%)": "%.1f"}  # the SLO tables'


def best_table(configs: pl.DataFrame) -> pl.DataFrame:
    """The "best known configuration" table (the server's ``best`` rows): what a person compares, rounded, the
    success rate in percent."""
    return (configs.filter(pl.col("best"))
            .select(pl.col("model"), pl.col("backend"), pl.col("num_ctx"), pl.col("concurrency"),
                    pl.col("output_tps").round(1).alias("output tok/s"), pl.col("req_per_s").round(2).alias("req/s"),
                    pl.col("latency_p50").round(0).alias("p50 latency (ms)"),
                    pl.col("latency_p99").round(0).alias("p99 latency (ms)"),
                    pl.col("ttft_p50").round(0).alias("p50 TTFT (ms)"),
                    (pl.col("success_rate") * 100).round(1).alias("success (%)"))
            .sort("model"))


def slo_text(ttft_ms: float | None, tpot_ms: float | None) -> str | None:
    """The SLO the server takes (``ttft=500ms,tpot=50ms``) from the page's two bounds; None when both are empty."""
    parts = [f"{name}={value:g}ms" for name, value in (("ttft", ttft_ms), ("tpot", tpot_ms)) if value is not None]
    return ",".join(parts) or None


def capacity_table(capacities: Sequence[Capacity]) -> pl.DataFrame:
    """The server's capacities (``/v1/benchmarks/capacity``) as a person reads them: per model and context window,
    the highest concurrency — or offered request rate — whose requests met the SLO, and its goodput."""
    def said(c: Capacity) -> str:
        if not c.met:
            return f"not met at any measured {'rate' if c.load == 'rate' else 'concurrency'}"
        return f"{c.rate:g} req/s offered ({c.arrival})" if c.load == "rate" else f"{c.concurrency} in flight"

    rows = [{"model": c.model, "num_ctx": c.num_ctx, "load": c.load, "capacity": said(c),
             "goodput (req/s)": None if c.goodput is None else round(c.goodput, 2),
             "req/s": None if c.req_per_s is None else round(c.req_per_s, 2)} for c in capacities]
    return pl.DataFrame(rows, schema={"model": pl.Utf8, "num_ctx": pl.Int64, "load": pl.Utf8, "capacity": pl.Utf8,
                                      "goodput (req/s)": pl.Float64, "req/s": pl.Float64})


def goodput_table(frame: pl.DataFrame) -> pl.DataFrame:
    """Per configuration (newest measurement): req/s, goodput (req/s that met the SLO) and the share that met it."""
    latest = latest_points(frame)
    return latest.select(
        pl.col("model"), load_label().alias("configuration"), pl.col("req_per_s").round(2).alias("req/s"),
        pl.col("goodput").round(2).alias("goodput (req/s)"), (pl.col("slo_share") * 100).round(1).alias("met (%)"))


def pareto_chart(frame: pl.DataFrame) -> alt.TopLevelMixin:
    """Throughput against latency of every configuration (newest measurement each), the Pareto front drawn."""
    from obatch.bench.charts import pareto

    chart = pareto(latest_points(frame))
    # fit-x: the width follows the page, the height is the plot's own; Streamlit's default (fit) squeezed the
    # plot, and the chart's title slid under the tab bar above it
    return chart.properties(autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
