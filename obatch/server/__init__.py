"""The Litestar server: OpenAI's Files, Batches and inference endpoints over obatch's core.

``create_app(settings)`` builds the app; ``obatch serve`` runs it under uvicorn.
"""

from obatch._extras import require

require("server")

from obatch.server.app import create_app  # noqa: E402  (after the check: a missing extra is a sentence)

__all__ = ["create_app"]
