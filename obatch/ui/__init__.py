"""The Streamlit UI's helpers: ``views`` (pure functions: polars frames and altair charts from API answers),
``session`` (the Streamlit glue: one client per browser session, errors shown as sentences) and ``launch``
(finding ``streamlit_app.py`` for ``obatch ui``).

Only ``streamlit_app.py`` and ``pages/`` import this package; ``import obatch`` never does.
"""

from obatch._extras import require

require("ui")
