"""A finished batch's output and error files as one filterable table."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import polars as pl

from obatch.api import result_schema
from obatch.protocol import NOT_RUN_CODES, LineStats, OutputLine, response_content


def _content(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """The notebook API's content column, or an embedding's size (a vector is no use in a table)."""
    content, finish_reason = response_content(body)
    data = body.get("data")
    if content is None and isinstance(data, list) and data and isinstance(data[0], dict):
        vector = data[0].get("embedding")
        content = f"[embedding of {len(vector)} values]" if isinstance(vector, list) else None
    return content, finish_reason


NOT_RUN = {code: status for status, code in NOT_RUN_CODES.items()}  # a line that never ran: the batch's status
STATUSES = ("succeeded", "failed", "cancelled", "expired")
LEAD = ("line", "custom_id", "status", "error_code", "error_message", "finish_reason", "latency_ms",
        "completion_tokens", "prompt_tokens", "content")  # what a reader scans first; long text last
CONTENT_CHARS = 80
PROVENANCE = ("loaded_context", "seed", "refused_answers", "host", "engine", "engine_version", "model_digest")
# the page's table says where a reused answer came from in words (``reused_from``), not as the notebook's struct
UI_COLUMNS: dict[str, Any] = {"cached_from": pl.Utf8}


def frame_schema(origin: bool = False) -> dict[str, Any]:
    """The notebook API's ``RESULT_SCHEMA``, with ``origin`` also ``UI_COLUMNS`` (the page's results table)."""
    return result_schema() | (UI_COLUMNS if origin else {})


def reused_from(stats: LineStats) -> str | None:
    """``q17 of batch-…``: the line whose stored answer this line took (None: answered by the engine)."""
    origin = stats.cached_from
    return f"{origin.custom_id} of {origin.batch_id}" if origin is not None else None


def _status(ok: bool, line: OutputLine) -> str:
    if ok:
        return "succeeded"
    return NOT_RUN.get(line.error.code or "", "failed") if line.error is not None else "failed"


def _result_row(line: OutputLine, origin: bool = False) -> dict[str, Any]:
    response = line.response
    body = response.body if response is not None and isinstance(response.body, dict) else {}
    status_code = response.status_code if response is not None else None
    ok = line.error is None and status_code is not None and status_code < 400
    content, finish_reason = _content(body)
    usage = body.get("usage") or {}
    stats = line.obatch or LineStats()
    return {
        "line": stats.line, "custom_id": line.custom_id, "model": body.get("model"),
        "status": _status(ok, line), "status_code": status_code, "content": content,
        "finish_reason": finish_reason, "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"), "latency_ms": stats.latency_ms,
        "ttft_ms": stats.ttft_ms, "num_ctx": stats.num_ctx, "truncated": stats.truncated,
        "attempts": stats.attempts, "error_code": line.error.code if line.error else None,
        "error_message": line.error.message if line.error else None,
        **{name: getattr(stats, name) for name in PROVENANCE},
        "cached_from": reused_from(stats) if origin else
        stats.cached_from.model_dump() if stats.cached_from is not None else None,
    }


def _lines(data: bytes | None) -> Iterable[OutputLine]:
    for raw in io.BytesIO(data or b""):
        if raw.strip():
            yield OutputLine.model_validate_json(raw)


def results_frame(output: bytes | None, errors: bytes | None = None, *, origin: bool = False,
                  keep_order: bool = False) -> pl.DataFrame:
    """Output and error files → one row per request, in input order (obatch's ``line``; lines without one, as in
    another service's files, after them by ``custom_id``; ``keep_order``: in the order of the lines given), in the
    notebook API's ``RESULT_SCHEMA`` (``origin``: with the page's ``cached_from`` in words instead). A line that is
    not an output line fails loudly (``pydantic.ValidationError``)."""
    rows = [_result_row(line, origin) for data in (output, errors) for line in _lines(data)]
    frame = pl.DataFrame(rows, schema=frame_schema(origin))
    return frame if keep_order else frame.sort(["line", "custom_id"], nulls_last=True)


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


def for_display(frame: pl.DataFrame) -> pl.DataFrame:
    """The results table as shown: status and errors before the answer, the answer cut to ``CONTENT_CHARS``
    (the whole line is shown on demand), so an error is readable without scrolling past long text. Missing values
    stay missing: the page's table (``obatch.ui.tables``) writes them as "—"."""
    lead = [c for c in LEAD if c in frame.columns]
    short = pl.when(pl.col("content").str.len_chars() > CONTENT_CHARS).then(
        pl.col("content").str.slice(0, CONTENT_CHARS - 1) + "…").otherwise(pl.col("content"))
    return frame.select(*lead, *[c for c in frame.columns if c not in lead]).with_columns(content=short)


def latency_bounds(frame: pl.DataFrame) -> tuple[int, int] | None:
    """The latency slider's range in whole milliseconds, rounded outward so every row lies inside it (a slider
    whose bounds are exact floats gets a rounded value back from the browser, below its minimum, and Streamlit
    then silently resets it); None when there is nothing to filter."""
    latency = frame["latency_ms"].drop_nulls()
    if latency.is_empty():
        return None
    low, high = math.floor(float(latency.min())), math.ceil(float(latency.max()))  # type: ignore[arg-type]
    return (low, high) if high > low else None


def row_facts(row: dict[str, Any]) -> str:
    """An opened result row's facts in one line: model, finish reason, tokens, latency (TTFT), context, attempts."""
    facts = [f"model `{row['model']}`" if row.get("model") else "",
             f"finish reason `{row['finish_reason']}`" if row.get("finish_reason") else "",
             f"{row['prompt_tokens']} prompt + {row['completion_tokens']} completion tokens"
             if row.get("prompt_tokens") is not None and row.get("completion_tokens") is not None else "",
             f"latency {row['latency_ms']:.1f} ms" + (f" (first token {row['ttft_ms']:.1f} ms)"
                                                       if row.get("ttft_ms") is not None else "")
             if row.get("latency_ms") is not None else "",
             f"num_ctx {row['num_ctx']}" if row.get("num_ctx") else "",
             "prompt truncated to fit" if row.get("truncated") else "",
             f"{row['attempts']} attempts" if (row.get("attempts") or 0) > 1 else ""]
    return " · ".join(f for f in facts if f)


def request_prompt(data: bytes, custom_id: str) -> str | None:
    """What the input file's line ``custom_id`` asked: each message as ``role: text`` (or its prompt / input)."""
    for raw in io.BytesIO(data):
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(line, dict) or line.get("custom_id") != custom_id or not isinstance(line.get("body"), dict):
            continue
        body = line["body"]
        if isinstance(body.get("messages"), list):
            return "\n\n".join(f"{m.get('role', '?')}: {_text(m.get('content'))}" for m in body["messages"]
                                 if isinstance(m, dict))
        for key in ("prompt", "input"):
            if key in body:
                return _text(body[key])
        return None
    return None


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def line_ranges(lines: Sequence[int]) -> str:
    """``[1, 2, 3, 5, 7, 8]`` → ``1-3,5,7-8``: line numbers in a few characters (a batch's metadata holds them)."""
    runs: list[list[int]] = []
    for n in sorted(lines):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def expand_ranges(text: str) -> list[int]:
    """``1-3,5`` → ``[1, 2, 3, 5]`` (what ``line_ranges`` wrote; anything else → ``[]``)."""
    out: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            first, _, last = part.partition("-")
            out += range(int(first), int(last or first) + 1)
    except ValueError:
        return []
    return out


def in_user_lines(frame: pl.DataFrame, original: Sequence[int]) -> pl.DataFrame:
    """Results of a batch of only a file's valid lines, numbered as the lines of the file the user uploaded
    (``original[k - 1]`` is the uploaded line that became line ``k``); unchanged when the map does not fit."""
    last = frame["line"].drop_nulls().max()
    if not original or (isinstance(last, int) and last > len(original)):
        return frame
    return frame.with_columns(pl.col("line").replace_strict(list(range(1, len(original) + 1)), list(original),
                                                            default=None, return_dtype=pl.Int64))
