"""Benchmarks: throughput and latency of each model across context windows and concurrency, a compare view,
how past estimates held up, and a small sweep started from here."""

from __future__ import annotations

import time

import polars as pl
import streamlit as st

from obatch.ui import sweep, views
from obatch.ui.session import client, need, quietly

BEST = "best"
api = client()
st.title("Benchmarks")

best = views.bench_frame(need(api.benchmark_models))
if best.is_empty():
    st.info("No benchmark yet. Start a small sweep below (tab *Run a sweep*) or run `obatch bench` in a terminal.")
else:
    st.subheader("Best known configuration per model")
    st.dataframe(views.best_table(best), hide_index=True, width="stretch", key="best")

names = views.options_of(best, "model")
chosen = st.multiselect("Models", names, default=names[:4], key="models")
points = pl.concat([views.bench_frame(need(api.benchmark_history, name), model=name) for name in chosen]) \
    if chosen else views.bench_frame([])

context_tab, concurrency_tab, compare_tab, record_tab, sweep_tab = st.tabs(
    ["Context window", "Concurrency", "Compare", "Estimate vs actual", "Run a sweep"])


def curve_tab(axis: str, fixed: str, prefix: str, pick_key: str, label: str, help_text: str) -> list[int]:
    """Throughput and latency along ``axis`` at one level of ``fixed`` (or each point at its best); the levels."""
    levels = sorted({int(c) for c in points[fixed].drop_nulls().to_list()})
    pick = st.selectbox(label, [BEST, *levels], key=pick_key, help=help_text)
    curve = views.along(points, axis, fixed=fixed, value=None if pick == BEST else int(pick))
    left, right = st.columns(2)
    left.altair_chart(views.metric_chart(curve, axis, "tokens_per_s"), key=f"{prefix}_tokens")
    right.altair_chart(views.metric_chart(curve, axis, "requests_per_s"), key=f"{prefix}_requests")
    st.altair_chart(views.latency_chart(curve, axis), key=f"{prefix}_latency")
    return levels


with context_tab:
    curve_tab("num_ctx", "concurrency", "ctx", "ctx_concurrency", "At concurrency",
              "'best': each window at its fastest measured concurrency.")

with concurrency_tab:
    windows = curve_tab("concurrency", "num_ctx", "conc", "conc_ctx", "At context window",
                        "'best': each concurrency at its fastest measured window.")

with compare_tab:
    windows = sorted({int(c) for c in best["num_ctx"].drop_nulls().to_list()} | set(windows))
    window = st.selectbox("Context window", ["any", *windows], key="cmp_ctx")
    compared = views.bench_frame(need(api.benchmark_compare, chosen, num_ctx=None if window == "any" else int(window))
                                 ) if chosen else views.bench_frame([])
    st.altair_chart(views.compare_chart(compared), key="cmp_chart")
    st.dataframe(views.best_table(views.best_per(views.latest_points(compared), "model")), hide_index=True,
                 width="stretch", key="cmp_table")

with record_tab:
    record = views.estimate_record_frame(sweep.estimate_records(api))
    if record.is_empty():
        st.info("No finished batch with an estimate yet: each batch started after a benchmark gets one.")
    else:
        st.altair_chart(views.estimate_record_chart(record), key="record_chart")
        st.dataframe(record.with_columns(pl.col(pl.Float64).round(2)), hide_index=True, width="stretch",
                     key="record_table")

with sweep_tab:
    job: sweep.SweepJob | None = st.session_state.get("sweep_job")
    if job is None or not job.running:
        model_ids = [m["id"] for m in quietly(api.list_models) or []]
        with st.form("sweep_form"):
            st.caption("Runs `obatch bench` next to this UI, on the server's backend; points appear above as they "
                       "are stored.")
            sweep_models = st.multiselect("Models", model_ids, default=model_ids[:1], key="sweep_models")
            left, right = st.columns(2)
            sweep_ctx = left.multiselect("Context windows", sweep.NUM_CTX_CHOICES, default=[2048, 4096],
                                         key="sweep_ctx")
            sweep_conc = right.multiselect("Concurrency", sweep.CONCURRENCY_CHOICES, default=[1, 2],
                                           key="sweep_conc")
            sweep_requests = left.number_input("Requests per point", 1, 512, 8, key="sweep_requests")
            sweep_workload = right.selectbox("Workload", sweep.WORKLOADS, index=1, key="sweep_workload")
            start = st.form_submit_button("Start sweep", type="primary", icon=":material/play_arrow:")
        plan = sweep.SweepPlan(tuple(sweep_models), tuple(sweep_ctx), tuple(sweep_conc), int(sweep_requests),
                               sweep_workload)
        if start and plan.problem():
            st.error(plan.problem(), icon=":material/block:")
        elif start:
            st.session_state["sweep_job"] = sweep.start_sweep(plan)
            st.rerun()

    if job is not None:

        @st.fragment(run_every=1.0 if job.running else None)
        def sweep_status(job: sweep.SweepJob = job) -> None:
            done = sweep.sweep_progress(api, job) if job.running else job.plan.points
            total = job.plan.points
            st.progress(done / total if total else 1.0, text=f"sweep: {done} of {total} point(s) measured · "
                                                              f"{views.format_seconds(time.time() - job.started)}")
            if job.running:
                if st.button("Stop sweep", icon=":material/stop_circle:", key="sweep_stop"):
                    job.stop()
                    st.rerun()
                return
            job.finish()
            if st.session_state.pop("sweep_was_running", False):
                st.rerun()  # redraw the charts with the new points
            if job.returncode == 0:
                st.success("Sweep finished.", icon=":material/check_circle:")
            else:
                st.error(f"The sweep stopped (exit status {job.returncode}).", icon=":material/error:")
            st.code(job.output() or "(no output)", language="text")

        if job.running:
            st.session_state["sweep_was_running"] = True
        sweep_status()
