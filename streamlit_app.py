"""obatch UI: the home page and the navigation. Start it with `obatch ui` (or `make serve` with the server).

The UI is a client of the obatch server (`OBATCH_SERVER_URL`, default http://127.0.0.1:8000): batches run in the
server, so closing this tab loses nothing.
"""

from __future__ import annotations

import streamlit as st

from obatch.client import ClientError
from obatch.ui import views
from obatch.ui.session import client, health, quietly, show_error

st.set_page_config(page_title="obatch", page_icon=":material/stacks:", layout="wide")


def server_badge() -> views.Health | None:
    """The sidebar line every page shows: where the server is and whether it (and its backend) answers."""
    api = client()
    st.sidebar.caption(f"Server: `{api.base_url}`")
    try:
        report = views.read_health(health(api))
    except ClientError:
        st.sidebar.error("Server unreachable", icon=":material/power_off:")
        return None
    if report.backend_ok is False:
        st.sidebar.warning(f"Server up · backend {report.backend or ''} unreachable", icon=":material/warning:")
    else:
        st.sidebar.success(f"Server up · backend {report.backend or 'ready'}", icon=":material/check_circle:")
    return report


def overview() -> None:
    st.title("obatch")
    st.write("Run OpenAI Batch files through local LLMs: upload a file, watch it run, download the results, "
             "and see how fast each model is across context windows.")
    api = client()
    try:
        report = views.read_health(health(api))
    except ClientError as exc:
        show_error(exc)
        return
    if report.backend_ok is False:
        st.warning(f"The server is up, but its backend ({report.backend or 'unknown'}"
                   f"{' at ' + report.backend_url if report.backend_url else ''}) does not answer"
                   f"{': ' + report.detail if report.detail else '.'} Batches wait until it is back.",
                   icon=":material/warning:")
    batches = quietly(api.list_batches, limit=100)
    frame = views.batches_frame(batches.data if batches else [])
    running = frame.filter(~frame["status"].is_in(list(views.FINAL_STATUSES)))
    left, middle, right = st.columns(3)
    left.metric("Backend", report.backend or "—")
    middle.metric("Batches running", running.height)
    right.metric("Batches (last 100)", frame.height)
    if not frame.is_empty():
        st.subheader("Recent batches")
        st.dataframe(frame.head(5).select("id", "status", "model", "created", "total", "completed", "failed"),
                     hide_index=True, width="stretch")
    st.page_link("pages/batches.py", label="Upload and run a batch", icon=":material/inventory_2:")
    st.page_link("pages/benchmarks.py", label="Benchmarks across context windows", icon=":material/monitoring:")
    st.page_link("pages/models.py", label="Models and backend", icon=":material/memory:")


navigation = st.navigation([
    st.Page(overview, title="Overview", icon=":material/home:", default=True),
    st.Page("pages/batches.py", title="Batches", icon=":material/inventory_2:"),
    st.Page("pages/benchmarks.py", title="Benchmarks", icon=":material/monitoring:"),
    st.Page("pages/models.py", title="Models / backend", icon=":material/memory:"),
])
server_badge()
navigation.run()
