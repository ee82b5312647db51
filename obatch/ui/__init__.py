"""The Streamlit UI: ``app`` (the home page and the navigation) with its ``pages/``, ``views`` (pure functions:
polars frames and altair charts from API answers), ``session`` (the Streamlit glue: one client per browser
session, errors shown as sentences) and ``launch`` (``obatch ui`` runs the packaged app).

Only the UI's own scripts (and a checkout's ``streamlit_app.py`` and ``pages/``) import this package;
``import obatch`` never does.
"""

from obatch._extras import require

require("ui")
