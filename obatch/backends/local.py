"""The embedded engine: llama.cpp (xllamacpp, in a child process) serving one GGUF model (SmolLM2-135M by default).

It speaks the OpenAI API, so requests go through ``OpenAIBackend`` (``/v1/responses`` mapped onto chat, see there);
what this adds is Ollama's scheduling habit:
the engine is (re)started when the model, the context window or the number of parallel slots changes. llama.cpp's
``n_ctx`` is the TOTAL context split across slots, so a per-request window ``num_ctx`` with ``parallel`` slots
needs ``num_ctx * parallel``. Embeddings are always on (mean pooling), so one engine serves every endpoint.
Token ids (completions ``prompt``, embeddings ``input``) go to llama.cpp as they are; a list of prompts runs as one
request per prompt (``obatch.backends.completions``: llama.cpp's own answer to a list counts one prompt's usage).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from obatch import errors
from obatch.backends import completions
from obatch.backends.base import Capabilities, ModelInfo, Result
from obatch.backends.openai import OpenAIBackend
from obatch.engine import LocalEngine
from obatch.jsonl import file_sha256

DEFAULT_NUM_CTX = 2048
# Slots when the caller leaves the width to the engine (auto concurrency): on 2 CPU cores SmolLM2 gave 117 / 126 /
# 165 / 216 tok/s at 1 / 2 / 4 / 8 requests at once (shared/reference/engine.md); memory grows by num_ctx per slot.
DEFAULT_PARALLEL = 8


class LocalBackend:
    name = "local"
    capabilities = Capabilities(sets_num_ctx=True, reloads_on_num_ctx=True, engine_timings=True,  # restarts
                                embedded=True)

    def __init__(self, model_path: Path | None = None, *, alias: str = "smollm2:135m",
                 threads: int | None = None, parallel: int = DEFAULT_PARALLEL) -> None:
        self.engine = LocalEngine(model_path, alias=alias, threads=threads)
        self.alias = alias
        self.parallel = parallel
        self._client: OpenAIBackend | None = None
        self._url: str | None = None
        self._digest: str | None = None

    async def _ready(self, num_ctx: int | None = None, parallel: int | None = None) -> OpenAIBackend:
        config = self.engine.config
        if self._client is not None and config is not None and num_ctx is None and parallel is None:
            return self._client
        slots = parallel or (config.n_parallel if config else 1)
        per_slot = num_ctx or (config.n_ctx // config.n_parallel if config else DEFAULT_NUM_CTX)
        url = await self.engine.ensure(n_ctx=per_slot * slots, n_parallel=slots, embeddings=True)
        if url != self._url or self._client is None:
            if self._client is not None:
                await self._client.aclose()
            # llama.cpp's own /v1/responses (xllamacpp 2026.10) calls an answer cut at max_output_tokens
            # "completed" and sends no timings: its chat endpoint, mapped, gets both right.
            self._client, self._url = OpenAIBackend(f"{url}/v1", map_responses=True), url
        return self._client

    def _check_model(self, model: Any) -> None:
        if model != self.alias:
            raise errors.ModelNotFoundError(
                f"model {model!r} not found: the embedded engine serves {self.alias!r}.", param="model")

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        self._check_model(body.get("model"))
        client = await self._ready()
        if url == "/v1/completions" and (parts := completions.split(body)) is not None:
            return await completions.complete_each(lambda part: client.complete(url, part), parts)
        return await client.complete(url, body, stream=stream)

    async def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        self._check_model(body.get("model"))
        client = await self._ready()
        async for chunk in client.stream_chat(body):
            yield chunk

    async def stream_completion(self, body: dict[str, Any], *, num_ctx: int | None = None
                                ) -> AsyncIterator[dict[str, Any]]:
        self._check_model(body.get("model"))
        client = await self._ready()
        parts = completions.split(body)
        chunks = client.stream_completion(body) if parts is None else completions.stream_each(
            client.stream_completion, parts)
        async for chunk in chunks:
            yield chunk

    async def models(self) -> list[ModelInfo]:
        config = self.engine.config
        return [ModelInfo(
            id=self.alias, context_length=self.engine.context_length(), family="llama",
            loaded=config is not None,
            loaded_context_length=config.n_ctx // config.n_parallel if config else None,
        )]

    async def show(self, model: str) -> ModelInfo:
        self._check_model(model)
        return (await self.models())[0]

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None) -> float:
        """(Re)start the engine for this window and width; ``parallel=None`` leaves the width to this backend."""
        self._check_model(model)
        started = time.perf_counter()
        loads = self.engine.loads
        await self._ready(num_ctx or DEFAULT_NUM_CTX, parallel or self.parallel)
        return time.perf_counter() - started if self.engine.loads != loads else 0.0

    async def slots(self) -> int | None:
        config = self.engine.config
        return config.n_parallel if config is not None else None

    async def loaded_context(self, model: str) -> int | None:
        """The per-request context of the running engine (its total ``n_ctx`` split across the slots)."""
        config = self.engine.config
        return config.n_ctx // config.n_parallel if config is not None and model == self.alias else None

    async def model_digest(self, model: str) -> str | None:
        """The GGUF file's SHA-256, read once per backend in a thread (a file of gigabytes takes seconds)."""
        self._check_model(model)
        if self._digest is None:
            self._digest = "sha256:" + await asyncio.to_thread(file_sha256, self.engine.model_path)
        return self._digest

    async def version(self) -> str | None:
        import xllamacpp

        return f"xllamacpp {getattr(xllamacpp, '__version__', '?')}"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self.engine.aclose()
