"""Backends behind one protocol (``Backend``): Ollama's native API, any OpenAI-compatible engine, and the embedded
llama.cpp engine. ``open_backend`` picks one from settings."""

from __future__ import annotations

import asyncio
from typing import get_args

import aiohttp

from obatch.backends.base import Backend, ModelInfo, Result, Timings
from obatch.config import BackendName, Settings
from obatch.errors import ConfigError

__all__ = ["Backend", "ModelInfo", "Result", "Timings", "ollama_answers", "open_backend", "pinned_settings"]


async def ollama_answers(url: str, wait: float = 1.0) -> bool:
    """True when an Ollama server answers ``/api/version`` at ``url``."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=wait)) as session, \
                session.get(f"{url}/api/version") as response:
            return response.status == 200 and "version" in await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def open_backend(settings: Settings) -> Backend:
    """The configured backend: one engine host, or a ``Pool`` of several (``OBATCH_OLLAMA_URL`` /
    ``OBATCH_OPENAI_BASE_URL`` with commas, or ``--url`` repeated).

    ``auto`` takes the Ollama servers when one of them answers (the others join once they do) plus any
    OpenAI-compatible hosts; with none of either it starts the embedded engine."""
    name = settings.backend
    hosts: list[Backend] = []
    if name in ("auto", "ollama"):
        urls = settings.ollama_urls
        answering = await asyncio.gather(*(ollama_answers(u) for u in urls)) if name == "auto" else [True]
        if any(answering):
            from obatch.backends.ollama import OllamaBackend

            hosts += [OllamaBackend(u) for u in urls]
    if name in ("auto", "openai"):
        if name == "openai" and not settings.openai_base_urls:
            raise ConfigError("OBATCH_OPENAI_BASE_URL must be set for the openai backend.")
        from obatch.backends.openai import OpenAIBackend

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        hosts += [OpenAIBackend(u, api_key=key) for u in settings.openai_base_urls]
    if len(hosts) == 1:
        return hosts[0]
    if hosts:
        from obatch.backends.pool import Pool

        return Pool(hosts, concurrency=settings.concurrency, maximum=settings.max_concurrency)
    from obatch.backends.local import LocalBackend

    return LocalBackend(settings.local_model_path, alias=settings.local_model_alias,
                        threads=settings.local_threads, parallel=settings.local_parallel)


def pinned_settings(settings: Settings, backend: Backend) -> Settings:
    """``settings`` with ``backend`` fixed to the kind ``open_backend`` found, so that a batch process or thread
    opens the same engines without looking for them again (``auto`` asks every Ollama URL). A pool of mixed kinds
    keeps the settings as they are."""
    kind = backend.name
    return settings.model_copy(update={"backend": kind}) if kind in get_args(BackendName) else settings
