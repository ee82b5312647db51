"""``/v1/completions`` with several prompts, and token-array input, for engines that take one text prompt a request.

OpenAI's ``prompt`` is a string, a list of strings, one prompt as a list of token ids, or a list of such lists; the
answer holds one choice per prompt, ``index`` in the prompts' order, and the usage of them all. Ollama's
``/api/generate`` takes one text prompt, and the embedded llama.cpp answers a list with the usage of its first prompt
only (and starts its stream of one with ``data: null``): both run a list here as one request per prompt, in order,
and fold the answers (``complete_each``) or chain the streams (``stream_each``). Text-completion streams from every
backend end alike: chunks without usage, then one ``choices: []`` chunk carrying it (OpenAI's ``include_usage``
shape; the server drops it when the client did not ask).

Token ids can only go to an engine that reads them (llama.cpp, vLLM); where it cannot turn them back into text
(Ollama has no detokenize API) ``refuse_tokens`` says what to send instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from obatch import errors
from obatch.backends.base import Result, Timings


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def prompts(body: dict[str, Any]) -> list[Any]:
    """The prompts of a completions body: each a string or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_tokens(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_tokens(p) for p in prompt):
        return list(prompt)
    raise errors.PermanentError("prompt must be a string, a list of strings, a list of token ids or a list of such "
                                "lists.", param="prompt")


def has_tokens(value: Any) -> bool:
    """Whether an input (``prompt`` or embeddings ``input``) holds token ids rather than text."""
    return _is_tokens(value) or (isinstance(value, list) and any(_is_tokens(v) for v in value))


def refuse_tokens(backend: str, field: str) -> errors.PermanentError:
    return errors.PermanentError(
        f"The {backend} backend takes text only: it has no way to turn token ids back into text. Send {field} as a "
        f"string or a list of strings instead of token ids.", code="invalid_value", param=field)


def split(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One body per prompt when ``body`` holds several, else None."""
    found = prompts(body)
    return [{**body, "prompt": p} for p in found] if len(found) > 1 else None


def _usage_sum(usages: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(int(u.get("prompt_tokens") or 0) for u in usages)
    completion = sum(int(u.get("completion_tokens") or 0) for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings_sum(all_timings: list[Timings]) -> Timings:
    def add(name: str) -> Any:
        values = [getattr(t, name) for t in all_timings]
        return sum(values) if values and all(v is not None for v in values) else None

    return Timings(**{name: add(name) for name in ("prompt_tokens", "completion_tokens", "prompt_ms", "decode_ms",
                                                    "load_ms", "total_ms")})


async def complete_each(run: Callable[[dict[str, Any]], Awaitable[Result]], bodies: list[dict[str, Any]]) -> Result:
    """Run one request per prompt, in order, and fold the answers into one ``text_completion``."""
    results = [await run(b) for b in bodies]
    first = results[0].body
    choices = [dict(r.body["choices"][0], index=i) for i, r in enumerate(results)]
    body = {**first, "choices": choices, "usage": _usage_sum([r.body.get("usage") or {} for r in results])}
    return Result(body, _timings_sum([r.timings for r in results]))


def usage_chunk(chunk: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in chunk.items() if k not in ("choices", "usage", "timings")}, "choices": [],
            "usage": usage}


async def split_usage(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """An engine's text-completion stream in the common shape: usage moved off the last choice chunk (llama.cpp
    puts it there) into a ``choices: []`` chunk of its own at the end; ``null`` events dropped."""
    usage: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    async for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices"):
            last = chunk
            yield {k: v for k, v in chunk.items() if k != "usage"}
    if usage is not None and last is not None:
        yield usage_chunk(last, usage)


async def stream_each(open_stream: Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]],
                      bodies: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """One stream per prompt, one after the other, as one stream: choices numbered by prompt, one id, the usage
    of all at the end."""
    usages: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for i, body in enumerate(bodies):
        async for chunk in open_stream(body):
            if chunk.get("usage") and not chunk.get("choices"):
                usages.append(chunk["usage"])
                continue
            first = first or chunk
            yield {**chunk, "id": first["id"], "created": first["created"],
                   "choices": [dict(c, index=i) for c in chunk.get("choices") or []]}
    if first is not None and usages:
        yield usage_chunk(first, _usage_sum(usages))


def text_chunk(cid: str, model: str, created: int, text: str, finish_reason: str | None = None,
               logprobs: Any = None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
