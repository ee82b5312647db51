"""Batches: upload a JSONL file, check every line before sending it, submit, watch it run, download the results."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import polars as pl
import streamlit as st

from obatch.client import ApiError, ClientError
from obatch.protocol import Batch, DeadlinePlan, DurationEstimate, FileObject
from obatch.ui import views
from obatch.ui.session import attempt, backend_up, client, engine_problem, file_bytes, need, quietly, show_error
from obatch.ui.tables import column_config, table

REFRESH_SECONDS = 2.0
AS_IN_FILE = "(as in the file)"
WINDOWS = ["24h", "6h", "1h", "30m", "10m", "7d"]  # or one typed in ("90m", "2h"): the server checks it
STRICT = "obatch_strict_window"  # the metadata key that makes the server refuse a batch certain to miss its window
PICK = "batch_pick"
ROUND = "upload_round"  # bumped after a submission: a new uploader key empties the form
SUBMITTED = "submitted_batch"  # the batch just submitted: its banner follows the batch's real status
CONFIRM = "confirm_cancel"  # the batch whose cancel waits for confirmation
DIGEST = "sha256"  # the metadata key holding the submitted file's digest (the double-submit guard)
USER_LINES = "user_lines"  # a batch of only a file's valid lines: their numbers in the uploaded file ("1-4,6")
LINES = "lines_sha256"  # and the digest of its valid lines: a file of the same lines is the same batch again
LIVE = "live_results"  # per batch id: what was read of its results so far (views.LiveResults)
RETRIED = "retried"  # the batch a "Retry failed lines" click made (its banner names the batch it retries)
RETRY_FAILED = "retry_failed"  # (batch id, the error) of a retry the server refused
MERGED = "merged_results"  # per chain (its batch ids): the merged read of its results (views.RawResults)
CHAIN_IDS = "chain_line_ids"  # per final batch of a chain: its lines' ids (which batch a merged line came from)
CHAIN_TABLES = "chain_tables"  # per final chain: its merged table, made once

api = client()
st.title("Batches")
recent = need(api.list_batches, limit=50).data


def ago(stamp: int) -> str:
    return f"{views.format_seconds(time.time() - stamp)} ago"


def lines_digest(preview: views.Preview) -> str:
    """The digest of a file's valid lines as they would run (a file and its "valid lines" download share it)."""
    return hashlib.sha256(preview.valid_bytes()).hexdigest()[:32]


def submit(content: bytes, name: str, preview: views.Preview, *, window: str, model: str | None,
           concurrency: int | None, strict: bool, digest: str, stored: FileObject | None = None,
           user_lines: str = "") -> None:
    """Upload (unless the estimate already did), create the batch, empty the form; the banner in the list below
    then follows the batch."""
    stored = stored or attempt(api.upload_file, content, name)
    metadata = {"source": "obatch-ui", "filename": name[:512], DIGEST: digest, LINES: lines_digest(preview),
                views.MODELS_KEY: ", ".join(preview.models)[:512]}
    if user_lines and len(user_lines) <= 512:  # longer (a very scattered file): the valid file's own numbers
        metadata[USER_LINES] = user_lines
    if strict:
        metadata[STRICT] = "true"
    created = stored and attempt(api.create_batch, stored.id, endpoint=preview.endpoint or "",
                                 completion_window=window, model=model, concurrency=concurrency, metadata=metadata)
    if created:
        st.session_state[PICK] = st.session_state[SUBMITTED] = created.id
        st.session_state[ROUND] = st.session_state.get(ROUND, 0) + 1
        st.rerun()


def estimate_of(**params: Any) -> tuple[DurationEstimate | None, bool, bool]:
    """The server's estimate, whether it has no benchmark for it (a pilot still can estimate then), and whether
    the server accepts the completion window: one it refuses is said (a batch would be refused with it too) and the
    estimate asked without it."""
    try:
        return api.estimate(**params), False, True
    except ApiError as exc:
        if exc.param == "completion_window" and params.get("completion_window"):
            st.error(f"Completion window: {exc.message}", icon=":material/schedule:")
            return *estimate_of(**(params | {"completion_window": None}))[:2], False
        return None, exc.status == 404 and exc.code != "unknown_url", True
    except ClientError:
        return None, False, True


def estimate_section(data: bytes, name: str, preview: views.Preview, asked: dict[str, Any]
                     ) -> tuple[FileObject | None, bool]:
    """The expected duration of what would be submitted (the file, or only its valid lines), and a pilot where
    answer lengths are unknown or no benchmark exists. A valid file is uploaded at once and estimated as the server
    will estimate its batch; the valid lines of a file with problems are estimated from their sizes, and uploaded
    only for a pilot. Returns the uploaded file (the one to submit: the batch takes a pilot's lines as finished),
    and whether the server accepts the completion window."""
    if not preview.n_requests:
        return None, True
    uploads: dict[str, FileObject | None] = st.session_state.setdefault("estimate_uploads", {})
    key = hashlib.sha256(data).hexdigest()[:32]
    if preview.ok and key not in uploads:
        uploads[key] = quietly(api.upload_file, data, name)
    stored = uploads.get(key)
    models = [asked["model"]] if asked["model"] else preview.models
    prompt, output = preview.mean_tokens()
    if stored is not None:
        estimate, missing, window_ok = estimate_of(input_file_id=stored.id, **asked)
    elif len(models) == 1:
        estimate, missing, window_ok = estimate_of(
            model=models[0], num_requests=preview.n_requests, prompt_tokens=prompt, output_tokens=output,
            concurrency=asked["concurrency"], completion_window=asked["completion_window"])
    else:
        estimate, missing, window_ok = None, False, True
    what = "" if preview.ok else f" of the {preview.n_requests} valid line(s)"
    sentence, config = views.describe_estimate(estimate), views.estimate_config(estimate)
    if views.is_guess(estimate):
        st.info("Answer lengths unknown: the duration below is a **guess**, and its interval spans what the model "
                "could answer (from one token to each line's cap). Run a pilot first to measure them.",
                icon=":material/help:")
    if views.is_guess(estimate) or views.offers_pilot(estimate) or missing:
        pilot_button(data, name, asked, uploads, key, stored)
    if sentence:
        st.caption(f"Expected duration{what} from the benchmarks: {sentence}{f' ({config})' if config else ''}.")
    elif missing:
        st.caption(f"No benchmark of this model yet: a pilot runs a sample{what} now and estimates from it.")
    else:
        st.caption(f"No duration estimate{what}.")
    deadline_section(estimate.deadline if estimate else None, guess=views.is_guess(estimate))
    if notes := views.estimate_notes(estimate):
        with st.expander("How this estimate was made"):
            st.markdown("\n".join(f"- {note}" for note in notes))
    return uploads.get(key), window_ok


def pilot_button(data: bytes, name: str, asked: dict[str, Any], uploads: dict[str, FileObject | None], key: str,
                 stored: FileObject | None) -> None:
    """"Run a pilot": upload the file if the estimate did not, run the pilot, redraw with its estimate."""
    if st.button(
            "Run a pilot", key="pilot", icon=":material/science:",
            help="Runs a random sample of the lines now to learn their answer lengths: 16 lines, more while they "
                 "vary too much to estimate from (up to a quarter of them). The batch then takes those lines as "
                 "finished."):
        with st.spinner("Running the pilot…"):
            stored = uploads[key] = stored or attempt(api.upload_file, data, name)
            if stored and attempt(api.estimate, input_file_id=stored.id, pilot=views.PILOT,
                                  **(asked | {"completion_window": None})):
                st.rerun()


def deadline_section(plan: DeadlinePlan | None, *, guess: bool = False, made: bool = False) -> None:
    """The estimate against the completion window picked: whether the batch is expected to miss it, by how much,
    and what would meet it (``GET /v1/benchmarks/estimate?completion_window=``); ``made``: a batch's own plan,
    said only when it expects a miss."""
    shown = views.deadline_view(plan, made=made)
    if shown is None or (made and shown.level != "miss"):
        return
    if guess and shown.level != "meets":
        shown.sentence += " The estimate is a guess until a pilot measures the answers."
    if shown.level == "meets":
        st.caption(shown.sentence)
        return
    if shown.level == "risk":
        st.info(shown.sentence, icon=":material/schedule:")
        return
    meets = ("Would meet it:\n" + "\n".join(f"- {option}" for option in shown.meets) if shown.meets else
             "No configuration the benchmarks measured meets it: give it a longer window.")
    st.warning(f"{shown.sentence}\n\n{meets}", icon=":material/schedule:")


# ------------------------------------------------------------------------------------------ new batch
st.subheader("New batch")
upload = st.file_uploader("Batch input file (JSONL: one `{custom_id, method, url, body}` per line)",
                          type=["jsonl", "json", "txt"], key=f"upload-{st.session_state.get(ROUND, 0)}")
model_ids = [m.id for m in (quietly(api.list_models) if backend_up(api) else None) or []]
left, middle, right = st.columns(3)
override = left.selectbox("Model override", [AS_IN_FILE, *model_ids], help="Run every line on this model.")
concurrency = middle.number_input("Concurrency", min_value=1, max_value=256, value=None, step=1, placeholder="auto",
                                  help="Requests in flight at once; empty (auto) lets the server find the best.")
window = right.selectbox("Completion window", WINDOWS, accept_new_options=True,
                         help="Unfinished requests expire after this. Pick one or type your own (`90m`, `2h`, `45s`: "
                              "from the server's minimum to 7 days). The estimate below says whether the batch is "
                              "expected to finish within it.") or WINDOWS[0]
model = None if override == AS_IN_FILE else override
level = int(concurrency) if concurrency else None

if upload is not None:
    content = upload.getvalue()
    digest = hashlib.sha256(content).hexdigest()[:32]
    preview = views.preview_file(content, model=model)
    if preview.ok:
        st.success(f"**{upload.name}**: {preview.n_requests} requests, all valid · endpoint `{preview.endpoint}` · "
                   f"model(s): {', '.join(preview.models)}", icon=":material/check_circle:")
    else:
        st.error(f"**{upload.name}**: {preview.n_problems} problem(s) in {preview.lines.height} line(s). "
                 "Fix them before submitting, or submit only the valid lines.", icon=":material/block:")
        table(preview.problems, key="problems")
    with st.expander("Every line (bad ones in red)", expanded=not preview.ok):
        shown = views.blanks(preview.lines)
        st.dataframe(views.highlight_errors(shown), hide_index=True, width="stretch", key="lines",
                     column_config=column_config(preview.lines, shown, {}))
    valid_name = upload.name.rsplit(".", 1)[0] + ".valid.jsonl"
    asked = {"model": model, "concurrency": level, "completion_window": window}
    uploaded, window_ok = estimate_section(content if preview.ok else preview.valid_bytes(),
                                upload.name if preview.ok else valid_name, preview, asked)
    lines = lines_digest(preview) if preview.n_requests else None
    earlier = next((b for b in recent if not views.parent_of(b) and ((b.metadata or {}).get(DIGEST) == digest
                    or (lines and (b.metadata or {}).get(LINES) == lines))), None)  # a retry keeps its metadata
    again = True
    if earlier is not None:
        same = "This file was" if (earlier.metadata or {}).get(DIGEST) == digest else "These lines were"
        st.warning(f"{same} submitted as **{earlier.id}** {ago(earlier.created_at)} "
                   f"(now `{earlier.status}`). Submitting it again makes a second batch.", icon=":material/warning:")
        again = st.checkbox("Submit it again anyway", key=f"again-{digest}")
    strict = st.checkbox("Refuse if it cannot finish in time", key="strict_window",
                         help="The server refuses the batch when even the estimate's lower bound is past the window "
                              "(metadata `obatch_strict_window`), instead of starting a batch that would expire.")
    options = {"window": window, "model": model, "concurrency": level, "strict": strict}
    if st.button("Submit batch", type="primary", disabled=not (preview.ok and again and window_ok), key="submit"):
        submit(content, upload.name, preview, digest=digest, stored=uploaded, **options)
    if not preview.ok and preview.n_requests:
        valid = preview.valid_bytes()
        left, right = st.columns(2)
        if left.button(f"Submit only the {preview.n_requests} valid line(s)", disabled=not (again and window_ok),
                       key="submit_valid", icon=":material/rule:"):
            kept = views.line_ranges(preview.lines.filter(pl.col("status") == "ok")["line"].to_list())
            submit(valid, valid_name, views.preview_file(valid, model=model), digest=digest, stored=uploaded,
                   user_lines=kept, **options)
        right.download_button(f"Download the {preview.n_requests} valid line(s)", valid, file_name=valid_name,
                              mime="application/jsonl", on_click="ignore", key="download_valid",
                              icon=":material/download:")


# ------------------------------------------------------------------------------------------- the list
def batch_label(batch: Batch) -> str:
    """Only what never changes: a selectbox keeps the labels it was first drawn with."""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at))
    name = (batch.metadata or {}).get("filename")
    return f"{batch.id} · {created}" + (f" · {name}" if name else "")


def open_batch(batch_id: str) -> None:
    """Open another batch (a button's callback: it runs before the batch picker is drawn)."""
    st.session_state[PICK] = batch_id


def retry_failed(batch_id: str) -> None:
    """``POST /v1/batches/{id}/retry``, then open the new batch (a button's callback)."""
    try:
        made = api.retry_batch(batch_id)
    except ClientError as exc:
        st.session_state[RETRY_FAILED] = (batch_id, exc)
        return
    st.session_state[PICK] = st.session_state[RETRIED] = made.id


def pages_of(batch_id: str, *, merged: bool = False) -> Callable[[int, int], tuple[bytes, int, bool]]:
    """``read_more``'s ``fetch``: a page of ``GET /v1/batches/{id}/results`` (``merged``: over its retry chain)."""

    def fetch(after: int, limit: int) -> tuple[bytes, int, bool]:
        page = api.batch_results(batch_id, after=after, limit=limit, merged=merged)
        return page.raw, page.after, page.finished

    return fetch


def read_results(batch: Batch) -> views.LiveResults:
    """The batch's results read so far, and the pages finished since (``GET /v1/batches/{id}/results`` from the
    cursor: what was read is never asked again)."""
    store: dict[str, views.LiveResults] = st.session_state.setdefault(LIVE, {})
    live = store.get(batch.id) or views.LiveResults()
    if live.finished:
        return live
    try:
        live = views.read_more(live, pages_of(batch.id), final=views.is_final(batch))
    except ClientError as exc:
        show_error(exc, doing="read the results")
    store[batch.id] = live
    return live


def chain_links(batch: Batch) -> None:
    """The retry chain around the batch: the batch it retries and the batches that retry it, each one click away."""
    parent, retries = views.parent_of(batch), views.retries_of(batch)
    if parent:
        row = st.container(horizontal=True, vertical_alignment="center", gap="small")
        row.markdown(":material/subdirectory_arrow_right: Retry of the failed lines of")
        row.button(parent, key=f"parent-{batch.id}", type="tertiary", on_click=open_batch, args=(parent,),
                   help="Open the batch this one retries", icon=":material/arrow_outward:")
    if retries:
        row = st.container(horizontal=True, vertical_alignment="center", gap="small")
        row.markdown(f":material/replay: Its failed lines were retried in {len(retries)} batch(es):")
        for child in retries:
            row.button(child, key=f"child-{batch.id}-{child}", type="tertiary", on_click=open_batch, args=(child,),
                       help="Open the retry", icon=":material/arrow_outward:")


def read_all(batch_id: str, *, merged: bool = False) -> views.RawResults:
    """Every line of a batch's results finished now (``merged``: over its retry chain), page after page."""
    return views.read_more(views.RawResults(), pages_of(batch_id, merged=merged), final=True)


def merged_results(batch: Batch, known: dict[str, Batch]) -> None:
    """The chain's results as one (``/results?merged=true``): each line's latest outcome and the batch it came
    from, with a summary. Read again at each refresh while a batch of the chain runs (its lines change outcomes
    already read), once when the chain is final; a first batch whose files are gone is said in the server's words."""
    reads: dict[str, views.RawResults] = st.session_state.setdefault(MERGED, {})
    ids: dict[str, set[str]] = st.session_state.setdefault(CHAIN_IDS, {})
    tables: dict[str, pl.DataFrame] = st.session_state.setdefault(CHAIN_TABLES, {})
    try:
        chain = views.chain_of(batch, lambda i: known.get(i) or api.get_batch(i))
        key = " ".join(b.id for b in chain)
        if key not in reads or not reads[key].finished:
            reads[key] = read_all(batch.id, merged=True)
        for member in chain:
            if views.is_final(member) and member.id not in ids:
                read = read_all(member.id)
                if read.finished:
                    ids[member.id] = set(views.line_ids(read.raw))
    except ClientError as exc:
        if isinstance(exc, ApiError) and exc.status == 404:  # a first batch whose files are gone
            st.warning(f"The chain's merged results cannot be read: {exc.message}", icon=":material/folder_off:")
        else:
            show_error(exc, doing="read the chain's merged results")
        return
    merged = tables.get(key)
    if merged is None:
        sources = {line: member.id for member in chain for line in ids.get(member.id, ())}
        running = next((member.id for member in chain if not views.is_final(member)), None)
        merged = views.merged_frame(reads[key].raw, sources, running)
        if reads[key].finished and all(member.id in ids for member in chain):
            tables[key] = merged  # the chain is final: its table no longer changes
    st.caption(f"{views.merged_summary(merged, chain)}.")
    table(merged, key=f"merged-table-{batch.id}", formats={"latency_ms": "%.1f", "ttft_ms": "%.1f"})


def show_results(batch: Batch, live: views.LiveResults) -> None:
    """Downloads once the files exist, and a filterable table of the results read so far (it grows while the batch
    runs); a clicked row is shown whole, with where its answer came from."""
    output = file_bytes(batch.output_file_id) if batch.output_file_id else None
    errors = file_bytes(batch.error_file_id) if batch.error_file_id else None
    left, right = st.columns(2)
    for place, file_id, data, what in ((left, batch.output_file_id, output, "output"),
                                       (right, batch.error_file_id, errors, "error")):
        if file_id and data is None:
            place.caption(f"The {what} file `{file_id}` is gone (deleted, or past its expiry).")
    if output is not None:
        left.download_button("Download output", output, file_name=f"{batch.id}_output.jsonl",
                             mime="application/jsonl", on_click="ignore", key=f"out-{batch.id}",
                             icon=":material/download:")
    if errors is not None:
        right.download_button("Download errors", errors, file_name=f"{batch.id}_errors.jsonl",
                              mime="application/jsonl", on_click="ignore", key=f"err-{batch.id}",
                              icon=":material/download:")
    results = live.frame
    if not live.finished:
        total = batch.request_counts.total if batch.request_counts else 0
        st.caption(f"Results so far: the first {results.height} of {total} lines, in input order (a line still "
                   "running holds back those after it). The table grows as lines finish.")
    if (kept := (batch.metadata or {}).get(USER_LINES)) and not views.parent_of(batch):
        results = views.in_user_lines(results, views.expand_ranges(kept))
        st.caption("Only the valid lines of the uploaded file ran; `line` numbers them as in that file.")
    status_col, reason_col, latency_col = st.columns(3)
    tally = results["status"].value_counts()
    count = dict(zip(tally["status"].to_list(), tally["count"].to_list(), strict=True))
    statuses = status_col.multiselect("Status", views.STATUSES, key=f"st-{batch.id}",
                                      format_func=lambda s: f"{s} ({count.get(s, 0)})")
    reasons = reason_col.multiselect("Finish reason", views.options_of(results, "finish_reason"),
                                     key=f"fr-{batch.id}")
    bounds = None
    limits = views.latency_bounds(results) if live.finished else None  # bounds that move would reset the slider
    if not live.finished:
        latency_col.caption("Latency filter: once every line has finished.")
    elif limits is not None:
        picked = latency_col.slider("Latency (ms)", *limits, value=limits, step=1, key=f"lat-{batch.id}")
        bounds = None if picked == limits else picked  # the full range keeps lines without a latency
    else:
        latency_col.caption("Latency: not reported in these files.")
    shown = views.filter_results(results, statuses=statuses, finish_reasons=reasons, latency_ms=bounds)
    st.caption(f"{shown.height} of {results.height} requests · click a row to read it whole")
    event = table(views.for_display(shown), key=f"res-{batch.id}", formats={"latency_ms": "%.1f", "ttft_ms": "%.1f"},
                  on_select="rerun", selection_mode="single-row")
    rows = event.selection.rows if event else []
    if rows and rows[0] < shown.height:
        line = shown.row(rows[0], named=True)
        st.markdown(f"**{line['custom_id']}** · `{line['status']}`"
                    + (f" · `{line['error_code']}`: {line['error_message']}" if line["error_code"] else ""))
        if facts := views.row_facts(line):
            st.caption(facts)
        source = file_bytes(batch.input_file_id)
        prompt = views.request_prompt(source, line["custom_id"]) if source is not None else None
        question, answer, origin = st.columns([3, 3, 2])
        question.markdown("**Request**")
        question.text(prompt or ("(not found in the input file)" if source is not None else
                                 "(the input file is gone)"))
        answer.markdown("**Answer**")
        answer.text(line["content"] or "(no content)")
        origin.markdown("**Provenance**")
        origin.markdown("\n".join(f"- {what}: `{value}`" for what, value in views.provenance_frame(line).rows()))


def show_batch(batch: Batch, known: dict[str, Batch]) -> None:
    """Status, live progress (throughput, ETA), cancel (confirmed), and the results once there are any."""
    estimate = batch.obatch.estimate if batch.obatch else None  # made at its start (the ETA refines it as it runs)
    down = None if views.is_final(batch) else engine_problem(api)
    progress = views.batch_progress(batch, estimate=estimate, engine_up=down is None)
    st.markdown(f"**{batch.id}** · status **`{batch.status}`** · model `{views.model_of(batch)}` · "
                f"`{batch.endpoint}`")
    if st.session_state.get(RETRIED) == batch.id and views.parent_of(batch):
        st.success(f"{'Retried' if views.is_final(batch) else 'Retrying'} the failed lines of "
                   f"**{views.parent_of(batch)}** as **{batch.id}** "
                   f"({batch.request_counts.total if batch.request_counts else 0} line(s)).",
                   icon=":material/replay:")
    chain_links(batch)
    if (views.parent_of(batch) or views.retries_of(batch)) and st.toggle(
            "Merged results of the chain", key=f"merged-{batch.id}",
            help="Each line's latest outcome across this batch, the batch it retries and their retries, with the "
                 "batch it came from."):
        with st.container(border=True):  # set apart from this batch's own progress and results below
            merged_results(batch, known)
    deadline_section(batch.obatch.deadline if batch.obatch else None, made=True)
    if reused := views.reuse_text(batch):
        st.caption(f":material/recycling: {reused}.")
    ran = bool(batch.in_progress_at or batch.output_file_id or batch.error_file_id)
    live = read_results(batch) if ran else None
    if progress.waiting:
        st.warning(f"The engine does not answer ({down or 'no host answers the batch'}). The batch waits and goes "
                   "on where it stopped once the "
                   "engine is back; no line is lost. Its ETA is paused meanwhile.", icon=":material/warning:")
    st.progress(progress.fraction, text=progress.sentence(batch.status))
    a, b, c, d = st.columns(4)
    more = "≥ " if progress.rates_at_least else ""  # ended within its first second: rates over one second
    a.metric("Requests / s", f"{more}{progress.requests_per_s:.2f}" if progress.requests_per_s is not None else "—")
    b.metric("Output tokens / s", f"{more}{progress.tokens_per_s:.1f}" if progress.tokens_per_s is not None else "—")
    c.metric("Elapsed", views.format_seconds(progress.elapsed_s))
    final = {"completed": "done", "cancelled": "cancelled", "expired": "expired", "failed": "—"}
    d.metric("ETA", final.get(batch.status) or progress.eta_text,
             help="Paused: waiting for the engine to answer again." if progress.waiting else
             f"Benchmark estimate: {views.describe_estimate(estimate)}" if estimate else None)
    if running_on := views.concurrency_text(batch):
        st.caption(f"Concurrency: {running_on}" + (" (as it ended)" if views.is_final(batch) else ""))
        with st.expander("Hosts and concurrency of this batch"):
            table(views.run_hosts_frame(batch), key=f"hosts-{batch.id}")
            st.caption("How each host's level moved during the run, and why:")
            table(views.level_history_frame(batch), key=f"levels-{batch.id}")
    if not views.is_final(batch) and batch.status not in ("cancelling", "finalizing"):
        if st.session_state.get(CONFIRM) != batch.id and st.button(
                "Cancel batch", key=f"cancel-{batch.id}", icon=":material/stop_circle:"):
            st.session_state[CONFIRM] = batch.id
        if st.session_state.get(CONFIRM) == batch.id:
            waiting = progress.total - progress.done
            st.warning(f"Cancel **{batch.id}**? The {waiting} request(s) not yet run will not run; the "
                       f"{progress.done} finished keep their results.", icon=":material/help:")
            yes, no = st.columns(2)
            if yes.button("Yes, cancel the batch", key=f"cancel-yes-{batch.id}", type="primary"):
                st.session_state.pop(CONFIRM, None)
                if attempt(api.cancel_batch, batch.id):
                    st.rerun()  # show it cancelling
            if no.button("No, keep it running", key=f"cancel-no-{batch.id}"):
                st.session_state.pop(CONFIRM, None)
                st.rerun()
    if (refused := st.session_state.get(RETRY_FAILED)) and refused[0] == batch.id:
        st.session_state.pop(RETRY_FAILED)
        show_error(refused[1], doing="retry the failed lines")
    if live is not None and (retryable := views.offers_retry(batch, live)):
        st.button(f"Retry failed lines ({retryable})", key=f"retry-{batch.id}", icon=":material/replay:",
                  type="primary", on_click=retry_failed, args=(batch.id,),
                  help="Runs again, as a new batch linked to this one, the lines that failed for a reason a retry "
                       "can change: engine errors, timeouts, a busy engine, lines a cancel or an expiry left unrun. "
                       "Lines the engine refused (an invalid request, an unknown model) stay as they are.")
    if batch.status == "failed":
        st.error("The input file was refused; its problems:", icon=":material/block:")
        table(views.batch_errors_frame(batch), key=f"errors-{batch.id}")
    if live is not None:
        show_results(batch, live)


def banner(batch: Batch) -> None:
    """The submission's banner, with the status the batch has now (refreshed with the list)."""
    text = f"Submitted **{batch.id}** ({batch.status})."
    if batch.status in ("failed", "expired"):
        st.error(text, icon=":material/error:")
    elif batch.status in ("cancelling", "cancelled"):
        st.warning(text, icon=":material/stop_circle:")
    else:
        st.success(text, icon=":material/rocket_launch:")


st.subheader("Your batches")
live = st.toggle("Live refresh", value=True, help=f"Refresh every {REFRESH_SECONDS:.0f} s while a batch runs.")
running = any(not views.is_final(b) for b in recent)


@st.fragment(run_every=REFRESH_SECONDS if live and running else None)
def batches_panel() -> None:
    batches = need(api.list_batches, limit=50).data
    if not batches:
        st.info("No batch yet: upload a file above.")
        return
    if running and all(views.is_final(b) for b in batches):
        st.rerun()  # the last batch finished: redraw the page without the timer
    if not running and not all(views.is_final(b) for b in batches):
        st.rerun()  # a batch started (a retry): redraw the page with the timer
    by_id = {b.id: b for b in batches}
    if st.session_state.get(SUBMITTED) in by_id:
        banner(by_id[st.session_state[SUBMITTED]])
    ids = list(by_id)

    def open_row() -> None:
        picked = views.picked_row(ids, st.session_state.get("batch_table"))
        if picked:
            st.session_state[PICK] = picked

    st.caption("Click a row to open its batch.")
    table(views.batches_frame(batches).drop("input_file_id"), key="batch_table", on_select=open_row,
          selection_mode="single-row", column_config={
              "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0),
              "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss")})
    if st.session_state.get(PICK) not in by_id:
        st.session_state[PICK] = batches[0].id
    picked = st.selectbox("Batch", ids, key=PICK, format_func=lambda i: batch_label(by_id[i]))
    show_batch(by_id[picked], by_id)


batches_panel()
