"""Streaming parse and validation of OpenAI Batch input files.

A file is read line by line as bytes (never whole): UTF-8 with or without a BOM, LF or CRLF, blank lines skipped.
Each line yields either a ``Request`` or a ``LineProblem`` carrying its 1-based line number, so a caller can refuse
a file with every defect listed (``validate_file``) or import the good lines as it goes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import operator
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from obatch.errors import InputFileError, LineProblem
from obatch.protocol import REQUIRED_BODY_FIELD, UNSERVABLE_ENDPOINTS, RequestLine, endpoint_problem

if TYPE_CHECKING:
    from obatch.config import Settings

BOM = b"\xef\xbb\xbf"
MAX_PROBLEMS = 1000
MAX_JSON_DEPTH = 64  # orjson serialises at most 254 levels: a deeper line would validate and then fail to store
MAX_MODEL_CHARS = 256
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but brackets: deleted by translate



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


def bracket_steps(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bytes:
    """The brackets of a JSON text outside its strings, opening ones as 2 and closing ones as 0 (so after k of
    them the depth is their sum minus k); empty when there are too few for the text to nest deeper than ``limit``.
    Only bytes methods, each at C speed."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return b""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _BRACKETS)
    return brackets.translate(_STEPS) if len(brackets) > 2 * limit else b""


def max_depth(steps: bytes, start: int = 0) -> tuple[int, int]:
    """(deepest level reached, level at the end) over ``bracket_steps`` entered at level ``start``."""
    if not steps:
        return start, start
    top = max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)))
    return start + top, start + sum(steps) - len(steps)


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays/objects deeper than ``limit``, decided on its bytes without recursion and
    in time linear in its size. Meant for valid JSON (parse it first: invalid JSON may be misjudged)."""
    return max_depth(bracket_steps(raw, limit))[0] > limit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class EnginePolicy:
    """What a client of a shared server may ask of the engine everyone uses: which ``options`` keys it may set,
    the largest ``num_ctx`` (a client's 10-million-token context would reload the model for all and exhaust its
    memory) and output budget, and whether it may set ``keep_alive`` (how long the engine keeps a model loaded).
    The operator's own runs (CLI, notebook) are not policed."""

    options: frozenset[str] = frozenset()
    max_num_ctx: int = 0  # 0: clients may not set num_ctx at all
    max_output_tokens: int = 32768
    keep_alive: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> EnginePolicy:
        return cls(options=frozenset(o.strip() for o in settings.client_engine_options.split(",") if o.strip()),
                   max_num_ctx=settings.max_client_num_ctx, max_output_tokens=settings.max_client_output_tokens,
                   keep_alive=settings.allow_client_keep_alive)

    def _num_ctx(self, value: Any, param: str) -> tuple[str, str, str] | None:
        if not self.max_num_ctx:
            return "option_not_allowed", f"{param} cannot be set by clients of this server.", param
        if not _is_int(value) or not 1 <= value <= self.max_num_ctx:
            return ("invalid_value", f"{param} must be an integer from 1 to {self.max_num_ctx} on this server, "
                    f"got {str(value)[:32]}.", param)
        return None

    def _output(self, value: Any, param: str) -> tuple[str, str, str] | None:
        if value is None:
            return None
        if not _is_int(value) or not 1 <= value <= self.max_output_tokens:
            return ("invalid_value", f"{param} must be an integer from 1 to {self.max_output_tokens} on this "
                    f"server, got {str(value)[:32]}.", param)
        return None

    def check(self, body: dict[str, Any]) -> tuple[str, str, str] | None:
        """(code, message, param) of the first thing the body may not ask for, or None."""
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if key in body and (problem := self._output(body[key], f"body.{key}")):
                return problem
        if "num_ctx" in body and (problem := self._num_ctx(body["num_ctx"], "body.num_ctx")):
            return problem
        if "keep_alive" in body and not self.keep_alive:
            return "option_not_allowed", "body.keep_alive cannot be set by clients of this server.", "body.keep_alive"
        options = body.get("options")
        if options is None:
            return None
        if not isinstance(options, dict):
            return "invalid_body", "body.options must be a JSON object.", "body.options"
        for key, value in options.items():
            param = f"body.options.{key}"[:80]
            if key == "num_ctx":
                problem = self._num_ctx(value, param)
            elif key == "num_predict":
                problem = self._output(value, param)
            elif key not in self.options:
                allowed = ", ".join(sorted(self.options)) or "none"
                problem = ("option_not_allowed",
                           f"{param} cannot be set by clients of this server (allowed options: {allowed}).", param)
            else:
                problem = None
            if problem:
                return problem
        return None


@dataclass(slots=True)
class Limits:
    max_bytes: int = 200 * 1024 * 1024
    max_lines: int = 50_000
    max_depth: int = MAX_JSON_DEPTH
    policy: EnginePolicy | None = field(default=None)  # None: any engine option (the operator's own runs)


def model_problem(model: str) -> str | None:
    """Why a model name cannot be right (too long, or holding control characters), or None."""
    if len(model) > MAX_MODEL_CHARS:
        return f"must be at most {MAX_MODEL_CHARS} characters"
    return _control_problem(model)


@functools.lru_cache(maxsize=256)
def _control_problem(model: str) -> str | None:
    """Cached (names of at most ``MAX_MODEL_CHARS``): a batch names few models, on every line."""
    if any(unicodedata.category(c) in _CONTROL for c in model):
        return "must not contain control characters"
    return None


_CONTROL = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


_LINE_FIELDS = frozenset(RequestLine.model_fields)  # read once: pydantic's class attribute costs per access


def check_line(
    line_no: int, obj: Any, *, endpoint: str | None = None, model: str | None = None,
    policy: EnginePolicy | None = None,
) -> Request | LineProblem:
    """Validate one decoded JSON value as a batch request line (``protocol.RequestLine``, checked field by field so
    that each problem gets OpenAI's code and the field it concerns). ``model`` overrides ``body.model``; ``policy``
    refuses engine options a client may not set."""
    if not isinstance(obj, dict):
        return LineProblem(line_no, "invalid_json_line", "Each line must be a JSON object.")
    unknown = obj.keys() - _LINE_FIELDS
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
    problem = endpoint_problem(url)
    if problem is not None:
        code = "unsupported_endpoint" if url in UNSERVABLE_ENDPOINTS else "invalid_url"
        return LineProblem(line_no, code, f"url: {problem}", "url")
    url = str(url)
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
    if why := model_problem(body["model"]):
        return LineProblem(line_no, "invalid_value", f"body.model {why}.", "body.model")
    required = REQUIRED_BODY_FIELD[url]
    if body.get(required) in (None, "", []):
        return LineProblem(line_no, "missing_required_parameter",
                           f"body.{required} is required for {url}.", f"body.{required}")
    if url == "/v1/chat/completions" and not isinstance(body["messages"], list):
        return LineProblem(line_no, "invalid_body", "body.messages must be a list.", "body.messages")
    if policy is not None and (refused := policy.check(body)):
        return LineProblem(line_no, *refused)
    return Request(line_no, custom_id, url, body)


class _Seen:
    """The custom_ids met so far and the line of each. A million of them held as a Python dict take ~100 MB, so past
    ``IN_MEMORY`` ids they move to a private temporary SQLite database on disk (a few MB of cache), keeping a
    big file's validation as flat in memory as the rest of the pipeline."""

    def __init__(self, *, in_memory: int = 100_000, flush: int = 10_000) -> None:
        self._in_memory, self._flush = in_memory, flush
        self._recent: dict[str, int] = {}
        self._db: sqlite3.Connection | None = None

    def first_line(self, custom_id: str, line: int) -> int | None:
        """The line where ``custom_id`` was met before, or None (it is then remembered at ``line``)."""
        if (earlier := self._recent.get(custom_id)) is not None:
            return earlier
        if self._db is not None:
            row = self._db.execute("SELECT line FROM seen WHERE id = ?", (custom_id,)).fetchone()
            if row is not None:
                return int(row[0])
        self._recent[custom_id] = line
        if len(self._recent) >= (self._flush if self._db is not None else self._in_memory):
            self._spill()
        return None

    def _spill(self) -> None:
        if self._db is None:
            # "": a temporary database on disk, deleted when closed; a file's lines may be read by several worker
            # threads one after the other (the import reads chunks through asyncio.to_thread), never at once
            self._db = sqlite3.connect("", check_same_thread=False)
            self._db.execute("CREATE TABLE seen (id TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID")
        self._db.executemany("INSERT INTO seen VALUES (?, ?)", self._recent.items())
        self._recent.clear()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def _too_deep(line_no: int, limits: Limits) -> LineProblem:
    return LineProblem(line_no, "json_too_deep", f"The line nests JSON deeper than {limits.max_depth} levels.")


def iter_file(
    stream: Iterable[bytes], *, limits: Limits | None = None, endpoint: str | None = None, model: str | None = None
) -> Iterator[Request | LineProblem]:
    """Yield each line of a batch file as a ``Request`` or a ``LineProblem``; stops after a size/line limit."""
    seen = _Seen()
    try:
        yield from _iter_file(stream, limits or Limits(), endpoint, model, seen)
    finally:
        seen.close()


def _iter_file(stream: Iterable[bytes], limits: Limits, endpoint: str | None, model: str | None, seen: _Seen
               ) -> Iterator[Request | LineProblem]:
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
            obj = orjson.loads(raw)  # C, with its own depth limit (1024): no recursion risk
        except UnicodeDecodeError:
            yield LineProblem(line_no, "invalid_encoding", "The line is not valid UTF-8.")
            continue
        except orjson.JSONDecodeError as exc:
            yield _too_deep(line_no, limits) if "depth" in str(exc) else LineProblem(
                line_no, "invalid_json_line", f"The line is not valid JSON: {exc}.")
            continue
        if json_depth_exceeds(raw, limits.max_depth):  # exact on valid JSON; orjson cannot store > 254 levels
            yield _too_deep(line_no, limits)
            continue
        item = check_line(line_no, obj, endpoint=endpoint, model=model, policy=limits.policy)
        if isinstance(item, Request) and (first := seen.first_line(item.custom_id, line_no)) is not None:
            yield LineProblem(line_no, "duplicate_custom_id",
                              f"custom_id {item.custom_id!r} appears more than once (first on line {first}).",
                              "custom_id")
            continue
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


def file_sha256(path: Path) -> str:
    """The file's content hash, as ``obatch.batches.store_file`` records it (blocking: use a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
