"""OpenAI's Responses API mapped onto chat completions, both ways, for engines that do not serve ``/v1/responses``
(Ollama's native API; an OpenAI-compatible engine that answers 404 there).

Request: ``instructions`` → a system message; ``input`` (a string, or items: messages with ``input_text`` /
``input_image`` parts, ``function_call`` and ``function_call_output``) → messages; ``max_output_tokens`` →
``max_completion_tokens``; ``text.format`` → ``response_format``; ``reasoning.effort`` → ``reasoning_effort``;
function ``tools`` → chat tools; ``top_logprobs`` → ``logprobs`` + ``top_logprobs``. Response: the chat message
becomes a ``reasoning`` item (its thinking text), a ``message`` item (``output_text``, with logprobs when asked)
and ``function_call`` items; ``finish_reason`` "length" makes the response ``incomplete`` with
``incomplete_details.reason`` "max_output_tokens"; usage is renamed (``input_tokens``, ``output_tokens``,
``output_tokens_details.reasoning_tokens``). A streamed request is answered with the Responses API's events, built
from the chat stream (``stream_from_chat``) on every backend. The shapes are openai-python's ``types/responses``
models.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson

from obatch import errors
from obatch.backends.base import ChatFold

# Fields a chat request takes unchanged (obatch's and Ollama's own extras among them).
_SAME = ("model", "temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty", "user",
         "parallel_tool_calls", "options", "num_ctx", "keep_alive", "think", "format", "metadata")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise errors.PermanentError("input_image needs an image_url (a URL or a data: URL); file_id is not "
                                        "supported here.", param="input")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal", ""))}
    raise errors.PermanentError(f"Input content of type {kind!r} is not supported by this backend.", param="input")


def _content(content: Any) -> Any:
    if isinstance(content, str) or content is None:
        return content or ""
    if isinstance(content, list):
        parts = [_text_part(p) for p in content if isinstance(p, dict)]
        if all(p["type"] == "text" for p in parts):
            return "\n".join(p["text"] for p in parts)
        return parts
    raise errors.PermanentError("A message's content must be a string or a list of parts.", param="input")


def _messages(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise errors.PermanentError("input must be a string or a list of items.", param="input")
    out: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            raise errors.PermanentError("Each input item must be an object.", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            out.append({"role": "system" if role == "developer" else role, "content": _content(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or _id("call"), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else orjson.dumps(output).decode()})
        elif kind == "reasoning":
            continue  # earlier thinking is not sent back to the model
        else:
            raise errors.PermanentError(f"Input items of type {kind!r} are not supported by this backend.",
                                        param="input")
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for tool in tools or []:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise errors.PermanentError(f"Only function tools can run on a local model, not {kind!r}.",
                                        param="tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise errors.PermanentError(f"text.format of type {fmt.get('type')!r} is not supported.", param="text.format")


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request body → the chat completions body that asks the same."""
    if body.get("previous_response_id") or body.get("conversation"):
        raise errors.PermanentError("Responses are not stored here: send the whole conversation as input instead "
                                    "of previous_response_id or conversation.", param="previous_response_id")
    messages = _messages(body.get("input"))
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    chat: dict[str, Any] = {k: body[k] for k in _SAME if body.get(k) is not None}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    if effort is not None:
        chat["reasoning_effort"] = effort
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    top = body.get("top_logprobs")
    if (isinstance(top, int) and top > 0) or "message.output_text.logprobs" in (body.get("include") or []):
        chat["logprobs"] = True
        if isinstance(top, int) and top > 0:
            chat["top_logprobs"] = top
    return chat


def _logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat choice's token logprobs as an ``output_text`` part's (a list, empty when none were asked for)."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not content:
        return []

    def entry(item: dict[str, Any]) -> dict[str, Any]:
        token = str(item.get("token", ""))
        return {"token": token, "logprob": float(item.get("logprob", 0.0)),
                "bytes": item.get("bytes") or list(token.encode())}

    return [{**entry(item), "top_logprobs": [entry(t) for t in item.get("top_logprobs") or []]} for item in content]


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any]:
    """Chat usage → Responses usage (with the detail objects the SDK requires)."""
    u = chat_usage or {}
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def _output_text(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """An ``output_text`` part; ``logprobs`` is always a list, as OpenAI sends it (empty unless asked)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _message_item(item_id: str, status: str, part: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [part] if part is not None else []}


def _reasoning_item(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text is not None else []}


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    function = call.get("function") or {}
    return {"id": _id("fc"), "type": "function_call", "call_id": call.get("id") or _id("call"),
            "name": function.get("name", ""), "arguments": function.get("arguments") or "{}", "status": status}


def _envelope(request: dict[str, Any], *, response_id: str, created: int, model: Any, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """The ``response`` object around ``output`` (the request's settings echoed as OpenAI does)."""
    incomplete = status == "incomplete"
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else None
    return {
        "id": response_id, "object": "response", "created_at": created,
        "completed_at": int(time.time()) if status == "completed" else None, "model": model or request.get("model"),
        "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
        "metadata": request.get("metadata") or {}, "output": output,
        "parallel_tool_calls": bool(request.get("parallel_tool_calls", True)),
        "temperature": request.get("temperature"), "top_p": request.get("top_p"),
        "tool_choice": request.get("tool_choice") or "auto", "tools": request.get("tools") or [],
        "text": request.get("text") or {"format": {"type": "text"}},
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")} if reasoning
        else None,
        "top_logprobs": request.get("top_logprobs"), "truncation": "disabled", "store": False,
        "background": False, "previous_response_id": None, "usage": usage,
        # OpenAI's schema types the deprecated ``user`` a string, never null: sent only when the request has one
        **({"user": request["user"]} if isinstance(request.get("user"), str) else {}),
    }


def _status(choice: dict[str, Any]) -> str:
    return "incomplete" if choice.get("finish_reason") == "length" else "completed"


def from_chat(chat: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` → the Responses ``response`` object answering ``request``."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    status = _status(choice)
    output: list[dict[str, Any]] = []
    thinking = message.get("reasoning_content") or message.get("reasoning")
    if thinking:
        output.append(_reasoning_item(_id("rs"), status, thinking))
    calls = message.get("tool_calls") or []
    text = message.get("content")
    if text or not calls:
        output.append(_message_item(_id("msg"), status, _output_text(text or "", _logprobs(choice))))
    output.extend(_call_item(call) for call in calls)
    return _envelope(request, response_id=_id("resp"), created=chat.get("created") or int(time.time()),
                     model=chat.get("model"), status=status, output=output, usage=usage_of(chat.get("usage")))


class _Events:
    """Responses streaming events, numbered (``sequence_number``) in the order they are made."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.count += 1
        return {"type": kind, "sequence_number": self.count - 1, **fields}


async def stream_from_chat(chunks: AsyncIterator[dict[str, Any]], request: dict[str, Any]
                           ) -> AsyncIterator[dict[str, Any]]:
    """A streamed chat completion → the Responses API's streaming events, in OpenAI's order:
    ``response.created``, ``response.in_progress``; for the thinking a ``reasoning`` item and for the answer a
    ``message`` item (``output_item.added``, ``content_part.added``, the text's deltas, its ``.done``,
    ``content_part.done``, ``output_item.done``); ``function_call`` items once the calls are known; then
    ``response.completed`` (or ``response.incomplete`` at ``max_output_tokens``) with the whole response and usage."""
    event = _Events()
    fold = ChatFold()
    response_id, created = _id("resp"), int(time.time())
    model = request.get("model")
    shell = _envelope(request, response_id=response_id, created=created, model=model, status="in_progress",
                      output=[], usage=None)
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    output: list[dict[str, Any]] = []
    current: tuple[str, str, list[str], list[dict[str, Any]]] | None = None  # kind, item id, texts, logprobs

    def opened(kind: str) -> Iterator[dict[str, Any]]:
        nonlocal current
        yield from closed("completed")
        item_id = _id("msg" if kind == "message" else "rs")
        current = (kind, item_id, [], [])
        index = len(output)
        if kind == "message":
            yield event("response.output_item.added", output_index=index,
                        item=_message_item(item_id, "in_progress", None))
            part: dict[str, Any] = _output_text("", [])
        else:
            yield event("response.output_item.added", output_index=index,
                        item=_reasoning_item(item_id, "in_progress", None))
            part = {"type": "reasoning_text", "text": ""}
        yield event("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=part)

    def closed(status: str) -> Iterator[dict[str, Any]]:
        nonlocal current
        if current is None:
            return
        kind, item_id, texts, logprobs = current
        current, text, index = None, "".join(texts), len(output)
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        if kind == "message":
            part: dict[str, Any] = _output_text(text, logprobs)
            yield event("response.output_text.done", **where, text=text, logprobs=logprobs)
            item = _message_item(item_id, status, part)
        else:
            part = {"type": "reasoning_text", "text": text}
            yield event("response.reasoning_text.done", **where, text=text)
            item = _reasoning_item(item_id, status, text)
        yield event("response.content_part.done", **where, part=part)
        output.append(item)
        yield event("response.output_item.done", output_index=index, item=item)

    async for chunk in chunks:
        fold.add(chunk)
        model = chunk.get("model") or model
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            for kind, text in (("reasoning", delta.get("reasoning_content")), ("message", delta.get("content"))):
                if not text:
                    continue
                if current is None or current[0] != kind:
                    for opening in opened(kind):
                        yield opening
                assert current is not None
                current[2].append(text)
                where = {"item_id": current[1], "output_index": len(output), "content_index": 0}
                if kind == "message":
                    logprobs = _logprobs(choice) or []
                    current[3].extend(logprobs)
                    yield event("response.output_text.delta", **where, delta=text, logprobs=logprobs)
                else:
                    yield event("response.reasoning_text.delta", **where, delta=text)
    final = from_chat(fold.completion(model), request)
    status = final["status"]
    calls = [item for item in final["output"] if item["type"] == "function_call"]
    if current is None and not calls and not any(item["type"] == "message" for item in output):
        for opening in opened("message"):  # an empty answer is still a message, as in the plain response
            yield opening
    for closing in closed(status):
        yield closing
    for call in calls:
        index = len(output)
        yield event("response.output_item.added", output_index=index,
                    item={**call, "arguments": "", "status": "in_progress"})
        yield event("response.function_call_arguments.delta", item_id=call["id"], output_index=index,
                    delta=call["arguments"])
        yield event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                    name=call["name"], arguments=call["arguments"])
        output.append(call)
        yield event("response.output_item.done", output_index=index, item=call)
    final.update(id=response_id, created_at=created, output=output)
    yield event("response.incomplete" if status == "incomplete" else "response.completed", response=final)


def normalise(response: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """An engine's own Responses answer, with what the SDK requires filled in where the engine left it out.

    llama.cpp (xllamacpp 2026.10) omits ``tools``, ``tool_choice``, ``parallel_tool_calls`` and the usage details,
    and says "completed" for an answer cut at ``max_output_tokens``: such an answer is marked incomplete here.
    An ``output_text`` part without ``logprobs`` (which OpenAI's schema requires) gets an empty list."""
    for item in response.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("type") == "output_text":
                    part.setdefault("logprobs", [])
    response.setdefault("tools", request.get("tools") or [])
    response.setdefault("tool_choice", request.get("tool_choice") or "auto")
    response.setdefault("parallel_tool_calls", bool(request.get("parallel_tool_calls", True)))
    usage = response.get("usage")
    limit = request.get("max_output_tokens")
    if (response.get("status") == "completed" and isinstance(usage, dict) and isinstance(limit, int)
            and int(usage.get("output_tokens") or 0) >= limit):
        response["status"], response["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        for item in response.get("output") or []:
            if isinstance(item, dict) and item.get("status") == "completed":
                item["status"] = "incomplete"
    if isinstance(usage, dict):
        usage.setdefault("input_tokens_details", {})
        usage["input_tokens_details"].setdefault("cached_tokens", 0)
        usage["input_tokens_details"].setdefault("cache_write_tokens", 0)
        usage.setdefault("output_tokens_details", {})
        usage["output_tokens_details"].setdefault("reasoning_tokens", 0)
        usage.setdefault("total_tokens", int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0))
    return response
