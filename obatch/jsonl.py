"""Streaming parse and validation of OpenAI Batch input files.

A file is read line by line as bytes (never whole): UTF-8 with or without a BOM, LF or CRLF, blank lines skipped.
Each line yields either a ``Request`` or a ``LineProblem`` carrying its 1-based line number, so a caller can refuse
a file with every defect listed (``validate_file``) or import the good lines as it goes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from obatch.errors import InputFileError, LineProblem
from obatch.protocol import ENDPOINTS, RequestLine

BOM = b"\xef\xbb\xbf"
MAX_PROBLEMS = 1000

# The field each endpoint cannot run without (OpenAI's own required body fields).
_REQUIRED_BODY_FIELD = {
    "/v1/chat/completions": "messages",
    "/v1/embeddings": "input",
    "/v1/completions": "prompt",
}


@dataclass(slots=True)
class Request:
    """One valid input line. ``body["model"]`` is always set (the override, when one was given)."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body["model"])


@dataclass(slots=True)
class Limits:
    max_bytes: int = 200 * 1024 * 1024
    max_lines: int = 50_000


def check_line(
    line_no: int, obj: Any, *, endpoint: str | None = None, model: str | None = None
) -> Request | LineProblem:
    """Validate one decoded JSON value as a batch request line (``protocol.RequestLine``, checked field by field so
    that each problem gets OpenAI's code and the field it concerns). ``model`` overrides ``body.model``."""
    if not isinstance(obj, dict):
        return LineProblem(line_no, "invalid_json_line", "Each line must be a JSON object.")
    unknown = set(obj) - RequestLine.model_fields.keys()
    if unknown:
        return LineProblem(line_no, "invalid_request", f"Unknown field(s): {', '.join(sorted(unknown))}.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineProblem(line_no, "missing_required_parameter", "custom_id must be a non-empty string.",
                           "custom_id")
    if obj.get("method") != "POST":
        return LineProblem(line_no, "invalid_method", f"method must be 'POST', got {obj.get('method')!r}.",
                           "method")
    url = obj.get("url")
    if url not in ENDPOINTS:
        return LineProblem(line_no, "invalid_url",
                           f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}.", "url")
    if endpoint is not None and url != endpoint:
        return LineProblem(line_no, "mismatched_endpoint",
                           f"url {url!r} does not match the batch endpoint {endpoint!r}.", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineProblem(line_no, "invalid_body", "body must be a JSON object.", "body")
    if model is not None:
        body["model"] = model
    if not isinstance(body.get("model"), str) or not body["model"]:
        return LineProblem(line_no, "missing_required_parameter", "body.model must be a non-empty string.",
                           "body.model")
    required = _REQUIRED_BODY_FIELD[url]
    if body.get(required) in (None, "", []):
        return LineProblem(line_no, "missing_required_parameter",
                           f"body.{required} is required for {url}.", f"body.{required}")
    if url == "/v1/chat/completions" and not isinstance(body["messages"], list):
        return LineProblem(line_no, "invalid_body", "body.messages must be a list.", "body.messages")
    return Request(line_no, custom_id, url, body)


def iter_file(
    stream: Iterable[bytes], *, limits: Limits | None = None, endpoint: str | None = None, model: str | None = None
) -> Iterator[Request | LineProblem]:
    """Yield each line of a batch file as a ``Request`` or a ``LineProblem``; stops after a size/line limit."""
    limits = limits or Limits()
    seen: set[str] = set()
    size = 0
    count = 0
    for line_no, raw in enumerate(stream, start=1):
        size += len(raw)
        if size > limits.max_bytes:
            yield LineProblem(None, "file_too_large", f"The file exceeds the limit of {limits.max_bytes} bytes.")
            return
        if line_no == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        raw = raw.strip()
        if not raw:
            continue
        count += 1
        if count > limits.max_lines:
            yield LineProblem(line_no, "too_many_lines", f"The file has more than {limits.max_lines} requests.")
            return
        try:
            raw.decode("utf-8")
            obj = orjson.loads(raw)
        except UnicodeDecodeError:
            yield LineProblem(line_no, "invalid_encoding", "The line is not valid UTF-8.")
            continue
        except orjson.JSONDecodeError as exc:
            yield LineProblem(line_no, "invalid_json_line", f"The line is not valid JSON: {exc}.")
            continue
        item = check_line(line_no, obj, endpoint=endpoint, model=model)
        if isinstance(item, Request):
            if item.custom_id in seen:
                yield LineProblem(line_no, "duplicate_custom_id",
                                  f"custom_id {item.custom_id!r} appears more than once.", "custom_id")
                continue
            seen.add(item.custom_id)
        yield item
    if count == 0:
        yield LineProblem(None, "empty_file", "The file contains no requests.")


def validate_file(
    path: Path, *, limits: Limits | None = None, endpoint: str | None = None, model: str | None = None
) -> tuple[int, str]:
    """Check a whole file without keeping it; return (request count, sha256) or raise ``InputFileError``.

    Blocking: call it from a worker thread in async code.
    """
    problems: list[LineProblem] = []
    count = 0
    digest = hashlib.sha256()
    with path.open("rb") as raw:
        for item in iter_file(_hashed(raw, digest), limits=limits, endpoint=endpoint, model=model):
            if isinstance(item, LineProblem):
                if len(problems) < MAX_PROBLEMS:
                    problems.append(item)
            else:
                count += 1
    if problems:
        raise InputFileError(summarise(problems, path.name), problems)
    return count, digest.hexdigest()


def summarise(problems: list[LineProblem], name: str) -> str:
    head = "; ".join(
        f"line {p.line}: {p.message}" if p.line is not None else p.message for p in problems[:5]
    )
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return f"{name} is not a valid batch file: {head}{more}"


def _hashed(lines: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    for line in lines:
        digest.update(line)
        yield line
