"""Streamlit glue shared by the pages: one ``Client`` per browser session, and API failures shown as sentences.

A page calls ``need(api.list_batches)`` for data it cannot draw without (on failure: a clear message, then the
page stops) and ``attempt(api.cancel_batch, batch_id)`` for an action (on failure: a message, and ``None``).
Tests put their own client (an ``httpx.MockTransport`` or a test server's transport) in
``st.session_state[CLIENT_KEY]`` before the first run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from obatch.client import ApiError, Client, ClientError, ServerUnavailable
from obatch.protocol import Health

CLIENT_KEY = "obatch_client"
FILES_KEY = "obatch_file_cache"
HEALTH_KEY = "obatch_health"
HEALTH_TTL = 1.0
RECOVER_SECONDS = 3.0
P = ParamSpec("P")
T = TypeVar("T")

START_HINT = ("Start it with `obatch serve` (or `make serve` for the server and this UI together), "
              "or point `OBATCH_SERVER_URL` at a running server.")


def client() -> Client:
    """This session's client: the injected one, else one built from ``OBATCH_SERVER_URL``/``OBATCH_API_KEY``.

    Every page asks for it first, so it is also where a page opened outside the app's navigation (``app.py``) is
    sent back through it (see ``inside_navigation``)."""
    inside_navigation()
    api = st.session_state.get(CLIENT_KEY)
    if not isinstance(api, Client):
        api = Client.from_env()
        st.session_state[CLIENT_KEY] = api
    return api


def inside_navigation() -> None:
    """Run this page inside the app's frame (server badge, sidebar), whatever URL opened it.

    Streamlit keeps its legacy ``pages/`` auto-discovery on until some session has run ``st.navigation``: a fresh
    UI opened first at ``/batches`` (a bookmark, a refresh) would run ``pages/batches.py`` alone. The pages sit in
    a ``pages/`` folder next to the entry script (the package's, and a checkout's thin ones), so the switch
    Streamlit makes on ``st.navigation`` is made here instead, and the run starts again through the entrypoint,
    which routes to the same page (page ids follow URL paths).
    """
    if getattr(PagesManager, "uses_pages_directory", False):  # a Streamlit internal: absent means nothing to do
        PagesManager.uses_pages_directory = False
        st.rerun()


def health(api: Client) -> Health:
    """The server's ``/health`` answer, asked once per page draw however many parts of the page show it (the
    sidebar badge and the page): an answer younger than ``HEALTH_TTL`` seconds is reused, a failure raised again."""
    cached = st.session_state.get(HEALTH_KEY)
    answer: Health | ClientError
    if cached is not None and cached[0] is api and time.monotonic() - cached[1] < HEALTH_TTL:
        answer = cached[2]
    else:
        try:
            answer = api.health()
        except ClientError as exc:
            answer = exc
        st.session_state[HEALTH_KEY] = (api, time.monotonic(), answer)
    if isinstance(answer, ClientError):
        raise answer
    return answer


def backend_up(api: Client) -> bool:
    """Whether asking the backend (models, estimates) is worth a request: not when ``/health`` says it is down."""
    try:
        return health(api).backend.reachable
    except ClientError:
        return False


def engine_problem(api: Client) -> str | None:
    """Why the engine does not answer (``/health``'s words), or None while it does (or while the server itself
    does not answer: the page says that on its own)."""
    try:
        backend = health(api).backend
    except ClientError:
        return None
    return None if backend.reachable else backend.error or f"{backend.name} does not answer"


def show_error(exc: ClientError, *, doing: str | None = None) -> None:
    """The one place an API failure becomes what the user reads."""
    prefix = f"Could not {doing}: " if doing else ""
    if isinstance(exc, ServerUnavailable):
        st.error(f"{prefix}{exc.message}\n\n{START_HINT}", icon=":material/power_off:")
    elif isinstance(exc, ApiError) and exc.status in (502, 503, 504):
        st.error(f"{prefix}the server is up but its backend does not answer: {exc.message}", icon=":material/warning:")
    elif isinstance(exc, ApiError) and exc.status == 404 and exc.code == "unknown_url":
        st.info(f"{prefix}this obatch server does not offer that yet ({exc.message}). Update the server.",
                icon=":material/info:")
    elif isinstance(exc, ApiError) and exc.status == 401:
        st.error(f"{prefix}the server refused the API key ({exc.message}). Set `OBATCH_API_KEY`.",
                 icon=":material/lock:")
    else:
        st.error(f"{prefix}{exc}", icon=":material/warning:")


def need(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Data the page cannot draw without: on failure show why and stop the page (no stack trace); a page stopped
    because the server does not answer draws itself again once it does (``until_back``)."""
    try:
        return call(*args, **kwargs)
    except ClientError as exc:
        show_error(exc)
        if isinstance(exc, ServerUnavailable):
            until_back()
        st.stop()


@st.fragment(run_every=RECOVER_SECONDS)
def until_back() -> None:
    """Ask the server again every ``RECOVER_SECONDS`` while it does not answer; once it does, run the page again
    (a page opened while the server was down used to keep its error until reloaded)."""
    try:
        client().health()
    except ClientError:
        return
    st.rerun(scope="app")


def attempt(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
    """An action or optional data: on failure show why and return None."""
    try:
        return call(*args, **kwargs)
    except ClientError as exc:
        show_error(exc)
        return None


def quietly(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
    """Optional data the page does well without (an estimate with no benchmark yet): None on any API failure."""
    try:
        return call(*args, **kwargs)
    except ClientError:
        return None


def file_bytes(file_id: str) -> bytes | None:
    """A stored file's content, fetched once per session (stored files never change); None when it is gone
    (deleted, or expired: the server answers 404), which the page says where the file would be used."""
    cache: dict[str, bytes | None] = st.session_state.setdefault(FILES_KEY, {})
    if file_id not in cache:
        cache[file_id] = need(_unless_gone, file_id)
    return cache[file_id]


def _unless_gone(file_id: str) -> bytes | None:
    try:
        return client().file_content(file_id)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
