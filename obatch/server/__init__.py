"""The Litestar server: OpenAI's Files, Batches and inference endpoints over obatch's core.

``create_app(settings)`` builds the app; ``obatch serve`` runs it under uvicorn. The app loads on first use (PEP
562): the server's batch process (``obatch.server.batchproc``) lives in this package but needs no web framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from obatch._extras import require
from obatch._lazy import lazy_names

require("server")

if TYPE_CHECKING:
    from obatch.server.app import create_app

__all__ = ["create_app"]
__getattr__ = lazy_names(__name__, {"create_app": "obatch.server.app"}, globals())
