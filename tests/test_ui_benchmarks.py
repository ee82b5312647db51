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
