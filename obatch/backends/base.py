"""The one protocol every backend implements, and the pieces they share.

A backend takes an OpenAI request body for one endpoint and returns an OpenAI response body, plus the engine's own
timings (benchmarks need them). It raises only ``obatch.errors.BackendError`` subclasses: the two calls every
backend sends through, ``send_json`` and ``stream_lines``, translate transport faults with ``translate`` and an
engine's error answer with ``errors.from_status``, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import aiohttp
import orjson

from obatch import errors
from obatch.protocol import Model
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
    cached_tokens: int | None = None  # prompt tokens the engine took from its cache (llama.cpp's cache_n)


@dataclass(slots=True)
class Result:
    body: dict[str, Any]
    timings: Timings = field(default_factory=Timings)
    status_code: int = 200
    host: str | None = None  # the engine host that answered (set by the runner)
    refused: int = 0  # earlier answers to the same request refused by the structured-output check


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
    digest: str | None = None  # the engine's identity of the weights (Ollama's digest), where it tells one; the
    # response cache's too (``obatch.cache``)

    def as_openai(self) -> Model:
        """The ``/v1/models`` entry, with the engine's facts as extra fields."""
        return Model(id=self.id, context_length=self.context_length, family=self.family,
                     parameter_size=self.parameter_size, quantization=self.quantization, loaded=self.loaded,
                     loaded_context_length=self.loaded_context_length)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine lets obatch do. Callers ask these instead of recognising a backend by its name, so a new
    engine (or a wrapper, or a pool) says what it is once, where it is defined."""

    sets_num_ctx: bool = True  # takes a context window per model load (Ollama, embedded); False: fixed at its start
    reloads_on_num_ctx: bool = True  # a different num_ctx reloads the model (a load time to pay, and to measure)
    engine_timings: bool = True  # reports its own prompt and decode durations with every answer
    # The backend owns its engine (the embedded llama.cpp): opening it again elsewhere (a batch process, another
    # loop) would start a second engine, so batches share this one. False: a client of an engine running apart.
    embedded: bool = False


FIXED_CONTEXT = Capabilities(sets_num_ctx=False, reloads_on_num_ctx=False, engine_timings=False)


@runtime_checkable
class Backend(Protocol):
    name: str

    @property
    def capabilities(self) -> Capabilities:
        """What the engine lets obatch do (``Capabilities``)."""
        ...

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        """Run one request; ``stream=True`` streams it internally to measure time to first token."""
        ...

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield OpenAI ``chat.completion.chunk`` objects; the last one carries ``usage``."""
        ...

    def stream_completion(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        """Yield OpenAI ``text_completion`` chunks (a choice per prompt), then one ``choices: []`` chunk with
        ``usage``."""
        ...

    async def models(self) -> list[ModelInfo]:
        ...

    async def show(self, model: str) -> ModelInfo:
        """Facts about one model (context length above all); raises ModelNotFoundError."""
        ...

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None) -> float:
        """Get ready to serve ``model`` with these runner options; returns seconds spent (re)loading."""
        ...

    async def slots(self) -> int | None:
        """How many requests the engine serves at once, when it says (llama.cpp does; Ollama does not)."""
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
        self.capabilities = capabilities_of(inner)

    def stream_completion(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        return self.inner.stream_completion(body, num_ctx=num_ctx)

    async def models(self) -> list[ModelInfo]:
        return await self.inner.models()

    async def show(self, model: str) -> ModelInfo:
        return await self.inner.show(model)

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None) -> float:
        return await self.inner.prepare(model, num_ctx=num_ctx, parallel=parallel)

    async def slots(self) -> int | None:
        return await self.inner.slots()

    async def version(self) -> str | None:
        return await self.inner.version()

    async def loaded_context(self, model: str) -> int | None:
        return await loaded_context(self.inner, model)

    async def count_slots(self, model: str, *, num_ctx: int | None, most: int) -> int | None:
        return await count_slots(self.inner, model, num_ctx=num_ctx, most=most)

    async def aclose(self) -> None:
        await self.inner.aclose()


def capabilities_of(backend: Backend) -> Capabilities:
    """A backend's capabilities; one that does not declare them (a test double) counts as Ollama-like."""
    found = getattr(backend, "capabilities", None)
    return found if isinstance(found, Capabilities) else Capabilities()


async def loaded_context(backend: Backend, model: str) -> int | None:
    """The context the engine really loaded for ``model``, for backends that can tell (an optional method)."""
    method = getattr(backend, "loaded_context", None)
    return await method(model) if method is not None else None


async def count_slots(backend: Backend, model: str, *, num_ctx: int | None, most: int) -> int | None:
    """How many of ``most`` short requests sent together the engine ran at once, for backends that can count
    their engine's slots that way (an optional method: Ollama's, which tells no slot count); None where not."""
    method = getattr(backend, "count_slots", None)
    return await method(model, num_ctx=num_ctx, most=most) if method is not None else None


async def with_trained_context(backend: Backend, info: ModelInfo, *, within: float = 5.0) -> ModelInfo:
    """``info`` with its trained context, asked of the engine (``show``) when the listing did not say it (Ollama's
    ``/api/tags`` does not); a model the engine cannot describe in ``within`` seconds keeps None, so a list of
    models never fails over one of them."""
    if info.context_length is not None:
        return info
    with contextlib.suppress(errors.BackendError, TimeoutError):
        async with asyncio.timeout(within):
            return dataclasses.replace(info, context_length=(await backend.show(info.id)).context_length)
    return info


def now() -> int:
    return int(time.time())


class EngineClient:
    """One keep-alive HTTP client per engine host, on aiohttp directly.

    The hot path of a batch is one request per line, so the client's own cost matters: against an instant engine
    on loopback, bare aiohttp does ~7,200 req/s where httpx on its aiohttp transport does ~2,400 and httpx's own
    pool ~500 (shared/reference/performance.md), and a profile of the runner spent 80% of its request time in
    httpx's layers. The session is made lazily, inside the running loop that uses it. Timeouts are the runner's
    job (it bounds each whole attempt); the client only bounds connecting.
    """

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self._headers = {"content-type": "application/json", **self.headers}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, connector=aiohttp.TCPConnector(limit=0, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0), skip_auto_headers=("User-Agent",),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_client(base_url: str, *, headers: dict[str, str] | None = None) -> EngineClient:
    return EngineClient(base_url, headers=headers)


def error_message(status: int, content: bytes) -> str:
    """The engine's error text: Ollama's ``{"error": "..."}`` or OpenAI's ``{"error": {"message": ...}}``."""
    text = content.decode(errors="replace")
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError:
        return text[:500] or f"HTTP {status}"
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return text[:500]


def translate(exc: BaseException) -> errors.BackendError:
    """Map a transport exception to obatch's tree: the single place where client errors are classified."""
    if isinstance(exc, errors.BackendError):
        return exc
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return errors.BackendTimeout(f"The engine did not answer in time ({type(exc).__name__}).")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return errors.TransientError(f"Connection to the engine failed: {type(exc).__name__}: {exc}")
    return errors.PermanentError(f"Unexpected failure talking to the engine: {type(exc).__name__}: {exc}")


async def send_json(client: EngineClient, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
    """Send one request and return the decoded JSON, raising obatch errors only."""
    try:
        async with client.session.request(
            method, client.base_url + path, data=orjson.dumps(payload) if payload is not None else None,
        ) as response:
            status, content = response.status, await response.read()
    except Exception as exc:
        raise translate(exc) from exc
    if status >= 400:
        raise errors.from_status(status, error_message(status, content))
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise errors.TransientError(f"The engine sent invalid JSON: {content[:200]!r}") from exc


async def stream_lines(client: EngineClient, path: str, payload: dict[str, Any], *,
                       close: bool = False) -> AsyncIterator[bytes]:
    """POST and yield the response body line by line, translating faults (also those mid-stream).

    ``close`` asks for a fresh connection: llama.cpp's server drops the keep-alive connection after a stream, and the
    next request sent on it would fail.
    """
    headers = {"connection": "close"} if close else None
    try:
        async with client.session.post(client.base_url + path, data=orjson.dumps(payload),
                                       headers=headers) as response:
            if response.status >= 400:
                raise errors.from_status(response.status, error_message(response.status, await response.read()))
            async for line in response.content:
                line = line.strip()
                if line:
                    yield line
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
                   total_ms=num("total_ms"), cached_tokens=count("cache_n"))


def chat_chunk(cid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


class ChatFold:
    """A streamed chat completion folded, chunk by chunk, into the ``chat.completion`` it streams.

    Tool calls are merged by ``index``: an OpenAI-compatible engine sends a call's id and name first and its
    arguments in pieces after; a delta that carries an ``id`` starts a call of its own (Ollama sends each whole)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.logprobs: list[Any] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason = "stop"
        self.usage: dict[str, Any] = {}
        self.timings = Timings()
        self.first: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        self.first = self.first or chunk
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            if delta.get("reasoning_content"):
                self.thinking.append(delta["reasoning_content"])
            if isinstance(choice.get("logprobs"), dict):
                self.logprobs.extend(choice["logprobs"].get("content") or [])
            for call in delta.get("tool_calls") or []:
                self._merge_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = timings_from_llamacpp(chunk["timings"])

    def _merge_call(self, call: dict[str, Any]) -> None:
        same = [c for c in self.tool_calls if c.get("index") == call.get("index")] if not call.get("id") else []
        if not same:
            self.tool_calls.append({**call, "function": dict(call.get("function") or {})})
            return
        function = same[-1].setdefault("function", {})
        for key, value in (call.get("function") or {}).items():
            function[key] = (function.get(key) or "") + value if key == "arguments" else value

    def completion(self, model: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content), "refusal": None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.thinking:
            message["reasoning_content"] = "".join(self.thinking)
        first = self.first or {}
        return {
            "id": first.get("id", new_id("chatcmpl")), "object": "chat.completion",
            "created": first.get("created", now()), "model": first.get("model", model),
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason,
                         "logprobs": {"content": self.logprobs, "refusal": None} if self.logprobs else None}],
            "usage": self.usage,
        }


async def complete_by_streaming(backend: Backend, body: dict[str, Any], *, num_ctx: int | None) -> Result:
    """Run a chat request as a stream and fold it into one response, measuring client-side TTFT."""
    started = time.perf_counter()
    ttft: float | None = None
    fold = ChatFold()
    async for chunk in backend.stream_chat(body, num_ctx=num_ctx):
        fold.add(chunk)
        if ttft is None and fold.content:
            ttft = (time.perf_counter() - started) * 1000
    fold.timings.ttft_ms = ttft
    return Result(fold.completion(body.get("model")), fold.timings)
