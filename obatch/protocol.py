"""OpenAI wire models, with OpenAI's exact field names (openai-python ``types/batch*.py``, ``file_object.py``).

These are what crosses a boundary: batch input/output lines, File and Batch objects, error bodies. Database rows
live in ``obatch.store`` and are converted to these, never returned as they are.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, InstanceOf

ENDPOINTS: tuple[str, ...] = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions")
Endpoint = Literal["/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions"]
# Batch endpoints OpenAI accepts that a local text model cannot serve: refused by name, never with a generic error.
UNSERVABLE_ENDPOINTS: tuple[str, ...] = ("/v1/moderations", "/v1/images/generations", "/v1/images/edits",
                                         "/v1/videos")


def endpoint_problem(endpoint: object) -> str | None:
    """Why ``endpoint`` cannot be a batch endpoint here (None when it can): names it and what obatch serves."""
    if endpoint in ENDPOINTS:
        return None
    supported = ", ".join(ENDPOINTS)
    if endpoint in UNSERVABLE_ENDPOINTS:
        return (f"{endpoint} is a batch endpoint at OpenAI, but local models cannot serve it; obatch supports "
                f"{supported}.")
    return f"endpoint must be one of {supported}; got {endpoint!r}."

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
FINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]


class ResponseBody(_Wire):
    """``body`` is a dict when a line is read. When obatch writes a line from the store it is the stored JSON text
    as an ``orjson.Fragment``: a million-line output file is written without parsing every response again."""

    status_code: int
    request_id: str
    body: dict[str, Any] | InstanceOf[orjson.Fragment]


class LineError(_Wire):
    code: str | None
    message: str | None


class LineStats(_Wire):
    """What obatch measured for a line, beside OpenAI's fields (clients that do not know ``obatch`` ignore it)."""

    line: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    attempts: int | None = None
    num_ctx: int | None = None
    loaded_context: int | None = None  # the context the engine really ran with, where it tells (Ollama's /api/ps)
    truncated: bool | None = None


class OutputLine(_Wire):
    """One line of an output or error file: a ``response``, an ``error``, or both (an engine's error answer)."""

    id: str
    custom_id: str
    response: ResponseBody | None = None
    error: LineError | None = None
    obatch: LineStats | None = None

    def to_jsonl(self) -> bytes:
        """The line as written to a file. orjson writes the validated fields as they stand (these models have no
        aliases or serializers) and passes a raw response body through unparsed: a third of the cost of
        ``model_dump`` on the million-line path."""
        return orjson.dumps(self, default=_fields, option=orjson.OPT_APPEND_NEWLINE)


def _fields(value: Any) -> dict[str, Any]:
    """orjson's ``default`` for a nested model: its fields, then any extra ones."""
    if isinstance(value, BaseModel):
        extra = value.__pydantic_extra__
        return {**value.__dict__, **extra} if extra else value.__dict__
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class FileObject(_Wire):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class BatchErrorItem(_Wire):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(_Wire):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem] = Field(default_factory=list)


class RequestCounts(_Wire):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(_Wire):
    cached_tokens: int = 0


class OutputTokensDetails(_Wire):
    reasoning_tokens: int = 0


class BatchUsage(_Wire):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class Batch(_Wire):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    status: BatchStatus
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None
    # obatch's own, beside OpenAI's fields (clients that do not know it ignore it): how the batch was run, e.g.
    # {"concurrency": {"mode": "auto", "hosts": [{"url", "concurrency", "reason", "history", ...}]}}
    obatch: dict[str, Any] | None = None


class HostStatus(_Wire):
    """One engine host of a pool as ``/health`` reports it (obatch's own shape): its state, its concurrency level
    (``best`` is the level auto believes best while a probe is under way) and the reason for it."""

    url: str
    backend: str
    state: Literal["up", "down"]
    concurrency: int
    best: int
    auto: bool
    reason: str
    in_flight: int = 0
    served: int = 0
    error: str | None = None
    models: list[str] | None = None


class ErrorDetail(_Wire):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Wire):
    """OpenAI's HTTP error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class ListPage(_Wire):
    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def new_id(kind: str, *, sep: str = "-", length: int = 24) -> str:
    """A fresh id in OpenAI's style: ``file-…``, ``batch-…``, ``chatcmpl-…``; request ids use ``sep="_"`` and 32
    hex digits (``batch_req_…``)."""
    return f"{kind}{sep}{os.urandom((length + 1) // 2).hex()[:length]}"  # a third of uuid4's cost


def output_text(response: dict[str, Any]) -> str:
    """The text of a Responses body's ``output_text`` parts (what the SDK's ``Response.output_text`` joins)."""
    return "".join(part.get("text") or "" for item in response.get("output") or [] if item.get("type") == "message"
                   for part in item.get("content") or [] if part.get("type") == "output_text")


def response_content(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(text, finish_reason) of a chat, completion or Responses body; a chat answer that only calls tools gives the
    calls as JSON; a response cut at ``max_output_tokens`` finished for "length". (None, None) for bodies without
    choices (embeddings)."""
    if body.get("object") == "response":
        return output_text(body), "length" if body.get("status") == "incomplete" else "stop"
    choices = body.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], dict) else None
    if first is None:
        return None, None
    message = first.get("message")
    if not isinstance(message, dict):
        return first.get("text"), first.get("finish_reason")
    content = message.get("content")
    if not content and message.get("tool_calls"):
        content = orjson.dumps(message["tool_calls"]).decode()
    return content, first.get("finish_reason")
