"""obatch's one exception tree.

Every third-party error (httpx, aiohttp, SQLAlchemy, an engine's HTTP answer) is translated into one of these
exactly once, at the boundary where it happens (backends translate engine faults, the store translates database
faults). Everything above that boundary reasons only about this tree:

    ObatchError
    ├── ConfigError               bad settings or arguments; fix and run again
    │   ├── MissingExtraError     a feature whose optional dependencies are not installed (names the extra)
    │   └── EngineUnavailable     the embedded engine's model file is not installed
    ├── InputFileError            a batch input file is refused as a whole (lists every problem with its line)
    ├── NotFoundError             an id (file, batch, model) that does not exist for this caller
    ├── ConflictError             an operation that the object's state forbids (cancel a completed batch)
    └── BackendError              one request failed at the engine
        ├── TransientError        worth retrying with backoff: 503 busy, 5xx, connection faults, timeouts
        │   ├── ServerBusyError   the engine's queue is full (Ollama's 503); back-pressure
        │   └── BackendTimeout    no answer within the per-request timeout
        └── PermanentError        retrying cannot help: 4xx, unknown model, context too long
            ├── ModelNotFoundError
            ├── ContextLengthError
            └── EngineStartError  the embedded llama.cpp engine refused to start

Each error carries an OpenAI-style ``code`` (``"server_error"``, ``"model_not_found"``,
``"context_length_exceeded"`` ...) so that a failed line or an HTTP answer can be written in OpenAI's error shape
without another mapping.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson


class ObatchError(Exception):
    """Base of every error obatch raises on purpose."""

    code: str = "error"
    status_code: int = 500

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param


class ConfigError(ObatchError):
    code = "invalid_config"
    status_code = 400


class MissingExtraError(ConfigError):
    """An optional feature was used without its extra installed; the message says what to install."""

    code = "missing_extra"

    def __init__(self, extra: str, missing: list[str], feature: str) -> None:
        super().__init__(f"{feature} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                         f"pip install 'obatch[{extra}]'")
        self.extra = extra
        self.missing = missing


class EngineUnavailable(ConfigError):
    """The embedded engine cannot run here: its model file is not installed."""

    code = "engine_unavailable"


class InputFileError(ObatchError):
    """A batch input file that cannot run. ``problems`` holds one (line, code, message) per defect found."""

    code = "invalid_file"
    status_code = 400

    def __init__(self, message: str, problems: list[LineProblem]) -> None:
        super().__init__(message)
        self.problems = problems


class LineProblem:
    """One defect of an input file, at a 1-based line number (None for whole-file problems)."""

    __slots__ = ("code", "line", "message", "param")

    def __init__(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        self.line = line
        self.code = code
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"LineProblem(line={self.line}, code={self.code!r}, message={self.message!r})"

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


def problems_json(problems: Iterable[LineProblem]) -> str:
    """A failed batch's stored problems (``BatchRow.errors_json``), as OpenAI's ``errors.data`` items."""
    return orjson.dumps([p.as_dict() for p in problems]).decode()


def problems_from_json(text: str | None) -> list[LineProblem]:
    """The problems ``problems_json`` stored."""
    return [LineProblem(item.get("line"), item.get("code") or "error", item.get("message") or "", item.get("param"))
            for item in orjson.loads(text or "[]")]


class NotFoundError(ObatchError):
    code = "not_found"
    status_code = 404


class ConflictError(ObatchError):
    code = "conflict"
    status_code = 409


class BackendError(ObatchError):
    """One request failed at the engine. ``status`` is the engine's HTTP status when it answered."""

    code = "server_error"
    status_code = 502

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, code=code, param=param)
        self.status = status
        self.host: str | None = None  # the engine host that failed it, when one was reached (set by the runner)


class TransientError(BackendError):
    """Retrying later may succeed."""


class ServerBusyError(TransientError):
    code = "server_busy"
    status_code = 503


class BackendTimeout(TransientError):
    code = "timeout"
    status_code = 504


class PermanentError(BackendError):
    """Retrying cannot help; the line fails now."""

    code = "invalid_request"
    status_code = 400


class ModelNotFoundError(PermanentError):
    code = "model_not_found"
    status_code = 404


class ContextLengthError(PermanentError):
    code = "context_length_exceeded"
    status_code = 400


class EngineStartError(PermanentError):
    """llama.cpp refused to start (unreadable model file, impossible parameters, the child process died). Not
    retried: each retry would reload the model and fail the same way."""

    code = "engine_start_failed"
    status_code = 502


def from_status(status: int, message: str) -> BackendError:
    """Classify an engine's HTTP error answer: the single place where status codes become retry decisions."""
    if status == 503 or status == 429:
        return ServerBusyError(message, status=status)
    if status == 408:
        return BackendTimeout(message, status=status)
    if status >= 500:
        return TransientError(message, status=status)
    if status == 404:
        return ModelNotFoundError(message, status=status)
    lowered = message.lower()
    if "context" in lowered and ("length" in lowered or "exceed" in lowered or "too long" in lowered):
        return ContextLengthError(message, status=status)
    return PermanentError(message, status=status)
