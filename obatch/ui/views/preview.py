"""Validation preview of an input file, before anything is sent: the core's own parser, one row per line."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import orjson
import polars as pl

from obatch import context
from obatch.errors import LineProblem
from obatch.jsonl import Limits, Request, iter_file

PREVIEW_SCHEMA = {
    "line": pl.Int64, "status": pl.Utf8, "custom_id": pl.Utf8, "model": pl.Utf8, "code": pl.Utf8,
    "message": pl.Utf8, "text": pl.Utf8, "prompt_tokens": pl.Int64, "max_tokens": pl.Int64,
}
SNIPPET = 120


@dataclass
class Preview:
    """The local validation of an input file, before anything is sent: one row per non-blank line."""

    lines: pl.DataFrame
    file_problems: list[LineProblem] = field(default_factory=list)
    endpoint: str | None = None
    source: list[bytes] = field(default_factory=list, repr=False)  # the file's raw lines, for ``valid_bytes``

    @property
    def n_requests(self) -> int:
        return int((self.lines["status"] == "ok").sum())

    @property
    def problems(self) -> pl.DataFrame:
        """Bad lines (and whole-file problems, with a null line) with their messages."""
        bad = self.lines.filter(pl.col("status") == "error").select("line", "code", "message", "text")
        whole = pl.DataFrame([{"line": None, "code": p.code, "message": p.message, "text": None}
                              for p in self.file_problems], schema=bad.schema)
        return pl.concat([whole, bad])

    @property
    def n_problems(self) -> int:
        return self.problems.height

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and self.n_requests > 0

    @property
    def models(self) -> list[str]:
        return sorted(m for m in self.lines.filter(pl.col("status") == "ok")["model"].unique().to_list() if m)

    def valid_bytes(self) -> bytes:
        """Only the lines that passed (a duplicate's first occurrence included), as a file to submit or keep."""
        good = self.lines.filter(pl.col("status") == "ok")["line"].to_list()
        return b"".join(self.source[n - 1].rstrip(b"\r\n") + b"\n" for n in good)

    def mean_tokens(self) -> tuple[int | None, int | None]:
        """Mean prompt-token estimate and mean requested output tokens of the valid lines (for the estimate)."""
        good = self.lines.filter(pl.col("status") == "ok")
        if good.is_empty():
            return None, None
        prompt = good["prompt_tokens"].mean()
        output = good["max_tokens"].mean()
        return (round(prompt) if isinstance(prompt, int | float) else None,
                round(output) if isinstance(output, int | float) else None)


def _snippet(value: str) -> str:
    value = " ".join(value.split())
    return value if len(value) <= SNIPPET else value[: SNIPPET - 1] + "…"


def _request_text(request: Request) -> str:
    body = request.body
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        content = last.get("content") if isinstance(last, dict) else last
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return _snippet(str(content))
    for key in ("prompt", "input"):
        if key in body:
            return _snippet(str(body[key]))
    return ""


def preview_file(data: bytes, *, model: str | None = None, endpoint: str | None = None,
                 limits: Limits | None = None) -> Preview:
    """Validate an uploaded file with the core's own parser, line by line, as the server will.

    ``model`` is the override the user picked (lines without ``body.model`` then pass). Without ``endpoint`` the
    batch endpoint is the first valid line's ``url`` (as the server decides), and lines that disagree are flagged.
    """
    raw_lines = list(io.BytesIO(data))
    items = list(iter_file(raw_lines, limits=limits, model=model, endpoint=endpoint))
    if endpoint is None:
        urls = [i.url for i in items if isinstance(i, Request)]
        if urls and len(set(urls)) > 1:
            endpoint = urls[0]
            items = list(iter_file(raw_lines, limits=limits, model=model, endpoint=endpoint))
        elif urls:
            endpoint = urls[0]
    rows: list[dict[str, Any]] = []
    file_problems: list[LineProblem] = []
    for item in items:
        if isinstance(item, Request):
            rows.append({"line": item.line, "status": "ok", "custom_id": item.custom_id, "model": item.model,
                         "code": None, "message": None, "text": _request_text(item),
                         "prompt_tokens": context.estimate_prompt_tokens(item.url, item.body),
                         "max_tokens": context.output_budget(item.body)})
        elif item.line is None:
            file_problems.append(item)
        else:
            raw = raw_lines[item.line - 1] if 0 < item.line <= len(raw_lines) else b""
            rows.append({"line": item.line, "status": "error", "custom_id": _custom_id_of(raw), "model": None,
                         "code": item.code, "message": item.message,
                         "text": _snippet(raw.decode("utf-8", "replace")), "prompt_tokens": None,
                         "max_tokens": None})
    frame = pl.DataFrame(rows, schema=PREVIEW_SCHEMA).sort("line")
    return Preview(frame, file_problems, endpoint, raw_lines)


def _custom_id_of(raw: bytes) -> str | None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("custom_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def highlight_errors(frame: pl.DataFrame) -> Any:
    """A pandas Styler painting bad lines red (what ``st.dataframe`` shows as highlighted rows)."""
    pdf = frame.to_pandas()
    for name, dtype in frame.schema.items():  # pandas turns an integer column with gaps into floats ("49.000000")
        if dtype.is_integer():
            pdf[name] = pdf[name].astype("Int64")

    def paint(row: Any) -> list[str]:
        colour = "background-color: #fde2e1; color: #8a1c1c" if row["status"] == "error" else ""
        return [colour] * len(row)

    return pdf.style.apply(paint, axis=1)
