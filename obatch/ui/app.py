"""obatch UI: the home page and the navigation. Start it with `obatch ui` (or `make serve` with the server).

The UI is a client of the obatch server (`OBATCH_SERVER_URL`, default http://127.0.0.1:8000): batches run in the
server, so closing this tab loses nothing. The app and its pages (``pages/`` beside this file) ship in the package;
a checkout's top-level ``streamlit_app.py`` and ``pages/`` run these same files (``main``, ``run_page``).
"""

from __future__ import annotations

import runpy
from pathlib import Path

import streamlit as st

from obatch.client import ClientError
from obatch.protocol import Health
from obatch.ui import views
from obatch.ui.session import client, health, need, quietly

PAGES = Path(__file__).resolve().parent / "pages"


def page_path(name: str) -> Path:
    return PAGES / f"{name}.py"


def run_page(name: str) -> None:
    """Run the packaged page ``name`` as Streamlit runs a page script (on every rerun, unlike an import)."""
    runpy.run_path(str(page_path(name)), run_name="__main__")


BADGE_SECONDS = 3.0  # the sidebar asks /health again this often: it follows the server and the engine by itself


def server_badge() -> None:
    """The sidebar line every page shows: where the server is and whether it (and its backend) answers. It is
    redrawn every ``BADGE_SECONDS`` on its own, so an open page says when the engine goes down and comes back."""
    with st.sidebar:
        st.caption(f"Server: `{client().base_url}`")
        badge()


@st.fragment(run_every=BADGE_SECONDS)
def badge() -> Health | None:
    try:
        report = health(client())
    except ClientError:
        st.error("Server unreachable", icon=":material/power_off:")
        return None
    if not report.backend.reachable:
        st.warning(f"Server up · backend {report.backend.name} unreachable", icon=":material/warning:")
    else:
        st.success(f"Server up · backend {report.backend.name}", icon=":material/check_circle:")
    return report


def overview() -> None:
    st.title("obatch")
    st.write("Run OpenAI Batch files through local LLMs: upload a file, watch it run, download the results, "
             "and see how fast each model is across context windows.")
    api = client()
    report = need(health, api)
    backend = report.backend
    if not backend.reachable:
        st.warning(f"The server is up, but its backend ({backend.name}"
                   f"{' at ' + ', '.join(backend.urls) if backend.urls else ''}) does not answer"
                   f"{': ' + backend.error if backend.error else '.'} Batches wait until it is back.",
                   icon=":material/warning:")
    batches = quietly(api.list_batches, limit=100)
    frame = views.batches_frame(batches.data if batches else [])
    running = frame.filter(~frame["status"].is_in(list(views.FINAL_STATUSES)))
    left, middle, right = st.columns(3)
    left.metric("Backend", backend.name)
    middle.metric("Batches running", running.height)
    right.metric("Batches (last 100)", frame.height)
    if not frame.is_empty():
        st.subheader("Recent batches")
        st.dataframe(frame.head(5).select("id", "status", "model", "created", "total", "completed", "failed"),
                     hide_index=True, width="stretch")
    st.page_link(page_path("batches"), label="Upload and run a batch", icon=":material/inventory_2:")
    st.page_link(page_path("benchmarks"), label="Benchmarks across context windows", icon=":material/monitoring:")
    st.page_link(page_path("models"), label="Models and backend", icon=":material/memory:")


def main() -> None:
    st.set_page_config(page_title="obatch", page_icon=":material/stacks:", layout="wide")
    navigation = st.navigation([
        st.Page(overview, title="Overview", icon=":material/home:", default=True),
        st.Page(page_path("batches"), title="Batches", icon=":material/inventory_2:"),
        st.Page(page_path("benchmarks"), title="Benchmarks", icon=":material/monitoring:"),
        st.Page(page_path("models"), title="Models / backend", icon=":material/memory:"),
    ])
    server_badge()
    navigation.run()


if __name__ == "__main__":  # as Streamlit runs it (`obatch ui`); a checkout's streamlit_app.py calls main()
    main()
