"""Typed request bodies: the shape OpenAI gives each field a client may send to chat, completions, embeddings and
responses, checked before anything reads the body. A body of the wrong shape (``messages: [1, 2]``, ``stop: 5``, a
tool call without a function, a seed past 64 bits) is refused naming the field, on every path to the engine: the
server's direct routes answer 400, a batch line gets a validation error on its line.

Only shapes are checked here; what a shared engine may be asked for (output budgets, context, engine options,
``keep_alive``) is ``obatch.jsonl.EnginePolicy``'s, and unknown fields pass (engines take their own)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Int64 = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]
Probability = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Stop = str | Annotated[list[str], Field(max_length=16)]
Object = dict[str, Any]
Tokens = list[Annotated[int, Field(ge=0, le=2 ** 31 - 1)]]


class _Open(BaseModel):
    """Fields not named pass as they are (an engine's own, newer OpenAI ones); named ones must have their type."""

    model_config = ConfigDict(extra="allow", strict=True)


class _Function(_Open):
    name: str
    arguments: str | Object | None = None


class _ToolCall(_Open):
    id: str | None = None
    type: str | None = None
    function: _Function


class _Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Object] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None


class _Sampling(_Open):
    seed: Int64 | None = None
    temperature: Probability | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    stream: bool | None = None
    stream_options: Object | None = None
    user: str | None = None


class ChatBody(_Sampling):
    messages: Annotated[list[_Message], Field(min_length=1)]
    stop: Stop | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    tools: list[Object] | None = None
    tool_choice: str | Object | None = None
    response_format: Object | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    logit_bias: dict[str, float] | None = None
    reasoning_effort: str | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | Tokens | list[Tokens]
    suffix: str | None = None
    stop: Stop | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class EmbeddingBody(_Open):
    input: str | list[str] | Tokens | list[Tokens]
    dimensions: Annotated[int, Field(ge=1, le=65536)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


class ResponsesBody(_Sampling):
    input: str | list[Object]
    instructions: str | None = None
    tools: list[Object] | None = None
    tool_choice: str | Object | None = None
    text: Object | None = None
    reasoning: Object | None = None
    include: list[str] | None = None
    previous_response_id: str | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


BODIES: dict[str, type[_Open]] = {"/v1/chat/completions": ChatBody, "/v1/completions": CompletionBody,
                                  "/v1/embeddings": EmbeddingBody, "/v1/responses": ResponsesBody}


def _where(location: tuple[int | str, ...]) -> str:
    """``("messages", 0, "tool_calls", 0, "function")`` → ``body.messages[0].tool_calls[0].function``; the
    branch names pydantic adds for a union (``str``, ``list[...]``) are left out."""
    path = "body"
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "function-after", "constrained-int"):
            continue
        else:
            path += f".{part}"
    return path[:120]


def body_problem(url: str, body: dict[str, Any]) -> tuple[str, str, str] | None:
    """(code, message, param) of the first field of ``body`` whose shape is wrong for ``url``, or None."""
    model = BODIES.get(url)
    if model is None:
        return None
    try:
        model.model_validate(body)
    except ValidationError as exc:
        first = min(exc.errors(include_url=False, include_input=False), key=lambda e: len(e["loc"]))
        param = _where(first["loc"])
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_type" if first[
            "type"].endswith(("_type", "union_tag_invalid")) or first["type"] in ("model_type", "dict_type",
                                                                                 "list_type") else "invalid_value"
        said = re.sub(r" or instance of \w+", "", first["msg"])  # not the class names of this module
        return code, f"{param}: {said}."[:300], param
    return None
