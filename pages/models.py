"""Models / backend: which engine the server drives, whether it answers, and the models it offers."""

from __future__ import annotations

import streamlit as st

from obatch.ui import views
from obatch.ui.hosts import hosts_frame
from obatch.ui.session import client, need

api = client()
st.title("Models / backend")

health = views.read_health(need(api.health))
left, middle, right = st.columns(3)
left.metric("Server", "up" if health.server_ok else "degraded")
middle.metric("Backend", health.backend or "—")
right.metric("Backend reachable", {True: "yes", False: "no", None: "—"}[health.backend_ok])
facts = [f"URL `{health.backend_url}`" if health.backend_url else "", f"version `{health.version}`"
         if health.version else ""]
if any(facts):
    st.caption("Backend " + " · ".join(f for f in facts if f))
if health.backend_ok is False:
    st.warning(f"The backend does not answer{': ' + health.detail if health.detail else '.'} "
               "Batches wait (and retry) until it is back.", icon=":material/warning:")

hosts = hosts_frame(health.raw)
if hosts.height:
    st.subheader("Engine hosts")
    st.caption("Each host keeps its own number of requests in flight — fixed, or found by measuring (auto) — and "
               "takes lines from the batches' shared queue as its slots free up. A host that keeps failing is "
               "drained and probed until it answers again.")
    st.dataframe(hosts, hide_index=True, width="stretch", key="hosts")

st.subheader("Models")
models = views.models_frame(need(api.list_models))
if models.is_empty():
    st.info("The backend lists no model. Pull one (e.g. `ollama pull llama3.2:1b`) and reload.")
else:
    loaded = models.filter(models["loaded"].fill_null(False))
    st.caption(f"{models.height} model(s), {loaded.height} loaded now. Context lengths are what the backend "
               "reports: the trained maximum, and the window a loaded model runs with.")
    st.dataframe(models, hide_index=True, width="stretch", key="models", column_config={
        "id": "model", "loaded": st.column_config.CheckboxColumn("loaded"),
        "context_length": st.column_config.NumberColumn("context length (trained)", format="%d"),
        "loaded_context_length": st.column_config.NumberColumn("context length (loaded)", format="%d"),
    })

with st.expander("Raw health report"):
    st.json(health.raw)
