"""The Benchmarks page under AppTest against the in-memory server (``tests.ui_fake``, which answers with the
server's own wire models and summary code), and its view builders."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from obatch.bench import charts as charts_module
from obatch.bench import frames as bench_frames
from obatch.bench.best import best_config
from obatch.bench.schemas import BenchPoint, SweepParams
from obatch.ui import views
from obatch.ui.launch import APP
from obatch.ui.session import CLIENT_KEY
from obatch.ui.sweep import SweepPlan, progress_text
from tests.ui_fake import FakeServer, bench_points

TIMEOUT = 60


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


@pytest.fixture
def page(fake: FakeServer) -> Callable[..., AppTest]:
    def open_page(server: FakeServer | None = None) -> AppTest:
        at = AppTest.from_file(str(APP.parent / "pages" / "benchmarks.py"), default_timeout=TIMEOUT)
        at.session_state[CLIENT_KEY] = (server or fake).client()
        return at.run()

    return open_page


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]


def table(at: AppTest, *columns: str, index: int = 0) -> Any:
    return [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)][index]


def charts(at: AppTest) -> dict[str, tuple[dict[str, Any], list[pl.DataFrame]]]:
    """Each rendered chart by its title: its Vega-Lite spec and every dataset shipped with it."""
    out = {}
    for chart in at.get("vega_lite_chart"):
        proto = chart.proto  # type: ignore[attr-defined]
        tables = [d.data.data for d in proto.datasets] if proto.datasets else [proto.data.data]
        frames = [pl.from_arrow(pa.ipc.open_stream(t).read_all()) for t in tables]
        spec = json.loads(proto.spec)
        title = spec.get("title") or next((layer.get("title") for layer in spec.get("layer", [])), None)
        out[str(title)] = (spec, frames)  # type: ignore[assignment]
    return out


# ------------------------------------------------------------------------------------------ the page


def test_empty_page_offers_the_sweep_form_first_and_no_charts(page: Callable[..., AppTest]) -> None:
    at = page(FakeServer(with_benchmarks=False))
    no_exception(at)
    assert any("No benchmark yet" in t for t in texts(at.info))
    assert not at.get("vega_lite_chart") and not at.tabs  # no empty charts, no "0.000000" ticks
    assert at.multiselect(key="sweep_models").options == ["llama3.2:1b", "qwen2.5:0.5b"]
    assert at.get("form")


def test_best_table_is_the_servers_best_with_success_in_percent(page: Callable[..., AppTest],
                                                                 fake: FakeServer) -> None:
    at = page()
    no_exception(at)
    best = table(at, "model", "output tok/s", "success (%)")
    served = {c.model: c for c in fake.client().benchmark_models()}
    assert sorted(best["model"]) == sorted(served)
    for row in best.to_dict("records"):
        assert (row["num_ctx"], row["concurrency"]) == (served[row["model"]].num_ctx,
                                                         served[row["model"]].concurrency)
        assert row["success (%)"] == 100.0


def test_curves_latency_styles_and_axes(page: Callable[..., AppTest]) -> None:
    at = page()
    shown = charts(at)
    spec, [data] = shown["output tokens / s vs num_ctx"]
    assert spec["encoding"]["x"]["field"] == "num_ctx" and "ordinal axis" in spec["encoding"]["x"]["title"]
    assert data.sort("model", "num_ctx")["num_ctx"].to_list() == [2048, 4096, 8192] * 2
    assert set(data["concurrency"].to_list()) == {4}  # each model's best configuration's concurrency
    spec, _ = shown["requests / s vs concurrency"]
    assert "ordinal axis" in spec["encoding"]["x"]["title"]
    spec, [latency] = shown["latency percentiles vs num_ctx"]
    dash = spec["layer"][0]["encoding"]["strokeDash"]
    assert dash["legend"]["symbolType"] == "stroke"  # the legend draws line styles, not dots
    assert dash["scale"]["domain"] == ["p50", "p90", "p99"] and len({str(r) for r in dash["scale"]["range"]}) == 3
    assert set(latency["percentile"].to_list()) == {"p50", "p90", "p99"}
    at.selectbox(key="ctx_concurrency").set_value(1).run()
    _, [data] = charts(at)["output tokens / s vs num_ctx"]
    assert set(data["concurrency"].to_list()) == {1}
    at.multiselect(key="models").set_value(["qwen2.5:0.5b"]).run()
    _, [data] = charts(at)["output tokens / s vs num_ctx"]
    assert set(data["model"].to_list()) == {"qwen2.5:0.5b"}


def test_compare_chart_reads_full_names_and_one_bar_per_model(page: Callable[..., AppTest]) -> None:
    at = page()
    spec, frames = charts(at)["output tokens / s at each model's best configuration"]
    bars = spec["layer"][0]
    assert bars["mark"]["type"] == "bar" and bars["encoding"]["y"]["axis"]["labelLimit"] == 0
    assert spec["height"] >= 40 * 2  # grows with the models (altair keeps it on the layered chart)
    assert sorted(frames[0]["model"].to_list()) == ["llama3.2:1b", "qwen2.5:0.5b"]


def test_estimate_record_legend_says_inside_or_outside(page: Callable[..., AppTest]) -> None:
    at = page()
    spec, _ = next(v for k, v in charts(at).items() if "Estimate vs actual" in k)
    legends = json.dumps(spec)
    assert "actual within interval" not in legends and "inside its interval" in legends


def test_pareto_tab_charts_throughput_against_latency(page: Callable[..., AppTest]) -> None:
    at = page()
    spec, frames = next(v for k, v in charts(at).items() if k.startswith("Throughput vs latency"))
    assert "lower is better" in str(spec["layer"][1]["encoding"]["x"]["title"])
    data = frames[0]
    assert {"pareto", "latency_p50", "output_tps"} <= set(data.columns)
    assert data["pareto"].any() and not data["pareto"].all()


def test_a_sweep_from_the_page_goes_to_the_server_and_selects_its_models(page: Callable[..., AppTest],
                                                                        fake: FakeServer) -> None:
    at = page()
    at.multiselect(key="sweep_models").set_value(["llama3.2:1b"])
    at.multiselect(key="sweep_ctx").set_value([2048, 4096])
    at.multiselect(key="sweep_conc").set_value([2])
    at.number_input(key="sweep_requests").set_value(4)
    at.selectbox(key="sweep_workload").set_value("tiny")
    next(b for b in at.button if "Start sweep" in str(b.label)).click().run()
    no_exception(at)
    [sent] = fake.sent("POST", "/v1/benchmarks/sweeps")
    params = SweepParams.model_validate_json(sent.content)
    assert (params.models, params.num_ctx, params.concurrency, params.requests, params.workload) == \
        (["llama3.2:1b"], [2048, 4096], [2], 4, "tiny")
    [made] = fake.sweeps.values()
    progress = at.get("progress")[0].proto.text  # type: ignore[attr-defined]
    assert progress.startswith("0 of 2 point(s) measured · in progress")
    assert not at.get("form")  # no second sweep while one runs
    at.button(key="sweep_cancel").click().run()
    assert fake.sweeps[made.id].status == "cancelling"
    fake.finish_sweep(made.id)
    at.run()
    no_exception(at)
    assert any("Sweep finished: 2 point(s)" in t for t in texts(at.success))
    assert at.multiselect(key="models").value == ["llama3.2:1b"]  # the sweep's models, selected


def test_sweep_plan_checks_what_the_server_checks() -> None:
    plan = SweepPlan(("a", "b"), (4096, 2048, 2048), (1, 2), requests=4, workload="tiny")
    assert plan.points == 8 and plan.problem() is None
    assert plan.params().num_ctx == [2048, 4096]
    assert SweepPlan((), (1,), (1,)).problem() == "Pick at least one model."
    rated = SweepPlan(("a",), (2048,), (), rates="2, 4/s,8", arrival="constant")
    assert rated.problem() is None and rated.points == 3
    assert (rated.params().rates, rated.params().concurrency, rated.params().arrival) == ([2.0, 4.0, 8.0], [],
                                                                                       "constant")
    assert "'fast' is not a request rate" in str(SweepPlan(("a",), (2048,), (1,), rates="2,fast").problem())
    assert "concurrency level or request rate" in str(SweepPlan(("a",), (2048,), ()).problem())
    assert "at most 256" in str(SweepPlan(tuple(f"m{i}" for i in range(16)), (1, 2, 3, 4), (1, 2, 4, 8, 16),
                                          ).problem())


# -------------------------------------------------------------------------------------- view builders


def test_latest_points_averages_the_newest_runs_repeats_without_excluded_points() -> None:
    base = bench_points((("m", 100.0),))[0]
    old = base.model_copy(update={"output_tps": 1.0, "created_at": 1, "run_id": "a"})
    new = [base.model_copy(update={"output_tps": 2.0, "created_at": 2, "run_id": "b", "repeat": 0}),
           base.model_copy(update={"output_tps": 4.0, "created_at": 3, "run_id": "b", "repeat": 1}),
           base.model_copy(update={"output_tps": 99.0, "created_at": 4, "run_id": "b", "repeat": 2,
                                   "excluded": True})]
    latest = views.latest_points(views.points_frame([*new, old]))
    assert latest["output_tps"].to_list() == [3.0] and latest["run_id"].to_list() == ["b"]
    assert views.metric_chart(views.points_frame([]), "concurrency", "req_per_s").to_dict()


def test_one_best_rule() -> None:
    rows = [{"num_ctx": 4096, "concurrency": 4, "output_tps": 100.0, "success_rate": 1.0},
            {"num_ctx": 2048, "concurrency": 8, "output_tps": 98.5, "success_rate": 1.0},  # within 2%: smaller ctx
            {"num_ctx": 2048, "concurrency": 2, "output_tps": 98.1, "success_rate": 1.0},  # and fewer in flight
            {"num_ctx": 1024, "concurrency": 1, "output_tps": 500.0, "success_rate": 0.95}]  # fails too often
    assert best_config(rows) == rows[2]
    assert best_config(rows[3:]) is None
    assert best_config([{**rows[0], "excluded": True}, rows[1]]) == rows[1]


def test_best_of_views_follows_the_rule_over_each_configurations_newest_measurement() -> None:
    points = bench_points((("m", 100.0),), run_id="old", created_at=1.0)
    newer = [p.model_copy(update={"run_id": "new", "created_at": 10_000_000.0, "output_tps": 1000.0,
                                  "success_rate": 0.9}) for p in points if p.concurrency == 4]
    best = bench_frames.best_configs(bench_frames.summary(bench_frames.frame_of_points([*points, *newer])))
    # the fast concurrency-4 points were re-measured failing 10%: the best is now the old concurrency-1 one
    assert best.select("num_ctx", "concurrency", "run_id").rows() == [(2048, 1, "old")]


def test_progress_text() -> None:
    fake = FakeServer()
    made = fake.client().start_sweep(models=["m"], num_ctx=[2048], concurrency=[1, 2])
    assert progress_text(made) == "0 of 2 point(s) measured · in progress · preparing the engine"
    assert isinstance(fake.client().benchmark_history("llama3.2:1b")[0], BenchPoint)


def test_an_slo_typed_on_the_page_shows_each_models_capacity_and_goodput(page: Callable[..., AppTest],
                                                                         fake: FakeServer) -> None:
    at = page()
    no_exception(at)
    assert not [d for d in at.dataframe if "capacity" in d.value.columns]  # empty bounds: no SLO view
    assert not fake.sent("GET", "/v1/benchmarks/capacity")
    at.number_input(key="slo_ttft").set_value(150.0).run()
    no_exception(at)
    asked = {r.url.params["slo"] for r in fake.sent("GET", "/v1/benchmarks/capacity")}
    assert asked == {"ttft=150ms"}
    shown = table(at, "model", "capacity", "goodput (req/s)")
    served = {(c.model, c.num_ctx, c.load): c for m in ("llama3.2:1b", "qwen2.5:0.5b")
              for c in fake.client().capacity(m, "ttft=150ms")}
    assert len(shown) == len(served) == 2 * 4  # per model: three windows of concurrency, one of rates
    rows = {(r["model"], r["num_ctx"], r["load"]): r["capacity"] for r in shown.to_dict("records")}
    assert rows[("llama3.2:1b", 2048, "concurrency")] == "4 in flight"
    # rate points' TTFT grows with the rate: only 1 req/s keeps 95% of first tokens within 150 ms
    assert rows[("llama3.2:1b", 2048, "rate")] == "1 req/s offered (poisson)"
    assert served[("llama3.2:1b", 2048, "rate")].rate == 1.0
    goodput = table(at, "configuration", "goodput (req/s)", "met (%)")
    at_rate = goodput[(goodput["configuration"] == "num_ctx 2048 · 4.0/s poisson")
                      & (goodput["model"] == "llama3.2:1b")]
    assert list(at_rate["met (%)"]) == [18.8]  # 3 of its 16 requests had their first token within 150 ms
    at.number_input(key="slo_tpot").set_value(0.1).run()  # no request meets 0.1 ms per token
    shown = table(at, "model", "capacity", "goodput (req/s)")
    assert set(shown["capacity"]) == {"not met at any measured concurrency", "not met at any measured rate"}


def test_rate_points_are_plotted_against_the_offered_rate_and_stay_off_the_concurrency_curves(
        page: Callable[..., AppTest]) -> None:
    at = page()
    no_exception(at)
    shown = charts(at)
    spec, [achieved] = shown["achieved requests / s vs rate"]
    assert spec["encoding"]["x"]["field"] == "rate" and "offered rate" in spec["encoding"]["x"]["title"]
    assert achieved.sort("model", "rate")["rate"].to_list() == [1.0, 2.0, 4.0] * 2
    assert achieved["achieved_rate"].to_list() == pytest.approx([0.97 * r for r in achieved["rate"].to_list()])
    _, [latency] = shown["latency percentiles vs rate"]
    p50 = latency.filter((pl.col("percentile") == "p50") & (pl.col("model") == "llama3.2:1b")).sort("rate")
    assert p50["latency_ms"].is_sorted() and p50.height == 3  # queueing: slower as the rate grows
    _, [by_concurrency] = shown["requests / s vs concurrency"]
    assert 0 not in by_concurrency["concurrency"].to_list()  # the rate points' "no cap" is no level
    assert at.selectbox(key="conc_ctx").options == ["best", "2048", "4096", "8192"]


def test_a_sweep_of_request_rates_from_the_page(page: Callable[..., AppTest], fake: FakeServer) -> None:
    at = page()
    at.multiselect(key="sweep_models").set_value(["qwen2.5:0.5b"])
    at.multiselect(key="sweep_conc").set_value([])
    at.text_input(key="sweep_rates").set_value("1, 3")
    at.selectbox(key="sweep_arrival").set_value("constant")
    next(b for b in at.button if "Start sweep" in str(b.label)).click().run()
    no_exception(at)
    [sent] = fake.sent("POST", "/v1/benchmarks/sweeps")
    params = SweepParams.model_validate_json(sent.content)
    assert (params.concurrency, params.rates, params.arrival, params.points) == ([], [1.0, 3.0], "constant", 2)


# ---------------------------------------------------------------- charts: Pareto frontier, percentile marks, tables

def layer_rows(spec: dict[str, Any], layer: dict[str, Any]) -> pl.DataFrame:
    """The rows a layer of a ``to_dict()`` spec draws: its own dataset, else the layered chart's."""
    return pl.DataFrame(spec["datasets"][(layer.get("data") or spec["data"])["name"]])


def test_the_frontier_is_the_best_throughput_at_each_latency_or_lower() -> None:
    latest = views.latest_points(views.points_frame(bench_points()))
    # a third model: its concurrency 4 is both slower to answer and worse than concurrency 2 (dominated)
    worse = pl.DataFrame({"model": ["m"] * 3, "latency_p50": [100.0, 150.0, 200.0], "output_tps": [50.0, 90.0, 70.0]})
    for frame in (latest, worse):
        front = charts_module.frontier(frame)
        flagged = bench_frames.pareto_front(frame).filter(pl.col("pareto"))
        steps = front.filter(~pl.col("end"))
        assert sorted(steps.select("model", "latency_p50", "output_tps").rows()) == sorted(
            flagged.select("model", "latency_p50", "output_tps").rows())
        for (model,), rows in front.group_by("model"):
            own = frame.filter(pl.col("model") == model)
            assert rows["output_tps"].is_sorted() and rows["latency_p50"].is_sorted()  # a rising staircase
            end = rows.filter(pl.col("end")).row(0, named=True)
            assert (end["latency_p50"], end["output_tps"]) == (own["latency_p50"].max(), own["output_tps"].max())
            for x, y in own.select("latency_p50", "output_tps").iter_rows():  # no point above the staircase
                reached = rows.filter(pl.col("latency_p50") <= x)["output_tps"].max()
                assert isinstance(reached, float) and y <= reached
    assert charts_module.frontier(worse).filter(~pl.col("end"))["output_tps"].to_list() == [50.0, 90.0]


def test_pareto_chart_draws_the_frontier_named_in_its_legend_with_its_title_above_the_plot() -> None:
    points = views.points_frame(bench_points())
    spec = views.pareto_chart(points).to_dict()
    assert spec["title"].startswith("Throughput vs latency") and spec["autosize"]["type"] == "fit-x"
    staircase, dots = spec["layer"]
    assert staircase["mark"]["type"] == "line" and staircase["mark"]["interpolate"] == "step-after"
    assert spec["height"] >= 300  # a plot, not a strip (altair keeps the layers' height on the layered chart)
    front = layer_rows(spec, staircase)
    expected = charts_module.frontier(views.latest_points(points))
    assert front.select("model", "latency_p50", "output_tps", "end").sort("model", "latency_p50", "end").rows() == \
        expected.sort("model", "latency_p50", "end").rows()
    assert set(front["model"]) == {"llama3.2:1b", "qwen2.5:0.5b"}
    every = layer_rows(spec, dots)
    assert every.height == 12 and set(every["point"]) == {"on the frontier", "dominated"}
    assert dots["encoding"]["opacity"]["title"] == "configuration"  # the legend says what a faint point is
    named = staircase["encoding"]["strokeDash"]  # the legend names the staircase
    assert named["scale"]["domain"] == [charts_module.FRONTIER] and named["legend"]["symbolType"] == "stroke"
    assert set(front["line"]) == {charts_module.FRONTIER} and "Pareto frontier" in charts_module.FRONTIER


def test_a_single_measured_point_still_draws_a_frontier_line() -> None:
    one = views.points_frame(bench_points()[:2])  # llama at 2048 tokens, concurrency 1 and 4
    spec = views.pareto_chart(one).to_dict()
    front = layer_rows(spec, spec["layer"][0])
    assert front.height >= 2 and front["latency_p50"].n_unique() == 2  # a line across the measured latencies


@pytest.mark.parametrize("windows", [(2048,), (2048, 4096, 8192)])
def test_latency_percentiles_differ_in_shape_and_line_style_whatever_the_windows(windows: tuple[int, ...]) -> None:
    points = views.points_frame(bench_points())
    curve = views.latest_points(points).filter(pl.col("num_ctx").is_in(windows) & (pl.col("concurrency") == 4))
    spec = views.latency_chart(curve, "num_ctx").to_dict()
    lines, dots = spec["layer"]
    dash, shape = lines["encoding"]["strokeDash"], dots["encoding"]["shape"]
    assert dash["field"] == shape["field"] == "percentile" and dash["title"] == shape["title"]  # one legend
    assert shape["scale"]["domain"] == dash["scale"]["domain"] == ["p50", "p90", "p99"]
    assert len(set(shape["scale"]["range"])) == 3 and len({str(r) for r in dash["scale"]["range"]}) == 3
    assert "solid" in shape["legend"]["labelExpr"] and "dotted" in dash["legend"]["labelExpr"]
    for layer in (lines, dots):  # colour is still the model, its marks side by side at each x
        assert layer["encoding"]["color"]["field"] == "model" and layer["encoding"]["xOffset"]["field"] == "model"
    data = layer_rows(spec, dots)
    assert data.group_by("model", "num_ctx").agg(pl.col("percentile").sort())["percentile"].to_list() == \
        [["p50", "p90", "p99"]] * 2 * len(windows)
    assert sorted(set(data["num_ctx"])) == list(windows)


def test_tables_write_missing_values_as_a_dash_and_numbers_with_their_format() -> None:
    capacities = FakeServer().client().capacity("llama3.2:1b", "tpot=0.1ms")  # nothing meets 0.1 ms per token
    raw = views.capacity_table(capacities)
    assert raw["goodput (req/s)"].null_count() == raw.height  # what Streamlit would draw as grey "None"
    shown = views.blanks(raw, views.RATE_FORMATS)
    assert not any(shown[c].null_count() for c in shown.columns)
    assert set(shown["goodput (req/s)"]) == {views.BLANK}
    assert set(views.written_as_text(raw, shown)) == {c for c in raw.columns if raw[c].null_count()}
    assert shown["num_ctx"].dtype == pl.Int64  # no gap: still a number (sorts as one)
    mixed = pl.DataFrame({"n": [3, None], "ms": [1.25, None], "text": ["a", None]})
    assert views.blanks(mixed, {"ms": "%.1f"}).rows() == [("3", "1.2", "a"), ("—", "—", "—")]
    preview = views.preview_file(b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
                                 b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}}\nnot json\n')
    lines = views.blanks(preview.lines)
    assert not any(lines[c].null_count() for c in lines.columns)
    assert lines.row(1, named=True)["prompt_tokens"] == views.BLANK and lines.row(0, named=True)["code"] == "—"
    problems = views.blanks(pl.concat([preview.problems, views.preview_file(b"").problems]))
    assert problems["line"].to_list() == ["2", views.BLANK]  # a whole-file problem has no line


def test_the_slo_tables_on_the_page_show_no_none(page: Callable[..., AppTest]) -> None:
    at = page()
    at.number_input(key="slo_tpot").set_value(0.1).run()  # no request meets 0.1 ms per token
    no_exception(at)
    shown = table(at, "model", "capacity", "goodput (req/s)")
    assert set(shown["goodput (req/s)"]) == {views.BLANK} and not shown.isna().any().any()
    goodput = table(at, "configuration", "goodput (req/s)", "met (%)")
    assert not goodput.isna().any().any()
    best = table(at, "model", "output tok/s", "success (%)")
    assert not best.isna().any().any()
