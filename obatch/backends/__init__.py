"""Backends behind one protocol (``Backend``): Ollama's native API, any OpenAI-compatible engine, and the embedded
llama.cpp engine. ``open_backend`` picks one from settings."""

from __future__ import annotations

import httpx

from obatch.backends.base import Backend, ModelInfo, Result, Timings
from obatch.config import Settings
from obatch.errors import ConfigError

__all__ = ["Backend", "ModelInfo", "Result", "Timings", "ollama_answers", "open_backend"]


async def ollama_answers(url: str, wait: float = 1.0) -> bool:
    """True when an Ollama server answers ``/api/version`` at ``url``."""
    try:
        async with httpx.AsyncClient(timeout=wait) as client:
            response = await client.get(f"{url}/api/version")
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and "version" in response.text


async def open_backend(settings: Settings) -> Backend:
    """The configured backend; ``auto`` is Ollama when it answers, else the embedded engine."""
    name = settings.backend
    if name == "auto":
        name = "ollama" if await ollama_answers(settings.ollama_url) else "local"
    if name == "ollama":
        from obatch.backends.ollama import OllamaBackend

        return OllamaBackend(settings.ollama_url)
    if name == "openai":
        if not settings.openai_base_url:
            raise ConfigError("OBATCH_OPENAI_BASE_URL must be set for the openai backend.")
        from obatch.backends.openai import OpenAIBackend

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAIBackend(settings.openai_base_url, api_key=key)
    from obatch.backends.local import LocalBackend

    return LocalBackend(settings.local_model_path, alias=settings.local_model_alias,
                        threads=settings.local_threads)
