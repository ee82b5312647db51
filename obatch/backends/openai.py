"""Any OpenAI-compatible engine (vLLM, llama.cpp server, LM Studio, Ollama's /v1): bodies pass through unchanged.

``/v1/responses`` passes through to the engine's own ``/responses`` (llama.cpp, vLLM and Ollama serve it; usage
details the SDK requires are filled in where the engine leaves them out). An engine that answers 404 or 405 there
gets the request mapped onto ``/chat/completions`` instead (``obatch.backends.responses``), and is not asked again;
``map_responses=True`` maps from the start.

Streams pass through too (chat, and completions, whose usage is moved into a ``choices: []`` chunk of its own
where llama.cpp sends it on the last text chunk); prompt lists and token ids go to the engine as they came.

``num_ctx`` cannot be set per request through this API (the engine's own start-up flag decides it), so it is
ignored here; llama.cpp's ``timings`` object is read when the engine sends one.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from obatch import errors
from obatch.backends import completions, responses
from obatch.backends.base import (
    FIXED_CONTEXT,
    ModelInfo,
    Result,
    Timings,
    complete_by_streaming,
    make_client,
    send_json,
    stream_lines,
    timings_from_llamacpp,
)
from obatch.protocol import ENDPOINTS

_OBATCH_ONLY = ("options", "num_ctx", "keep_alive", "think", "format")


def _clean(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in _OBATCH_ONLY}


def reported_identity(entry: dict[str, Any]) -> str | None:
    """What an OpenAI-compatible engine's ``/v1/models`` entry says of the weights behind a name: a ``digest`` when
    it gives one; llama.cpp's ``meta`` (parameter count, size, vocabulary: a hash of them); vLLM's ``root`` (the
    path or repository it loaded). Weaker than a digest of the file: two builds of the same shape look alike."""
    if isinstance(entry.get("digest"), str):
        return str(entry["digest"])
    if isinstance(entry.get("meta"), dict):
        return "meta:" + hashlib.sha256(orjson.dumps(entry["meta"], option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return str(entry["root"]) if isinstance(entry.get("root"), str) else None


class OpenAIBackend:
    """A client of one OpenAI-compatible server at ``base_url`` (ending in ``/v1``)."""

    name = "openai"
    # the context window is the engine's start-up flag; llama.cpp sends timings, other engines may not
    capabilities = FIXED_CONTEXT

    def __init__(self, base_url: str, *, api_key: str | None = None, map_responses: bool = False) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self.base_url = base_url.rstrip("/")
        self._client = make_client(self.base_url, headers=headers)
        # None until the engine has been asked; False (never ask) when the caller knows chat serves better.
        self.serves_responses: bool | None = False if map_responses else None

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        if url not in ENDPOINTS:
            raise errors.PermanentError(f"Unsupported endpoint {url}.", param="url")
        path = url.removeprefix("/v1")  # the base URL ends in /v1
        if url == "/v1/responses":
            return await self._respond(body, stream=stream)
        if stream and url == "/v1/chat/completions":
            return await complete_by_streaming(self, body, num_ctx=num_ctx)
        payload = _clean(body)
        payload["stream"] = False
        if url == "/v1/embeddings":
            payload.pop("stream")
        data = await send_json(self._client, "POST", path, payload)
        timings = timings_from_llamacpp(data.pop("timings")) if isinstance(data.get("timings"), dict) \
            else Timings()
        usage = data.get("usage") or {}
        timings.prompt_tokens = timings.prompt_tokens or usage.get("prompt_tokens")
        timings.completion_tokens = timings.completion_tokens or usage.get("completion_tokens")
        return Result(data, timings)

    async def _respond(self, body: dict[str, Any], *, stream: bool) -> Result:
        if self.serves_responses is not False:
            payload = _clean(body)
            payload["stream"] = False
            try:
                data = await send_json(self._client, "POST", "/responses", payload)
            except errors.PermanentError as exc:
                if exc.status not in (404, 405) or "model" in exc.message.lower():
                    raise  # an unknown model, not an unknown route
                self.serves_responses = False
            else:
                self.serves_responses = True
                usage = data.get("usage") or {}
                return Result(responses.normalise(data, body), Timings(prompt_tokens=usage.get("input_tokens"),
                                                                 completion_tokens=usage.get("output_tokens")))
        chat = await self.complete("/v1/chat/completions", responses.to_chat(body), stream=stream)
        return Result(responses.from_chat(chat.body, body), chat.timings, chat.status_code)

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/chat/completions", body)

    def stream_completion(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        return completions.split_usage(self._stream("/completions", body))

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The engine's SSE stream of ``path``, always with usage (the server drops it when not asked)."""
        payload = _clean(body)
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        async for line in stream_lines(self._client, path, payload, close=True):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            chunk = orjson.loads(data)
            if isinstance(chunk, dict) and chunk.get("error"):
                raise errors.TransientError(f"The engine failed mid-stream: {chunk['error']}")
            yield chunk

    async def models(self) -> list[ModelInfo]:
        data = await send_json(self._client, "GET", "/models")
        out = []
        for entry in data.get("data", []):
            meta = entry.get("meta") or {}
            out.append(ModelInfo(id=entry["id"], context_length=meta.get("n_ctx_train")
                                 or entry.get("context_length") or entry.get("max_model_len"), loaded=True,
                                 digest=reported_identity(entry)))
        return out

    async def show(self, model: str) -> ModelInfo:
        for info in await self.models():
            if info.id == model:
                return info
        raise errors.ModelNotFoundError(f"The model {model!r} does not exist on this engine.", param="model")

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None) -> float:
        return 0.0

    async def slots(self) -> int | None:
        """llama.cpp's server reports its parallel slots at ``/props`` (beside ``/v1``); other engines do not."""
        root = make_client(self.base_url.removesuffix("/v1"), headers=self._client.headers)
        try:
            props = await send_json(root, "GET", "/props")
        except errors.BackendError:
            return None
        finally:
            await root.aclose()
        slots = props.get("total_slots") if isinstance(props, dict) else None
        return slots if isinstance(slots, int) and slots > 0 else None

    async def version(self) -> str | None:
        return None

    async def aclose(self) -> None:
        await self._client.aclose()
