"""The Litestar server: OpenAI's Files, Batches and inference endpoints over obatch's core.

``create_app(settings)`` builds the app; ``obatch serve`` runs it under uvicorn.
"""

from obatch.server.app import create_app

__all__ = ["create_app"]
