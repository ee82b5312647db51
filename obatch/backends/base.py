"""The one protocol every backend implements, and the pieces they share.

A backend takes an OpenAI request body for one endpoint and returns an OpenAI response body, plus the engine's own
timings (benchmarks need them). It raises only ``obatch.errors.BackendError`` subclasses: the two calls every
backend sends through, ``send_json`` and ``stream_lines``, translate transport faults with ``translate`` and an
engine's error answer with ``errors.from_status``, once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx
import orjson

from obatch import errors
from obatch.protocol import new_id as new_id  # the backends' id helper is the protocol's


@dataclass(slots=True)
class Timings:
    """Engine-side timings of one request, in milliseconds (None where the engine does not tell)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_ms: float | None = None
    decode_ms: float | None = None
    load_ms: float | None = None
    total_ms: float | None = None
    ttft_ms: float | None = None  # client-side, when the request was streamed


@dataclass(slots=True)
class Result:
    body: dict[str, Any]
    timings: Timings = field(default_factory=Timings)
    status_code: int = 200


@dataclass(slots=True)
class ModelInfo:
    id: str
    context_length: int | None = None
    family: str | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    size: int | None = None
    loaded: bool = False
    loaded_context_length: int | None = None
    capabilities: tuple[str, ...] = ()

    def as_openai(self) -> dict[str, Any]:
        """The ``/v1/models`` entry, with the engine's facts as extra fields."""
        return {
            "id": self.id, "object": "model", "created": 0, "owned_by": "obatch",
            "context_length": self.context_length, "family": self.family,
            "parameter_size": self.parameter_size, "quantization": self.quantization, "loaded": self.loaded,
            "loaded_context_length": self.loaded_context_length,
        }


@runtime_checkable
class Backend(Protocol):
    name: str

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        """Run one request; ``stream=True`` streams it internally to measure time to first token."""
        ...

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield OpenAI ``chat.completion.chunk`` objects; the last one carries ``usage``."""
        ...

    async def models(self) -> list[ModelInfo]:
        ...

    async def show(self, model: str) -> ModelInfo:
        """Facts about one model (context length above all); raises ModelNotFoundError."""
        ...

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int) -> float:
        """Get ready to serve ``model`` with these runner options; returns seconds spent (re)loading."""
        ...

    async def version(self) -> str | None:
        ...

    async def aclose(self) -> None:
        ...


class BackendWrapper:
    """A backend around another one: the parts it does not override go straight to ``inner``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    async def models(self) -> list[ModelInfo]:
        return await self.inner.models()

    async def show(self, model: str) -> ModelInfo:
        return await self.inner.show(model)

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int) -> float:
        return await self.inner.prepare(model, num_ctx=num_ctx, parallel=parallel)

    async def version(self) -> str | None:
        return await self.inner.version()

    async def aclose(self) -> None:
        await self.inner.aclose()


def now() -> int:
    return int(time.time())


def make_client(base_url: str, *, headers: dict[str, str] | None = None,
                transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """One keep-alive client per backend, on aiohttp's transport (httpx's own pool collapses under concurrency).

    Timeouts are the runner's job (it bounds each whole request); the client only bounds connecting.
    """
    if transport is None:
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport()
    return httpx.AsyncClient(
        base_url=base_url, headers=headers, transport=transport,
        timeout=httpx.Timeout(None, connect=10.0),
    )


def error_message(response: httpx.Response) -> str:
    """The engine's error text: Ollama's ``{"error": "..."}`` or OpenAI's ``{"error": {"message": ...}}``."""
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:500] or f"HTTP {response.status_code}"
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return response.text[:500]


def translate(exc: Exception) -> errors.BackendError:
    """Map a transport exception to obatch's tree: the single place where httpx errors are classified."""
    if isinstance(exc, errors.BackendError):
        return exc
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return errors.BackendTimeout(f"The engine did not answer in time ({type(exc).__name__}).")
    if isinstance(exc, httpx.TransportError | OSError):
        return errors.TransientError(f"Connection to the engine failed: {type(exc).__name__}: {exc}")
    return errors.PermanentError(f"Unexpected failure talking to the engine: {type(exc).__name__}: {exc}")


async def send_json(client: httpx.AsyncClient, method: str, path: str,
                    payload: dict[str, Any] | None = None) -> Any:
    """Send one request and return the decoded JSON, raising obatch errors only."""
    try:
        response = await client.request(
            method, path, content=orjson.dumps(payload) if payload is not None else None,
            headers={"content-type": "application/json"} if payload is not None else None,
        )
    except Exception as exc:
        raise translate(exc) from exc
    if response.status_code >= 400:
        raise errors.from_status(response.status_code, error_message(response))
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise errors.TransientError(f"The engine sent invalid JSON: {response.text[:200]!r}") from exc


async def stream_lines(client: httpx.AsyncClient, path: str, payload: dict[str, Any], *,
                       close: bool = False) -> AsyncIterator[bytes]:
    """POST and yield the response body line by line, translating faults (also those mid-stream).

    ``close`` asks for a fresh connection: llama.cpp's server drops the keep-alive connection after a stream, and the
    next request sent on it would fail.
    """
    headers = {"content-type": "application/json"}
    if close:
        headers["connection"] = "close"
    try:
        async with client.stream("POST", path, content=orjson.dumps(payload), headers=headers) as response:
            if response.status_code >= 400:
                await response.aread()
                raise errors.from_status(response.status_code, error_message(response))
            async for line in response.aiter_lines():
                if line:
                    yield line.encode()
    except errors.BackendError:
        raise
    except Exception as exc:
        raise translate(exc) from exc


def timings_from_llamacpp(t: dict[str, Any]) -> Timings:
    """Read llama.cpp's ``timings`` object (``prompt_n, prompt_ms, predicted_n, predicted_ms``; obatch adds
    ``load_ms`` and ``total_ms`` in the same style for Ollama's durations)."""
    def num(key: str) -> float | None:
        value = t.get(key)
        return float(value) if isinstance(value, int | float) else None

    def count(key: str) -> int | None:
        value = t.get(key)
        return int(value) if isinstance(value, int | float) else None

    return Timings(prompt_tokens=count("prompt_n"), completion_tokens=count("predicted_n"),
                   prompt_ms=num("prompt_ms"), decode_ms=num("predicted_ms"), load_ms=num("load_ms"),
                   total_ms=num("total_ms"))


def chat_chunk(cid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def complete_by_streaming(backend: Backend, body: dict[str, Any], *, num_ctx: int | None) -> Result:
    """Run a chat request as a stream and fold it into one response, measuring client-side TTFT."""
    started = time.perf_counter()
    ttft: float | None = None
    content: list[str] = []
    tool_calls: list[Any] = []
    finish_reason = "stop"
    usage: dict[str, int] = {}
    timings = Timings()
    first: dict[str, Any] | None = None
    async for chunk in backend.stream_chat(body, num_ctx=num_ctx):
        first = first or chunk
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if ttft is None:
                    ttft = (time.perf_counter() - started) * 1000
                content.append(delta["content"])
            if delta.get("tool_calls"):
                tool_calls.extend(delta["tool_calls"])
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            timings = timings_from_llamacpp(chunk["timings"])
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if tool_calls:
        message["tool_calls"] = tool_calls
    timings.ttft_ms = ttft
    out = {
        "id": (first or {}).get("id", new_id("chatcmpl")), "object": "chat.completion",
        "created": (first or {}).get("created", now()), "model": (first or {}).get("model", body.get("model")),
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }
    return Result(out, timings)
