"""Models / backend: which engine the server drives, where, whether it answers, and the models it offers. The page
follows the server by itself (``REFRESH_SECONDS``): an engine that stops or comes back shows without a reload."""

from __future__ import annotations

import polars as pl
import streamlit as st

from obatch.ui import views
from obatch.ui.hosts import hosts_frame
from obatch.ui.session import attempt, client, health, quietly

REFRESH_SECONDS = 5.0
api = client()
st.title("Models / backend")


@st.fragment(run_every=REFRESH_SECONDS)
def models_page() -> None:
    report = attempt(health, api)
    if report is None:
        return
    backend = report.backend
    left, middle, right = st.columns(3)
    left.metric("Server", "up" if report.server_ok else "degraded")
    middle.metric("Backend", backend.name)
    right.metric("Backend reachable", "yes" if backend.reachable else "no")
    facts = [f"at `{', '.join(backend.urls)}`" if backend.urls else "",
             f"version `{backend.version}`" if backend.version else ""]
    if any(facts):
        st.caption(f"Backend {backend.name} " + " · ".join(f for f in facts if f))
    if not backend.reachable:
        st.warning(f"The backend does not answer{': ' + backend.error if backend.error else '.'} "
                   "Batches wait (and retry) until it is back.", icon=":material/warning:")

    hosts = hosts_frame(report)
    if hosts.height:
        st.subheader("Engine hosts")
        st.caption("Each host keeps its own number of requests in flight — fixed, or found by measuring (auto) — "
                   "and takes lines from the batches' shared queue as its slots free up. A host that keeps failing "
                   "is drained and probed until it answers again. The state is what the batches last saw, and down "
                   "while no host answers the server's probe.")
        st.dataframe(hosts.drop("error"), hide_index=True, width="stretch", key="hosts")
        for row in hosts.filter(pl.col("error") != "").iter_rows(named=True):
            st.caption(f"`{row['host']}` ({row['state']}): {row['error']}")

    st.subheader("Models")
    if not backend.reachable:
        st.info("The models are listed once the backend answers again.", icon=":material/hourglass:")
        return
    listed = quietly(api.list_models)
    if listed is None:
        st.info("The backend did not list its models just now; this page asks again in a few seconds.",
                icon=":material/hourglass:")
        return
    models = views.models_frame(listed)
    if models.is_empty():
        st.info("The backend lists no model. Pull one (e.g. `ollama pull llama3.2:1b`) and reload.")
    else:
        loaded = models.filter(models["loaded"].fill_null(False))
        st.caption(f"{models.height} model(s), {loaded.height} loaded now. Context lengths are what the backend "
                   "reports: the trained maximum, and the window a loaded model runs with.")
        shown = models.with_columns(pl.col("loaded").fill_null(False),
                                    pl.col(pl.Int64).cast(pl.Utf8).fill_null("—"), pl.col(pl.Utf8).fill_null("—"))
        st.dataframe(shown, hide_index=True, width="stretch", key="models", column_config={
            "id": "model", "loaded": st.column_config.CheckboxColumn("loaded"),
            "context_length": "context length (trained)", "loaded_context_length": "context length (loaded)",
        })

    with st.expander("Raw health report"):
        st.json(report.model_dump(mode="json"))


models_page()
