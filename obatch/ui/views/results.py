"""A finished batch's output and error files as one filterable table."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import polars as pl

RESULT_SCHEMA = {
    "custom_id": pl.Utf8, "status": pl.Utf8, "status_code": pl.Int64, "finish_reason": pl.Utf8,
    "content": pl.Utf8, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64, "latency_ms": pl.Float64,
    "error_code": pl.Utf8, "error_message": pl.Utf8,
}
_LATENCY_KEYS = ("latency_ms", "duration_ms", "total_ms")


def _latency(line: Mapping[str, Any], response: Mapping[str, Any], body: Mapping[str, Any]) -> float | None:
    """obatch may add a latency to an output line (top level, response or an ``obatch``/``timings`` object)."""
    for holder in (line, response, body, line.get("obatch") or {}, response.get("obatch") or {},
                   body.get("obatch") or {}, body.get("timings") or {}):
        if isinstance(holder, Mapping):
            for key in _LATENCY_KEYS:
                value = holder.get(key)
                if isinstance(value, int | float):
                    return float(value)
    return None


def _result_row(line: Mapping[str, Any]) -> dict[str, Any]:
    response = line.get("response") or {}
    body = response.get("body") or {} if isinstance(response, Mapping) else {}
    error = line.get("error") or (body.get("error") if isinstance(body.get("error"), Mapping) else None) or {}
    status_code = response.get("status_code") if isinstance(response, Mapping) else None
    ok = bool(response) and not line.get("error") and isinstance(status_code, int) and status_code < 400
    choices = body.get("choices") or []
    first = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    message = first.get("message") or {}
    content = message.get("content") if isinstance(message, Mapping) else None
    if content is None:
        content = first.get("text")
    if content is None and body.get("data"):  # embeddings: show the vector size
        vector = body["data"][0].get("embedding") if isinstance(body["data"][0], Mapping) else None
        content = f"[embedding of {len(vector)} values]" if isinstance(vector, list) else None
    usage = body.get("usage") or {}
    return {
        "custom_id": line.get("custom_id"), "status": "succeeded" if ok else "failed",
        "status_code": status_code, "finish_reason": first.get("finish_reason"), "content": content,
        "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
        "latency_ms": _latency(line, response, body),
        "error_code": error.get("code") if isinstance(error, Mapping) else None,
        "error_message": error.get("message") if isinstance(error, Mapping) else None,
    }


def _jsonl(data: bytes | None) -> Iterable[Mapping[str, Any]]:
    for raw in io.BytesIO(data or b""):
        raw = raw.strip()
        if raw:
            value = orjson.loads(raw)
            if isinstance(value, Mapping):
                yield value


def results_frame(output: bytes | None, errors: bytes | None = None) -> pl.DataFrame:
    """Output and error files → one row per request (matched on ``custom_id``, sorted by it)."""
    rows = [_result_row(line) for data in (output, errors) for line in _jsonl(data)]
    return pl.DataFrame(rows, schema=RESULT_SCHEMA).sort("custom_id")


def filter_results(frame: pl.DataFrame, *, statuses: Sequence[str] | None = None,
                   finish_reasons: Sequence[str] | None = None,
                   latency_ms: tuple[float, float] | None = None) -> pl.DataFrame:
    """Rows matching every given filter (an empty or None filter keeps everything)."""
    if statuses:
        frame = frame.filter(pl.col("status").is_in(list(statuses)))
    if finish_reasons:
        frame = frame.filter(pl.col("finish_reason").is_in(list(finish_reasons)))
    if latency_ms is not None:
        low, high = latency_ms
        frame = frame.filter(pl.col("latency_ms").is_between(low, high))
    return frame
