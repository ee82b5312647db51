"""Altair charts of the benchmark frames (``obatch.bench.frames``); each takes a polars frame and returns a chart.

The report notebook and the UI call these; nothing here reads the store.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from obatch._extras import require

require("notebooks", "altair")

import altair as alt  # noqa: E402  (after the check: a missing extra is a sentence)

TOLERANCE = 0.15  # the band drawn around "estimate = actual"
FRONTIER = "Pareto frontier: the most output tokens/s at this p50 latency or lower"  # its legend entry


def _closed(frame: pl.DataFrame) -> pl.DataFrame:
    """The closed-loop (concurrency) rows: a request-rate row has no place on a concurrency axis."""
    return frame.filter(pl.col("rate").is_null()) if "rate" in frame.columns else frame


def load_label() -> pl.Expr:
    """``num_ctx 2048 · concurrency 4``, or ``num_ctx 2048 · 8/s poisson`` for a request-rate row."""
    closed = pl.format("num_ctx {} · concurrency {}", pl.col("num_ctx"), pl.col("concurrency"))
    return pl.when(pl.col("rate").is_null()).then(closed).otherwise(
        pl.format("num_ctx {} · {}/s {}", pl.col("num_ctx"), pl.col("rate").round(3), pl.col("arrival")))


def throughput_vs_num_ctx(summary: pl.DataFrame, *, metric: str = "req_per_s") -> alt.TopLevelMixin:
    """Throughput (completed req/s by default, or ``output_tps``) against the context window, one panel per
    model, one line per concurrency level."""
    base = alt.Chart(_closed(summary))
    lines = base.mark_line(point=True).encode(
        x=alt.X("num_ctx:O", title="num_ctx (tokens)"),
        y=alt.Y(f"{metric}:Q", title="completed req/s" if metric == "req_per_s" else "output tokens/s"),
        color=alt.Color("concurrency:O", title="concurrency"),
        tooltip=["model:N", "num_ctx:O", "concurrency:O", f"{metric}:Q", "repeats:Q"],
    )
    chart: alt.TopLevelMixin = lines.properties(width=260, height=200).facet(
        column=alt.Column("model:N", title=None)).properties(title="Throughput vs context window")
    return chart


def latency_vs_num_ctx(summary: pl.DataFrame) -> alt.TopLevelMixin:
    """End-to-end latency p50 (line) and p90 (band top) against the context window, per model and concurrency."""
    base = alt.Chart(_closed(summary))
    band = base.mark_area(opacity=0.2).encode(
        x=alt.X("num_ctx:O", title="num_ctx (tokens)"), y=alt.Y("latency_p50:Q", title="latency (ms)"),
        y2="latency_p90:Q", color=alt.Color("concurrency:O", title="concurrency"))
    line = base.mark_line(point=True).encode(
        x="num_ctx:O", y="latency_p50:Q", color="concurrency:O",
        tooltip=["model:N", "num_ctx:O", "concurrency:O", "latency_p50:Q", "latency_p90:Q", "latency_p99:Q",
                 "ttft_p50:Q"])
    return alt.layer(band, line).properties(width=260, height=200).facet(
        column=alt.Column("model:N", title=None)).properties(title="Latency p50 (p90 band) vs context window")


def throughput_vs_concurrency(summary: pl.DataFrame, saturation: pl.DataFrame | None = None) -> alt.TopLevelMixin:
    """Completed req/s against concurrency (log scale), one line per model and num_ctx, error bars for the
    spread over repeats, and a ring where throughput saturates."""
    data = _closed(summary).with_columns(
        (pl.col("model") + " · ctx " + pl.col("num_ctx").cast(pl.Utf8)).alias("series"),
        (pl.col("req_per_s") - pl.col("req_per_s_std").fill_null(0)).alias("rps_low"),
        (pl.col("req_per_s") + pl.col("req_per_s_std").fill_null(0)).alias("rps_high"),
    )
    base = alt.Chart(data)
    x = alt.X("concurrency:Q", scale=alt.Scale(type="log", base=2), title="concurrency (requests in flight)")
    layers: list[Any] = [
        base.mark_line(point=True).encode(x=x, y=alt.Y("req_per_s:Q", title="completed req/s"),
                                          color=alt.Color("series:N", title="model · num_ctx"),
                                          tooltip=["series:N", "concurrency:Q", "req_per_s:Q", "req_per_s_std:Q",
                                                   "output_tps:Q"]),
        base.mark_errorbar().encode(x=x, y="rps_low:Q", y2="rps_high:Q", color="series:N"),
    ]
    if saturation is not None and not saturation.is_empty():
        rings = saturation.with_columns(
            (pl.col("model") + " · ctx " + pl.col("num_ctx").cast(pl.Utf8)).alias("series"))
        layers.append(alt.Chart(rings).mark_point(size=250, shape="circle", filled=False)
                      .encode(x=alt.X("saturates_at:Q", scale=alt.Scale(type="log", base=2)), y="req_per_s:Q",
                              color="series:N", tooltip=["series:N", "saturates_at:Q", "still_growing:N"]))
    return alt.layer(*layers).properties(width=420, height=260,
                                         title="Throughput vs concurrency (ring: where it saturates)")


def estimate_vs_actual(estimates: pl.DataFrame) -> alt.TopLevelMixin:
    """Estimated against realised batch duration, with each estimate's interval; the diagonal is a perfect
    estimate and the grey band ±15% around it."""
    data = estimates.filter(pl.col("actual_seconds") > 0).with_columns(
        pl.when(pl.col("within_interval")).then(pl.lit("inside its interval"))
        .otherwise(pl.lit("outside its interval")).alias("actual"))
    top = max([1.0, *data["actual_seconds"].to_list(), *data["high"].drop_nulls().to_list()]) * 1.1
    diagonal = pl.DataFrame({"actual_seconds": [0.0, top], "estimated_seconds": [0.0, top],
                             "low": [0.0, top * (1 - TOLERANCE)], "high": [0.0, top * (1 + TOLERANCE)]})
    guide = alt.Chart(diagonal)
    base = alt.Chart(data)
    x = alt.X("actual_seconds:Q", title="actual duration (s)")
    return alt.layer(
        guide.mark_area(opacity=0.15, color="gray").encode(x=x, y="low:Q", y2="high:Q"),
        guide.mark_line(color="gray", strokeDash=[4, 4]).encode(x=x, y="estimated_seconds:Q"),
        base.mark_errorbar().encode(x=x, y=alt.Y("low:Q", title="estimated duration (s)"), y2="high:Q"),
        base.mark_point(filled=True, size=60).encode(
            x=x, y="estimated_seconds:Q",
            color=alt.Color("actual:N", title="actual duration", sort=["inside its interval", "outside its interval"],
                            scale=alt.Scale(domain=["inside its interval", "outside its interval"],
                                            range=["#4c78a8", "#e45756"])),
            tooltip=["batch_id:N", "models:N", "requests:Q", "concurrency:Q", "estimated_seconds:Q",
                     "actual_seconds:Q", "error_pct:Q"]),
    ).properties(width=380, height=300, title="Estimate vs actual batch duration (band: ±15%)")


def frontier(frame: pl.DataFrame, *, latency: str = "latency_p50", throughput: str = "output_tps") -> pl.DataFrame:
    """Each model's Pareto frontier as a staircase: the best ``throughput`` reachable at each latency or lower.

    One row per front point (by rising latency; each raises the best throughput), then a last row at the model's
    highest measured latency holding the best throughput, so a front of one point is still a line across the
    measured range. Columns: model, ``latency``, ``throughput``, ``end`` (True on that last row)."""
    schema = {"model": pl.Utf8, latency: pl.Float64, throughput: pl.Float64, "end": pl.Boolean}
    rows: list[dict[str, Any]] = []
    measured = frame.drop_nulls([latency, throughput]).sort("model", latency, pl.col(throughput), descending=[
        False, False, True])
    for (model,), points in measured.group_by("model", maintain_order=True):
        best = None
        for x, y in points.select(latency, throughput).iter_rows():
            if best is None or y > best:
                best = y
                rows.append({"model": model, latency: x, throughput: y, "end": False})
        rows.append({"model": model, latency: points[latency].max(), throughput: best, "end": True})
    return pl.DataFrame(rows, schema=schema)


def pareto(frame: pl.DataFrame, *, latency: str = "latency_p50", throughput: str = "output_tps",
           height: int = 320) -> alt.TopLevelMixin:
    """Throughput against latency, one point per configuration (``num_ctx`` and its concurrency or request rate),
    coloured by model, faint where another configuration of the model is both faster and quicker to answer; the
    staircase is each model's Pareto frontier (``frontier``: the best throughput at each latency or lower), named
    in the legend (labels on the lines would collide where two models' frontiers end close together). Works on
    ``frames.summary`` rows (the report) and on the UI's latest points alike."""
    from obatch.bench.frames import pareto_front

    if "rate" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.Float64).alias("rate"), pl.lit(None, pl.Utf8).alias("arrival"))
    data = pareto_front(frame, latency=latency, throughput=throughput).with_columns(
        load_label().alias("config"),
        pl.when(pl.col("pareto")).then(pl.lit("on the frontier")).otherwise(pl.lit("dominated")).alias("point"))
    front = frontier(data, latency=latency, throughput=throughput).with_columns(pl.lit(FRONTIER).alias("line"))
    colour = alt.Color("model:N", title="model", scale=alt.Scale(scheme="tableau10"),
                       legend=alt.Legend(labelLimit=0, orient="bottom", columns=1))
    x = alt.X(f"{latency}:Q", title="p50 latency (ms) — lower is better", scale=alt.Scale(zero=False, nice=True))
    y = alt.Y(f"{throughput}:Q", title="output tokens / s — higher is better", scale=alt.Scale(zero=True))
    line = alt.StrokeDash("line:N", title=None, scale=alt.Scale(domain=[FRONTIER], range=[[1, 0]]),
                          legend=alt.Legend(orient="bottom", symbolType="stroke", symbolStrokeWidth=2,
                                            symbolStrokeColor="black", labelLimit=0))
    staircase = alt.Chart(front, height=height).mark_line(interpolate="step-after", strokeWidth=2).encode(
        x=x, y=y, color=colour, strokeDash=line, order=alt.Order(f"{latency}:Q"),
        tooltip=["model:N", alt.Tooltip(f"{latency}:Q", title="up to latency (ms)", format=".0f"),
                 alt.Tooltip(f"{throughput}:Q", title="best output tokens / s", format=".1f")])
    dots = alt.Chart(height=height).mark_point(filled=True, size=80).encode(  # the layered chart's data
        x=x, y=y, color=colour,
        opacity=alt.Opacity("point:N", title="configuration", sort=["on the frontier", "dominated"],
                            scale=alt.Scale(domain=["on the frontier", "dominated"], range=[1.0, 0.35]),
                            legend=alt.Legend(orient="bottom", symbolFillColor="gray")),
        tooltip=["model:N", "config:N", alt.Tooltip(f"{throughput}:Q", format=".1f"),
                 alt.Tooltip(f"{latency}:Q", format=".0f"), "point:N"])
    chart: alt.TopLevelMixin = alt.layer(  # the dots over the staircase
        staircase, dots, data=data, title="Throughput vs latency (staircase: each model's Pareto frontier)")
    return chart


def versus_rate(summary: pl.DataFrame) -> alt.TopLevelMixin:
    """Open-loop (request-rate) points: completed and achieved requests/s against the offered rate (left; the
    dashed diagonal is an engine that keeps up) and latency p50 with its p90 band (right), one colour per model and
    num_ctx. Where throughput leaves the diagonal and latency climbs, the engine has fallen behind."""
    data = summary.filter(pl.col("rate").is_not_null()) if "rate" in summary.columns else summary.clear()
    data = data.with_columns((pl.col("model") + " · ctx " + pl.col("num_ctx").cast(pl.Utf8)).alias("series"))
    series = alt.Color("series:N", title="model · num_ctx")
    x = alt.X("rate:Q", title="offered rate (requests / s)")
    base = alt.Chart(data)
    top = max([1.0, *data["rate"].drop_nulls().to_list()])
    keeps_up = alt.Chart(pl.DataFrame({"rate": [0.0, top], "req_per_s": [0.0, top]})).mark_line(
        color="gray", strokeDash=[4, 4]).encode(x=x, y="req_per_s:Q")
    throughput = alt.layer(
        keeps_up,
        base.mark_line(point=True).encode(x=x, y=alt.Y("req_per_s:Q", title="completed requests / s"), color=series,
                                          tooltip=["series:N", "arrival:N", "rate:Q", "achieved_rate:Q",
                                                   "req_per_s:Q", "output_tps:Q"]),
        base.mark_point(shape="triangle", size=60).encode(x=x, y="achieved_rate:Q", color=series),
    ).properties(width=300, height=240, title="Throughput vs offered rate (triangles: achieved rate)")
    latency = alt.layer(
        base.mark_area(opacity=0.2).encode(x=x, y=alt.Y("latency_p50:Q", title="latency (ms)"),
                                           y2="latency_p90:Q", color=series),
        base.mark_line(point=True).encode(x=x, y="latency_p50:Q", color=series,
                                          tooltip=["series:N", "rate:Q", "latency_p50:Q", "latency_p90:Q",
                                                   "ttft_p50:Q"]),
    ).properties(width=300, height=240, title="Latency p50 (p90 band) vs offered rate")
    chart: alt.TopLevelMixin = alt.hconcat(throughput, latency, title="Request-rate load: throughput and latency "
                                                                      "vs the offered rate")
    return chart
