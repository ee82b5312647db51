"""Structured answers checked: a line that asks for JSON gets JSON, or an ``invalid_output`` error line.

A request asks for JSON by ``response_format`` (chat and completions: ``json_object``, or ``json_schema`` with
``json_schema.schema``), by ``text.format`` (responses: ``json_object``, or ``json_schema`` with ``schema``) or by
Ollama's own ``format`` (``"json"``, or a schema). ``expectation`` reads what a body asks for (None when it asks for
nothing, and then nothing is checked); ``problem`` judges an answer against it with the ``jsonschema`` library.
The runner (``obatch.runner.call_with_retries``) asks again, up to the batch's ``output_retries`` times, when an
answer fails the check, and then fails the line with ``InvalidOutput`` (code ``invalid_output``), keeping the answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from obatch import errors
from obatch.protocol import response_content

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

    from obatch.backends.base import Result


class InvalidOutput(errors.PermanentError):
    """An answer that is not the JSON its request asked for, after every retry the batch allows. ``answer`` is the
    last answer the engine gave (the error line keeps it); ``refused`` how many answers failed the check."""

    code = "invalid_output"

    def __init__(self, message: str, answer: Result, refused: int) -> None:
        super().__init__(message, status=answer.status_code)  # the engine answered: its status is kept
        self.answer = answer
        self.refused = refused


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a request asks its answer to be: any JSON (``schema`` None), or JSON that the ``validator`` accepts."""

    kind: str  # "json_object" | "json_schema"
    validator: Validator | None = None


def expectation(url: str, body: dict[str, Any]) -> Expectation | None:
    """What ``body`` asks its answer to be, or None when it asks for no JSON (such a line is never checked).
    Raises ``PermanentError`` for a schema that is not a JSON Schema (the line cannot be judged)."""
    if url == "/v1/embeddings":
        return None
    fmt = body.get("response_format")
    if url == "/v1/responses":
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        schema = fmt.get("schema") if isinstance(fmt, dict) else None
    else:
        inner = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = inner.get("schema") if isinstance(inner, dict) else None
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            return Expectation("json_object")
        if fmt.get("type") == "json_schema":
            return _schema(schema) if isinstance(schema, dict) else Expectation("json_object")
        return None
    native = body.get("format")  # Ollama's own field: "json" or a schema
    if native == "json":
        return Expectation("json_object")
    if isinstance(native, dict):
        return _schema(native)
    return None


def _schema(schema: dict[str, Any]) -> Expectation:
    try:
        return Expectation("json_schema", _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)))
    except errors.PermanentError:
        raise
    except Exception as exc:  # jsonschema's SchemaError (or a schema its draft cannot read)
        message = getattr(exc, "message", str(exc))
        raise errors.PermanentError(f"The response format's schema is not a valid JSON Schema: {message}",
                                    param="response_format") from exc


@functools.lru_cache(maxsize=256)
def _validator(schema_json: bytes) -> Validator:
    """One validator per distinct schema (the lines of a batch mostly share theirs): checked once, then reused."""
    from jsonschema.validators import validator_for

    schema = orjson.loads(schema_json)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def problem(expect: Expectation, body: dict[str, Any]) -> str | None:
    """Why the answer ``body`` is not what ``expect`` asks for, in a sentence; None when it is."""
    text, _ = response_content(body)
    if text is None:
        return None  # not a text answer (the endpoint has none): nothing to judge
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"The answer is not valid JSON ({exc})."
    if expect.validator is None:
        return None
    from jsonschema.exceptions import best_match

    found = best_match(expect.validator.iter_errors(value))
    if found is None:
        return None
    where = "/".join(str(p) for p in found.absolute_path)
    return f"The answer does not match the schema{f' at {where}' if where else ''}: {found.message}"


def invalid(message: str, answer: Result, refused: int, attempts: int) -> InvalidOutput:
    """The error a line ends with when its last allowed answer failed the check."""
    return InvalidOutput(f"{message} ({refused} answer{'s' if refused != 1 else ''} refused, {attempts} attempts)",
                         answer, refused)
