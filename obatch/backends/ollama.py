"""Ollama through its native API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/show``, ``/api/tags``,
``/api/ps``, ``/api/version``).

The native API, not Ollama's ``/v1`` shim: only it can set ``num_ctx`` and ``keep_alive`` and report the engine's
durations. OpenAI bodies are mapped here both ways (shared/reference/ollama-api.md, "Mapping"):
max_tokens/max_completion_tokens → options.num_predict; temperature, top_p, seed, stop, penalties → options;
response_format json_object → format "json", json_schema → format <schema>; tools → tools. Back: done_reason
"length" → finish_reason "length", tool calls → "tool_calls", else "stop"; prompt_eval_count / eval_count → usage.
Reasoning: ``reasoning_effort`` → ``think`` ("none" → false, "minimal"/"low" → "low", "medium", "high"/"xhigh"/"max"
→ "high"); ``message.thinking`` → ``reasoning_content``. Ollama counts thinking and answer in one ``eval_count``, so
``completion_tokens_details.reasoning_tokens`` is the thinking's share of it (by characters; exact when streamed,
where each chunk is one token). ``logprobs`` / ``top_logprobs`` (chat: bool + int; completions: an int) →
Ollama's ``logprobs`` / ``top_logprobs``, and its ``logprobs`` list back into OpenAI's shapes.
``/v1/responses`` is mapped onto ``/api/chat`` through ``obatch.backends.responses``. ``/v1/completions`` with a
list of prompts runs one ``/api/generate`` per prompt (``obatch.backends.completions``); token ids, as a prompt or
as embeddings input, are refused: Ollama has no detokenize API to turn them back into text.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson

from obatch import concurrency, errors
from obatch.backends import completions, responses
from obatch.backends.base import (
    Capabilities,
    ModelInfo,
    Result,
    Timings,
    chat_chunk,
    complete_by_streaming,
    make_client,
    new_id,
    now,
    send_json,
    stream_lines,
)

_OPTION_KEYS = {
    "temperature": "temperature", "top_p": "top_p", "seed": "seed",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
}
# OpenAI fields Ollama cannot honour: refusing them is better than silently ignoring them.
_UNSUPPORTED = ("logit_bias",)
_THINK = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high",
          "max": "high"}
MAX_TOP_LOGPROBS = 20
COUNT_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"  # what the slot count's short generations continue
COUNT_TOKENS = 4  # tokens each generates: long enough that those run at once are seen to overlap


def _options(body: dict[str, Any], num_ctx: int | None) -> dict[str, Any]:
    options: dict[str, Any] = dict(body.get("options") or {})
    for key, target in _OPTION_KEYS.items():
        if body.get(key) is not None:
            options[target] = body[key]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if num_ctx is not None and "num_ctx" not in options:
        options["num_ctx"] = num_ctx
    if isinstance(body.get("num_ctx"), int):
        options["num_ctx"] = body["num_ctx"]
    return options


def _check_supported(body: dict[str, Any]) -> None:
    if (body.get("n") or 1) != 1:
        raise errors.PermanentError("Ollama returns one choice per request: n must be 1.", param="n")
    for key in _UNSUPPORTED:
        if body.get(key):
            raise errors.PermanentError(f"{key} is not supported by the Ollama backend.", param=key)


def _think(body: dict[str, Any]) -> Any:
    """Ollama's ``think`` from the request's own ``think`` or OpenAI's ``reasoning_effort``."""
    if body.get("think") is not None:
        return body["think"]
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in _THINK:
        raise errors.PermanentError(f"reasoning_effort must be one of {', '.join(_THINK)}; got {effort!r}.",
                                    param="reasoning_effort")
    return _THINK[effort]


def _logprob_fields(wanted: Any, top: Any) -> dict[str, Any]:
    """Ollama's ``logprobs`` / ``top_logprobs`` request fields (chat sends a bool and an int, completions an int)."""
    if not wanted:
        return {}
    count = top if isinstance(top, int) and not isinstance(top, bool) else 0
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        count = wanted
    if not 0 <= count <= MAX_TOP_LOGPROBS:
        raise errors.PermanentError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs")
    return {"logprobs": True, "top_logprobs": count} if count else {"logprobs": True}


def _token_logprob(item: dict[str, Any]) -> dict[str, Any]:
    token = str(item.get("token", ""))
    raw = item.get("bytes")
    return {"token": token, "logprob": float(item.get("logprob", 0.0)),
            "bytes": list(raw) if isinstance(raw, list) else list(token.encode())}


def chat_logprobs(items: Any) -> dict[str, Any] | None:
    """Ollama's ``logprobs`` list → a chat choice's ``logprobs`` object."""
    if not isinstance(items, list):
        return None
    return {"content": [{**_token_logprob(i), "top_logprobs": [_token_logprob(t) for t in i.get("top_logprobs") or []]}
                        for i in items if isinstance(i, dict)], "refusal": None}


def completion_logprobs(items: Any, text: str) -> dict[str, Any] | None:
    """Ollama's ``logprobs`` list → a completion choice's legacy ``logprobs`` (tokens, token_logprobs, ...)."""
    if not isinstance(items, list):
        return None
    tokens, offsets, offset = [], [], 0
    for item in items:
        tokens.append(str(item.get("token", "")))
        offsets.append(offset)
        offset += len(tokens[-1])
    tops = [{str(t.get("token", "")): float(t.get("logprob", 0.0)) for t in i.get("top_logprobs") or []}
            for i in items]
    return {"tokens": tokens, "token_logprobs": [float(i.get("logprob", 0.0)) for i in items],
            "top_logprobs": tops, "text_offset": offsets}


def _format(body: dict[str, Any]) -> Any:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return body.get("format")
    if fmt.get("type") == "json_object":
        return "json"
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or "json"
    return None


def _message_to_ollama(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.get("role", "user")}
    content = message.get("content")
    if isinstance(content, list):
        texts, images = [], []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                images.append(url.split(",", 1)[1] if url.startswith("data:") else url)
        out["content"] = "\n".join(texts)
        if images:
            out["images"] = images
    else:
        out["content"] = content or ""
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"function": {"name": call["function"]["name"],
                          "arguments": _json_arguments(call["function"].get("arguments"))}}
            for call in message["tool_calls"]
        ]
    if message.get("role") == "tool" and message.get("name"):
        out["tool_name"] = message["name"]
    return out


def _json_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    return arguments


def chat_payload(body: dict[str, Any], num_ctx: int | None, *, stream: bool) -> dict[str, Any]:
    """OpenAI chat body → Ollama ``/api/chat`` request."""
    _check_supported(body)
    payload: dict[str, Any] = {
        "model": body["model"],
        "messages": [_message_to_ollama(m) for m in body.get("messages") or []],
        "stream": stream,
        "options": _options(body, num_ctx),
    }
    fmt = _format(body)
    if fmt is not None:
        payload["format"] = fmt
    for key in ("tools", "keep_alive"):
        if body.get(key) is not None:
            payload[key] = body[key]
    think = _think(body)
    if think is not None:
        payload["think"] = think
    payload.update(_logprob_fields(body.get("logprobs"), body.get("top_logprobs")))
    return payload


def _finish_reason(data: dict[str, Any], tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if data.get("done_reason") == "length" else "stop"


def _usage(data: dict[str, Any], reasoning: int | None = None) -> dict[str, Any]:
    prompt = int(data.get("prompt_eval_count") or 0)
    completion = int(data.get("eval_count") or 0)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": min(reasoning, completion)}
    return usage


def reasoning_share(eval_count: int, thinking: str, content: str) -> int:
    """The thinking's tokens out of ``eval_count`` (Ollama counts thinking and answer together), by characters."""
    if not thinking or eval_count <= 0:
        return 0
    return min(eval_count, max(1, round(eval_count * len(thinking) / (len(thinking) + len(content)))))


def timings_of(data: dict[str, Any]) -> Timings:
    """Ollama's durations (nanoseconds) → ``Timings`` (milliseconds)."""
    def ms(key: str) -> float | None:
        value = data.get(key)
        return value / 1e6 if isinstance(value, int | float) else None

    return Timings(
        prompt_tokens=data.get("prompt_eval_count"), completion_tokens=data.get("eval_count"),
        prompt_ms=ms("prompt_eval_duration"), decode_ms=ms("eval_duration"),
        load_ms=ms("load_duration"), total_ms=ms("total_duration"),
    )


def _llamacpp_timings(data: dict[str, Any]) -> dict[str, Any]:
    t = timings_of(data)
    return {"prompt_n": t.prompt_tokens, "prompt_ms": t.prompt_ms, "predicted_n": t.completion_tokens,
            "predicted_ms": t.decode_ms, "load_ms": t.load_ms, "total_ms": t.total_ms}


def _openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"id": f"call_{i}_{new_id('t')[2:14]}", "type": "function",
         "function": {"name": c["function"]["name"],
                      "arguments": orjson.dumps(c["function"].get("arguments", {})).decode()}}
        for i, c in enumerate(calls)
    ]


def chat_response(data: dict[str, Any]) -> dict[str, Any]:
    """Ollama ``/api/chat`` answer → OpenAI ``chat.completion``."""
    message = data.get("message") or {}
    out_message: dict[str, Any] = {"role": "assistant", "content": message.get("content", ""), "refusal": None}
    calls = message.get("tool_calls") or []
    if calls:
        out_message["tool_calls"] = _openai_tool_calls(calls)
    reasoning = None
    if message.get("thinking"):
        out_message["reasoning_content"] = message["thinking"]
        reasoning = reasoning_share(int(data.get("eval_count") or 0), message["thinking"],
                                    str(message.get("content") or ""))
    return {
        "id": new_id("chatcmpl", secret=False), "object": "chat.completion", "created": now(),
        "model": data.get("model"),
        "choices": [{"index": 0, "message": out_message, "finish_reason": _finish_reason(data, bool(calls)),
                     "logprobs": chat_logprobs(data.get("logprobs"))}],
        "usage": _usage(data, reasoning),
    }


def generate_payload(body: dict[str, Any], num_ctx: int | None, *, stream: bool = False) -> dict[str, Any]:
    """OpenAI completions body of one prompt (``completions.split`` parts a list first) → ``/api/generate``."""
    _check_supported(body)
    found = completions.prompts(body)
    if len(found) != 1:
        raise errors.PermanentError("One prompt per /api/generate request.", param="prompt")
    if not isinstance(found[0], str):
        raise completions.refuse_tokens("Ollama", "prompt")
    payload: dict[str, Any] = {"model": body["model"], "prompt": found[0], "stream": stream,
                               "options": _options(body, num_ctx)}
    if body.get("suffix"):
        payload["suffix"] = body["suffix"]
    fmt = _format(body)
    if fmt is not None:
        payload["format"] = fmt
    for key in ("system", "raw", "keep_alive"):
        if body.get(key) is not None:
            payload[key] = body[key]
    payload.update(_logprob_fields(body.get("logprobs"), None))
    return payload


def generate_response(data: dict[str, Any]) -> dict[str, Any]:
    text = data.get("response", "")
    return {
        "id": new_id("cmpl", secret=False), "object": "text_completion", "created": now(), "model": data.get("model"),
        "choices": [{"index": 0, "text": text, "logprobs": completion_logprobs(data.get("logprobs"), text),
                     "finish_reason": _finish_reason(data, False)}],
        "usage": _usage(data),
    }


def embed_payload(body: dict[str, Any], num_ctx: int | None) -> dict[str, Any]:
    if completions.has_tokens(body.get("input")):
        raise completions.refuse_tokens("Ollama", "input")
    payload: dict[str, Any] = {"model": body["model"], "input": body["input"], "truncate": False}
    options = _options({"options": body.get("options")}, num_ctx)
    if options:
        payload["options"] = options
    if body.get("dimensions") is not None:
        payload["dimensions"] = body["dimensions"]
    if body.get("keep_alive") is not None:
        payload["keep_alive"] = body["keep_alive"]
    return payload


def embed_response(data: dict[str, Any], encoding_format: str | None) -> dict[str, Any]:
    def encode(vector: list[float]) -> Any:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    prompt = int(data.get("prompt_eval_count") or 0)
    return {
        "object": "list", "model": data.get("model"),
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                 for i, v in enumerate(data.get("embeddings") or [])],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def _model_info(name: str, data: dict[str, Any]) -> ModelInfo:
    details = data.get("details") or {}
    info = data.get("model_info") or {}
    context_length = next((int(v) for k, v in info.items() if k.endswith(".context_length")), None)
    return ModelInfo(
        id=name, context_length=context_length, family=details.get("family"),
        parameter_size=details.get("parameter_size"), quantization=details.get("quantization_level"),
        capabilities=tuple(data.get("capabilities") or ()),
    )


class OllamaBackend:
    """A client of one Ollama server."""

    name = "ollama"
    capabilities = Capabilities(sets_num_ctx=True, reloads_on_num_ctx=True, engine_timings=True)

    def __init__(self, url: str = "http://127.0.0.1:11434") -> None:
        self.url = url.rstrip("/")
        self._client = make_client(self.url)
        self._show_cache: dict[str, ModelInfo] = {}

    def _fit(self, model: Any, num_ctx: int | None) -> int | None:
        """Never ask more context than the model was trained for (when ``show`` told us its length)."""
        info = self._show_cache.get(str(model))
        if num_ctx is not None and info is not None and info.context_length:
            return min(num_ctx, info.context_length)
        return num_ctx

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        num_ctx = self._fit(body.get("model"), num_ctx)
        if url == "/v1/responses":
            chat = await self.complete("/v1/chat/completions", responses.to_chat(body), num_ctx=num_ctx,
                                       stream=stream)
            return Result(responses.from_chat(chat.body, body), chat.timings, chat.status_code)
        if url == "/v1/chat/completions":
            if stream:
                return await complete_by_streaming(self, body, num_ctx=num_ctx)
            data = await send_json(self._client, "POST", "/api/chat", chat_payload(body, num_ctx, stream=False))
            return Result(chat_response(data), timings_of(data))
        if url == "/v1/completions":
            if (parts := completions.split(body)) is not None:
                return await completions.complete_each(
                    lambda part: self.complete(url, part, num_ctx=num_ctx), parts)
            data = await send_json(self._client, "POST", "/api/generate", generate_payload(body, num_ctx))
            return Result(generate_response(data), timings_of(data))
        if url == "/v1/embeddings":
            data = await send_json(self._client, "POST", "/api/embed", embed_payload(body, num_ctx))
            return Result(embed_response(data, body.get("encoding_format")), timings_of(data))
        raise errors.PermanentError(f"Unsupported endpoint {url}.", param="url")

    async def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        cid, created, model = new_id("chatcmpl"), now(), str(body["model"])
        first = True
        num_ctx = self._fit(body.get("model"), num_ctx)
        thinking_chunks = 0
        async for line in stream_lines(self._client, "/api/chat", chat_payload(body, num_ctx, stream=True)):
            data = orjson.loads(line)
            if data.get("error"):
                raise errors.TransientError(f"The engine failed mid-stream: {data['error']}")
            message = data.get("message") or {}
            logprobs = chat_logprobs(data.get("logprobs"))
            if not data.get("done"):
                delta: dict[str, Any] = {"content": message.get("content", "")}
                if first:
                    delta["role"] = "assistant"
                    first = False
                if message.get("thinking"):
                    delta["reasoning_content"] = message["thinking"]
                    thinking_chunks += 1
                if message.get("tool_calls"):
                    delta["tool_calls"] = [dict(c, index=i) for i, c in
                                           enumerate(_openai_tool_calls(message["tool_calls"]))]
                chunk = chat_chunk(cid, model, created, delta)
                if logprobs is not None:
                    chunk["choices"][0]["logprobs"] = logprobs
                yield chunk
                continue
            calls = message.get("tool_calls") or []
            delta = {"tool_calls": [dict(c, index=i) for i, c in enumerate(_openai_tool_calls(calls))]} \
                if calls else {}
            chunk = chat_chunk(cid, model, created, delta, _finish_reason(data, bool(calls)),
                               _usage(data, thinking_chunks if thinking_chunks else None))
            if logprobs is not None:
                chunk["choices"][0]["logprobs"] = logprobs
            chunk["timings"] = _llamacpp_timings(data)
            yield chunk

    def stream_completion(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        parts = completions.split(body)
        if parts is not None:
            return completions.stream_each(lambda part: self._stream_generate(part, num_ctx), parts)
        return self._stream_generate(body, num_ctx)

    async def _stream_generate(self, body: dict[str, Any], num_ctx: int | None) -> AsyncIterator[dict[str, Any]]:
        cid, created, model = new_id("cmpl", secret=False), now(), str(body["model"])
        payload = generate_payload(body, self._fit(body.get("model"), num_ctx), stream=True)
        async for line in stream_lines(self._client, "/api/generate", payload):
            data = orjson.loads(line)
            if data.get("error"):
                raise errors.TransientError(f"The engine failed mid-stream: {data['error']}")
            text = str(data.get("response") or "")
            logprobs = completion_logprobs(data.get("logprobs"), text)
            if not data.get("done"):
                yield completions.text_chunk(cid, model, created, text, logprobs=logprobs)
                continue
            final = completions.text_chunk(cid, model, created, text, _finish_reason(data, False), logprobs)
            final["timings"] = _llamacpp_timings(data)
            yield final
            yield completions.usage_chunk(final, _usage(data))

    async def models(self) -> list[ModelInfo]:
        tags = await send_json(self._client, "GET", "/api/tags")
        loaded = {m.get("name"): m for m in (await send_json(self._client, "GET", "/api/ps")).get("models", [])}
        out = []
        for entry in tags.get("models", []):
            details = entry.get("details") or {}
            running = loaded.get(entry.get("name"))
            out.append(ModelInfo(
                id=entry["name"], family=details.get("family"), parameter_size=details.get("parameter_size"),
                quantization=details.get("quantization_level"), size=entry.get("size"),
                loaded=running is not None, digest=entry.get("digest"),
                loaded_context_length=(running or {}).get("context_length"),
                context_length=self._show_cache[entry["name"]].context_length
                if entry["name"] in self._show_cache else None,
            ))
        return out

    async def show(self, model: str) -> ModelInfo:
        if model not in self._show_cache:
            data = await send_json(self._client, "POST", "/api/show", {"model": model})
            self._show_cache[model] = _model_info(model, data)
        return self._show_cache[model]

    async def prepare(self, model: str, *, num_ctx: int | None, parallel: int | None) -> float:
        # Ollama loads on first use with the request's own options; nothing to do ahead of it.
        return 0.0

    async def slots(self) -> int | None:
        return None  # Ollama exposes no slot count (OLLAMA_NUM_PARALLEL stays on the server): auto measures

    async def count_slots(self, model: str, *, num_ctx: int | None, most: int) -> int | None:
        """How many requests Ollama runs ``model``'s generations at once, counted with ``most`` short ones.

        They go out together (with the lines' ``num_ctx``, so the model loads as the lines need it); those the
        runner took at once finish together, one generation's time after they started, and the others wait for
        their slots. The answers in within half a generation's time of the first are the first round; the most of
        them that the engine worked on at once are its slots (``most`` where all ran at once: at least that many).
        The requests still waiting are cancelled (Ollama drops a request whose client has gone). None where the
        model does not generate or the engine fails one of them: auto then finds the slots by itself."""
        info = self._show_cache.get(model)
        if info is not None and info.capabilities and "completion" not in info.capabilities:
            return None  # an embedding model: it generates nothing to count with (and Ollama runs it one at a time)
        body = {"model": model, "prompt": COUNT_PROMPT, "raw": True, "stream": False,
                "options": {"num_predict": COUNT_TOKENS, "temperature": 0,
                            **({"num_ctx": n} if (n := self._fit(model, num_ctx)) else {})}}
        clock = asyncio.get_running_loop().time

        async def one() -> tuple[float, float, float]:
            sent = clock()
            data = await send_json(self._client, "POST", "/api/generate", body)
            ended = clock()
            busy = (int(data.get("prompt_eval_duration") or 0) + int(data.get("eval_duration") or 0)) / 1e9
            return ended, busy, ended - sent

        tasks = [asyncio.ensure_future(one()) for _ in range(most)]
        spans: list[tuple[float, float, float]] = []
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = next(iter(done)).result()
            if pending:
                done2, pending = await asyncio.wait(pending, timeout=max(first[1] / 2, 0.01))
                done |= done2
            spans = [t.result() for t in done]  # one that failed fails the count: a faulty engine reads low
        except errors.BackendError:
            return None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not spans or not all(busy > 0 for _, busy, _ in spans):
            return None
        return most if len(spans) >= most else min(len(spans), concurrency.overlap(spans))

    async def loaded_context(self, model: str) -> int | None:
        """The context Ollama really loaded ``model`` with (``/api/ps`` ``context_length``), None if not loaded.

        Since 2026 Ollama's default depends on the GPU's memory and steps down on a load that runs out of it, so
        the asked ``num_ctx`` is not always what ran."""
        data = await send_json(self._client, "GET", "/api/ps")
        wanted = {model, model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"}
        for entry in data.get("models") or []:
            if entry.get("name") in wanted or entry.get("model") in wanted:
                value = entry.get("context_length")
                return int(value) if isinstance(value, int) else None
        return None

    async def version(self) -> str | None:
        data = await send_json(self._client, "GET", "/api/version")
        return str(data.get("version")) if data.get("version") else None

    async def aclose(self) -> None:
        await self._client.aclose()
