"""Benchmarks: each model's best configuration (as the server names it), goodput and capacity under an SLO the user
types, throughput and latency across context windows, concurrency and request rates, throughput against latency,
a compare view, how past estimates held up, and sweeps the server runs on its own backend."""

from __future__ import annotations

import polars as pl
import streamlit as st

from obatch.bench.schemas import Sweep
from obatch.ui import sweep, views
from obatch.ui.session import attempt, client, need, quietly
from obatch.ui.tables import table

BEST = "best"
api = client()
st.title("Benchmarks")

best = views.configs_frame(need(api.benchmark_models))
sweeps: list[Sweep] = quietly(api.list_sweeps) or []
running = next((s for s in sweeps if s.active), None)


def sweep_form() -> None:
    """The sweep form; a started sweep's id goes to session state (its progress is drawn by ``sweep_status``)."""
    model_ids = [m.id for m in quietly(api.list_models) or []]
    with st.form("sweep_form"):
        st.caption("The server measures its own backend, one point (model × context window × concurrency) at a "
                   "time, while no batch runs; the points are stored in the server's store.")
        sweep_models = st.multiselect("Models", model_ids, default=model_ids[:1], key="sweep_models")
        left, right = st.columns(2)
        sweep_ctx = left.multiselect("Context windows", sweep.NUM_CTX_CHOICES, default=[2048], key="sweep_ctx")
        sweep_conc = right.multiselect("Concurrency", sweep.CONCURRENCY_CHOICES, default=[1, 2], key="sweep_conc")
        sweep_requests = left.number_input("Requests per point", 1, 512, 8, key="sweep_requests")
        sweep_workload = right.selectbox("Workload", sweep.WORKLOADS, index=1, key="sweep_workload")
        sweep_rates = left.text_input("Request rates, req/s (optional)", key="sweep_rates", placeholder="e.g. 2,4,8",
                                      help="Open loop: requests sent at this rate whatever the engine answers, "
                                           "beside the concurrency levels.")
        sweep_arrival = right.selectbox("Arrivals", ("poisson", "constant"), key="sweep_arrival")
        start = st.form_submit_button("Start sweep", type="primary", icon=":material/play_arrow:")
    plan = sweep.SweepPlan(tuple(sweep_models), tuple(sweep_ctx), tuple(sweep_conc), int(sweep_requests),
                           sweep_workload, rates=sweep_rates, arrival=sweep_arrival)
    if start and plan.problem():
        st.error(plan.problem(), icon=":material/block:")
    elif start:
        started = attempt(sweep.start, api, plan)
        if started is not None:
            st.session_state["sweep_id"] = started.id
            st.rerun()


@st.fragment(run_every=1.0)
def sweep_status(sweep_id: str) -> None:
    """Points done of total while the server runs the sweep; when it ends, the page redraws with its points."""
    current = quietly(api.get_sweep, sweep_id)
    if current is None:
        return
    total = current.points_total
    st.progress(current.points_done / total if total else 1.0, text=sweep.progress_text(current))
    if current.active:
        if current.status != "cancelling" and st.button("Cancel sweep", icon=":material/stop_circle:",
                                                        key="sweep_cancel"):
            attempt(api.cancel_sweep, sweep_id)
        return
    if st.session_state.get("sweep_seen_done") != sweep_id:
        st.session_state["sweep_seen_done"] = sweep_id
        st.session_state.pop("models", None)  # the finished sweep's models become the selection
        st.rerun(scope="app")


def sweep_outcome() -> None:
    """How the sweep started from this page ended (shown above the charts it fed)."""
    last = next((s for s in sweeps if s.id == st.session_state.get("sweep_id")), None)
    if last is None or last.active:
        return
    if last.status == "completed":
        st.success(f"Sweep finished: {last.points_done} point(s) measured on {last.backend}.",
                   icon=":material/check_circle:")
    elif last.status == "failed":
        st.error(f"The sweep failed: {last.error}", icon=":material/error:")
    else:
        st.warning(f"Sweep {last.status}: {last.points_done} of {last.points_total} point(s) measured (kept).",
                   icon=":material/stop_circle:")


def sweep_section() -> None:
    shown = running.id if running is not None else st.session_state.get("sweep_id")
    if running is None:
        sweep_form()
    if shown is not None and (running is not None or st.session_state.get("sweep_seen_done") != shown):
        sweep_status(shown)


sweep_outcome()
if best.is_empty():
    st.info("No benchmark yet: the server has no measured points. Start a sweep here (the server measures its own "
            "backend) or run `obatch bench --server URL` in a terminal; the charts appear with the first point.",
            icon=":material/speed:")
    sweep_section()
    st.stop()

st.subheader("Best known configuration per model")
st.caption("Best: among configurations whose requests succeeded ≥ 99%, the highest output tokens/s; within 2% of "
           "it, the smallest context window, then the smallest concurrency.")
table(views.best_table(best), key="best", formats=views.BEST_FORMATS)
csv_col, json_col, _ = st.columns([1, 1, 2])
csv_col.download_button("Points as CSV", lambda: api.export_benchmarks("csv"), file_name="obatch-benchmarks.csv",
                        mime="text/csv", icon=":material/download:", key="export_csv",
                        help="Every measured point with the environment of the run that measured it.")
json_col.download_button("Points as JSON", lambda: api.export_benchmarks("json"), file_name="obatch-benchmarks.json",
                         mime="application/json", icon=":material/download:", key="export_json")

names = sorted(set(best["model"].to_list()))
finished = next((s for s in sweeps if s.status == "completed"), None)
if "models" not in st.session_state:
    from_sweep = [m for m in finished.params.models if m in names] if finished is not None else []
    st.session_state["models"] = from_sweep or names[:4]
st.session_state["models"] = [m for m in st.session_state["models"] if m in names]
chosen = st.multiselect("Models", names, key="models")
ttft_col, tpot_col, _ = st.columns([1, 1, 2])
slo = views.slo_text(
    ttft_col.number_input("SLO: TTFT ≤ ms", min_value=1.0, value=None, step=50.0, key="slo_ttft",
                          placeholder="no bound", help="Time to first token. Empty bounds: no SLO view."),
    tpot_col.number_input("SLO: TPOT ≤ ms", min_value=0.1, value=None, step=5.0, key="slo_tpot",
                          placeholder="no bound", help="Time per output token after the first."))
points = views.points_frame([p for name in chosen for p in need(api.benchmark_history, name, slo=slo)])
chosen_best = best.filter(pl.col("model").is_in(chosen))
if slo is not None:
    st.caption(f"Goodput: requests per second that succeeded within {slo.replace(',', ' and ')}. Capacity: the "
               "highest measured concurrency (or offered request rate) at which at least 95% of requests met it.")
    found = [c for name in chosen for c in attempt(api.capacity, name, slo) or []]
    table(views.capacity_table(found), key="capacity", formats=views.RATE_FORMATS)
    with st.expander("Goodput per configuration"):
        table(views.goodput_table(points), key="goodput", formats=views.RATE_FORMATS)
rated = points.filter(pl.col("rate").is_not_null())

labels = ["Context window", "Concurrency", *(["Request rate"] if not rated.is_empty() else []),
          "Throughput vs latency", "Compare", "Estimate vs actual", "Run a sweep"]
tabs = dict(zip(labels, st.tabs(labels), strict=True))
context_tab, concurrency_tab, pareto_tab, compare_tab, record_tab, sweep_tab = (
    tabs[k] for k in ("Context window", "Concurrency", "Throughput vs latency", "Compare", "Estimate vs actual",
                      "Run a sweep"))


def curve_tab(axis: str, fixed: str, prefix: str, pick_key: str, label: str, help_text: str) -> list[int]:
    """Throughput and latency along ``axis`` at one level of ``fixed`` (or at each model's best); the levels."""
    levels = sorted({int(c) for c in points.filter(pl.col("rate").is_null())[fixed].drop_nulls().to_list()})
    pick = st.selectbox(label, [BEST, *levels], key=pick_key, help=help_text)
    curve = views.along(points, axis, fixed=fixed, value=None if pick == BEST else int(pick), best=chosen_best)
    left, right = st.columns(2)
    left.altair_chart(views.metric_chart(curve, axis, "output_tps"), key=f"{prefix}_tokens", width="stretch")
    right.altair_chart(views.metric_chart(curve, axis, "req_per_s"), key=f"{prefix}_requests", width="stretch")
    st.altair_chart(views.latency_chart(curve, axis), key=f"{prefix}_latency", width="stretch")
    return levels


with context_tab:
    curve_tab("num_ctx", "concurrency", "ctx", "ctx_concurrency", "At concurrency",
              "'best': each model at its best configuration's concurrency.")

with concurrency_tab:
    windows = curve_tab("concurrency", "num_ctx", "conc", "conc_ctx", "At context window",
                        "'best': each model at its best configuration's context window.")

if "Request rate" in tabs:
    with tabs["Request rate"]:
        st.caption("Open-loop load: requests sent at the offered rate whatever the engine answers (`obatch bench "
                   "--rate`). Achieved: the rate they really went out at; latency grows where the engine falls "
                   "behind.")
        rate_windows = sorted({int(n) for n in rated["num_ctx"].to_list()})
        window_pick = st.selectbox("At context window", rate_windows, key="rate_ctx")
        curve = views.rate_points(points, int(window_pick))
        left, right = st.columns(2)
        left.altair_chart(views.metric_chart(curve, "rate", "achieved_rate"), key="rate_achieved", width="stretch")
        right.altair_chart(views.metric_chart(curve, "rate", "req_per_s"), key="rate_requests", width="stretch")
        st.altair_chart(views.latency_chart(curve, "rate"), key="rate_latency", width="stretch")

with pareto_tab:
    st.caption("Each point is a configuration (context window and concurrency or request rate), at its newest "
               "measurement. The staircase is each model's Pareto frontier: the most output tokens/s measured at "
               "that p50 latency or lower; a faint point has another configuration both quicker and faster.")
    st.altair_chart(views.pareto_chart(points), key="pareto_chart", width="stretch")

with compare_tab:
    window = st.selectbox("Context window", ["any", *windows], key="cmp_ctx")
    compared = views.configs_frame(need(api.benchmark_compare, chosen, num_ctx=None if window == "any"
                                        else int(window))) if chosen else views.configs_frame([])
    bars = int(compared["best"].sum())
    st.altair_chart(views.compare_chart(compared), key="cmp_chart", width="stretch", height=44 * max(bars, 1) + 90)
    table(views.best_table(compared), key="cmp_table", formats=views.BEST_FORMATS)

with record_tab:
    record = views.estimate_record_frame(sweep.estimate_records(api))
    if record.is_empty():
        st.info("No finished batch with an estimate yet: each batch started after a benchmark gets one.")
    else:
        st.altair_chart(views.estimate_record_chart(record), key="record_chart")
        table(record, key="record_table", formats={name: "%.2f" for name, dtype in record.schema.items()
                                                    if dtype == pl.Float64})

with sweep_tab:
    sweep_section()
