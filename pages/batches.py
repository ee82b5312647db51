"""Batches: upload a JSONL file, check every line before sending it, submit, watch it run, download the results."""

from __future__ import annotations

import hashlib
import time

import streamlit as st

from obatch.protocol import Batch
from obatch.ui import views
from obatch.ui.session import attempt, client, file_bytes, need, quietly

REFRESH_SECONDS = 2.0
AS_IN_FILE = "(as in the file)"
WINDOWS = ["24h", "1h", "6h", "7d"]
PICK = "batch_pick"

api = client()
st.title("Batches")

# ------------------------------------------------------------------------------------------ new batch
st.subheader("New batch")
upload = st.file_uploader("Batch input file (JSONL: one `{custom_id, method, url, body}` per line)",
                          type=["jsonl", "json", "txt"], key="upload")
model_ids = [m["id"] for m in quietly(api.list_models) or []]
left, middle, right = st.columns(3)
override = left.selectbox("Model override", [AS_IN_FILE, *model_ids], help="Run every line on this model.")
concurrency = middle.number_input("Concurrency", min_value=0, max_value=256, value=0, step=1,
                                  help="Requests in flight at once; 0 lets the server choose.")
window = right.selectbox("Completion window", WINDOWS, help="Unfinished requests expire after this.")
model = None if override == AS_IN_FILE else override

if upload is not None:
    preview = views.preview_file(upload.getvalue(), model=model)
    if preview.ok:
        st.success(f"**{upload.name}**: {preview.n_requests} requests, all valid · endpoint `{preview.endpoint}` · "
                   f"model(s): {', '.join(preview.models)}", icon=":material/check_circle:")
    else:
        st.error(f"**{upload.name}**: {preview.n_problems} problem(s) in {preview.lines.height} line(s). "
                 "Fix them before submitting.", icon=":material/block:")
        st.dataframe(preview.problems, hide_index=True, width="stretch", key="problems")
    with st.expander("Every line (bad ones in red)", expanded=not preview.ok):
        st.dataframe(views.highlight_errors(preview.lines), hide_index=True, width="stretch", key="lines")
    uploaded = None
    if preview.ok:  # the file itself is estimated, as the server will estimate its batch at the start
        uploads = st.session_state.setdefault("estimate_uploads", {})
        content_key = (hashlib.sha256(upload.getvalue()).hexdigest(), upload.name)
        if content_key not in uploads:
            uploads[content_key] = quietly(api.upload_file, upload.getvalue(), upload.name)
        uploaded = uploads[content_key]
        asked = {"model": model, "concurrency": int(concurrency) or None}
        estimate = quietly(api.estimate, input_file_id=uploaded.id, **asked) if uploaded else None
        sentence, config = views.describe_estimate(estimate), views.estimate_config(estimate)
        st.caption(f"Expected duration from the benchmarks: {sentence}{f' ({config})' if config else ''}."
                   if sentence else "No benchmark of this model yet: no duration estimate.")
        if uploaded and views.offers_pilot(estimate) and st.button(
                f"Run a pilot of {views.PILOT_LINES} lines", key="pilot", icon=":material/science:",
                help="Runs a random sample of the file now to learn its answer lengths; the batch then takes those "
                     "lines as finished."):
            with st.spinner("Running the pilot…"):
                if attempt(api.estimate, input_file_id=uploaded.id, pilot=views.PILOT_LINES, **asked):
                    st.rerun()
        if notes := views.estimate_notes(estimate):
            with st.expander("How this estimate was made"):
                st.markdown("\n".join(f"- {note}" for note in notes))
    if st.button("Submit batch", type="primary", disabled=not preview.ok, key="submit"):
        stored = uploaded or attempt(api.upload_file, upload.getvalue(), upload.name)
        created = stored and attempt(api.create_batch, stored.id, endpoint=preview.endpoint or "",
                                     completion_window=window, model=model, concurrency=int(concurrency) or None,
                                     metadata={"source": "obatch-ui", "filename": upload.name[:512]})
        if created:
            st.session_state[PICK] = created.id
            st.success(f"Submitted **{created.id}** ({created.status}).", icon=":material/rocket_launch:")


# ------------------------------------------------------------------------------------------- the list
def batch_label(batch: Batch) -> str:
    """Only what never changes: a selectbox keeps the labels it was first drawn with."""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at))
    name = (batch.metadata or {}).get("filename")
    return f"{batch.id} · {created}" + (f" · {name}" if name else "")


def show_results(batch: Batch) -> None:
    """Downloads and a filterable table of the output and error files."""
    output = file_bytes(batch.output_file_id) if batch.output_file_id else None
    errors = file_bytes(batch.error_file_id) if batch.error_file_id else None
    left, right = st.columns(2)
    if output is not None:
        left.download_button("Download output", output, file_name=f"{batch.id}_output.jsonl",
                             mime="application/jsonl", on_click="ignore", key=f"out-{batch.id}",
                             icon=":material/download:")
    if errors is not None:
        right.download_button("Download errors", errors, file_name=f"{batch.id}_errors.jsonl",
                              mime="application/jsonl", on_click="ignore", key=f"err-{batch.id}",
                              icon=":material/download:")
    results = views.results_frame(output, errors)
    status_col, reason_col, latency_col = st.columns(3)
    statuses = status_col.multiselect("Status", views.options_of(results, "status"), key=f"st-{batch.id}")
    reasons = reason_col.multiselect("Finish reason", views.options_of(results, "finish_reason"),
                                     key=f"fr-{batch.id}")
    latency = results["latency_ms"].drop_nulls()
    bounds = None
    if latency.len() and latency.min() != latency.max():
        low, high = float(latency.min()), float(latency.max())  # type: ignore[arg-type]
        picked = latency_col.slider("Latency (ms)", low, high, (low, high), key=f"lat-{batch.id}")
        bounds = None if picked == (low, high) else picked  # the full range keeps lines without a latency
    else:
        latency_col.caption("Latency: not reported in these files.")
    shown = views.filter_results(results, statuses=statuses, finish_reasons=reasons, latency_ms=bounds)
    st.caption(f"{shown.height} of {results.height} requests")
    st.dataframe(shown, hide_index=True, width="stretch", key=f"res-{batch.id}")


def show_batch(batch: Batch) -> None:
    """Status, live progress (throughput, ETA), cancel, and the results once there are any."""
    estimate = (batch.obatch or {}).get("estimate")  # the one made at its start (the ETA refines it as it runs)
    progress = views.batch_progress(batch, estimate=estimate)
    st.markdown(f"**{batch.id}** · status **`{batch.status}`** · model `{batch.model or 'as in the file'}` · "
                f"`{batch.endpoint}`")
    st.progress(progress.fraction, text=f"{progress.done} of {progress.total} requests · {progress.completed} "
                                        f"succeeded · {progress.failed} failed")
    a, b, c, d = st.columns(4)
    a.metric("Requests / s", f"{progress.requests_per_s:.2f}" if progress.requests_per_s is not None else "—")
    b.metric("Output tokens / s", f"{progress.tokens_per_s:.1f}" if progress.tokens_per_s is not None else "—")
    c.metric("Elapsed", views.format_seconds(progress.elapsed_s))
    d.metric("ETA", "done" if views.is_final(batch) else views.format_seconds(progress.eta_s),
             help=f"Benchmark estimate: {views.describe_estimate(estimate)}" if estimate else None)
    cancellable = not views.is_final(batch) and batch.status != "cancelling"
    if cancellable and st.button("Cancel batch", key=f"cancel-{batch.id}", icon=":material/stop_circle:") \
            and attempt(api.cancel_batch, batch.id):
        st.rerun()  # show it cancelling
    if batch.status == "failed":
        st.error("The input file was refused; its problems:", icon=":material/block:")
        st.dataframe(views.batch_errors_frame(batch), hide_index=True, width="stretch")
    if batch.output_file_id or batch.error_file_id:
        show_results(batch)


st.subheader("Your batches")
live = st.toggle("Live refresh", value=True, help=f"Refresh every {REFRESH_SECONDS:.0f} s while a batch runs.")
first = need(api.list_batches, limit=50)
running = any(not views.is_final(b) for b in first.data)


@st.fragment(run_every=REFRESH_SECONDS if live and running else None)
def batches_panel() -> None:
    batches = need(api.list_batches, limit=50).data
    if not batches:
        st.info("No batch yet: upload a file above.")
        return
    if running and all(views.is_final(b) for b in batches):
        st.rerun()  # the last batch finished: redraw the page without the timer
    st.dataframe(views.batches_frame(batches).drop("input_file_id"), hide_index=True, width="stretch",
                 key="batch_table", column_config={
                     "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0),
                     "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss")})
    by_id = {b.id: b for b in batches}
    if st.session_state.get(PICK) not in by_id:
        st.session_state[PICK] = batches[0].id
    picked = st.selectbox("Batch", list(by_id), key=PICK, format_func=lambda i: batch_label(by_id[i]))
    show_batch(by_id[picked])


batches_panel()
