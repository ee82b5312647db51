"""OpenAI's Responses API mapped onto chat completions, both ways, for engines that do not serve ``/v1/responses``
(Ollama's native API; an OpenAI-compatible engine that answers 404 there).

Request: ``instructions`` → a system message; ``input`` (a string, or items: messages with ``input_text`` /
``input_image`` parts, ``function_call`` and ``function_call_output``) → messages; ``max_output_tokens`` →
``max_completion_tokens``; ``text.format`` → ``response_format``; ``reasoning.effort`` → ``reasoning_effort``;
function ``tools`` → chat tools; ``top_logprobs`` → ``logprobs`` + ``top_logprobs``. Response: the chat message
becomes a ``reasoning`` item (its thinking text), a ``message`` item (``output_text``, with logprobs when asked)
and ``function_call`` items; ``finish_reason`` "length" makes the response ``incomplete`` with
``incomplete_details.reason`` "max_output_tokens"; usage is renamed (``input_tokens``, ``output_tokens``,
``output_tokens_details.reasoning_tokens``). The shapes are openai-python's ``types/responses`` models.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from obatch import errors

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


def from_chat(chat: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` → the Responses ``response`` object answering ``request``."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    incomplete = choice.get("finish_reason") == "length"
    status = "incomplete" if incomplete else "completed"
    output: list[dict[str, Any]] = []
    thinking = message.get("reasoning_content") or message.get("reasoning")
    if thinking:
        output.append({"id": _id("rs"), "type": "reasoning", "summary": [], "status": status,
                       "content": [{"type": "reasoning_text", "text": thinking}]})
    calls = message.get("tool_calls") or []
    text = message.get("content")
    if text or not calls:
        part = {"type": "output_text", "text": text or "", "annotations": [], "logprobs": _logprobs(choice)}
        output.append({"id": _id("msg"), "type": "message", "role": "assistant", "status": status,
                       "content": [part]})
    for call in calls:
        function = call.get("function") or {}
        output.append({"id": _id("fc"), "type": "function_call", "call_id": call.get("id") or _id("call"),
                       "name": function.get("name", ""), "arguments": function.get("arguments") or "{}",
                       "status": "completed"})
    created = chat.get("created") or int(time.time())
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else None
    return {
        "id": _id("resp"), "object": "response", "created_at": created,
        "completed_at": None if incomplete else int(time.time()), "model": chat.get("model") or request.get("model"),
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
        "background": False, "previous_response_id": None, "usage": usage_of(chat.get("usage")),
        # OpenAI's schema types the deprecated ``user`` a string, never null: sent only when the request has one
        **({"user": request["user"]} if isinstance(request.get("user"), str) else {}),
    }


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
