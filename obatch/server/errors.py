"""Every error the server answers, in OpenAI's shape, decided in this one module.

obatch's own errors (``obatch.errors``) carry their status, code and param; Litestar's (validation, unknown route,
wrong method, body too large, missing key, rate limit) are mapped here too, so a client only ever sees
``{"error": {"message", "type", "param", "code"}}`` with the proper status. Anything unexpected is a 500 whose
details go to the log (with the request id), never to the client.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import orjson
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.types import Scope, Send

from obatch import errors
from obatch.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("obatch.server")

_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "requests"}


def _type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    problems = [e for e in extra if isinstance(e, dict)]
    if not problems:
        return str(exc.detail or "Invalid request."), None
    param = problems[0].get("key")
    text = "; ".join(f"{p.get('key')}: {p.get('message')}" if p.get("key") else str(p.get("message"))
                     for p in problems[:5])
    return f"Invalid request: {text}", str(param) if param else None


def describe(exc: BaseException, method: str = "", path: str = "") -> tuple[int, ErrorResponse, dict[str, str]]:
    """(status, body, headers) for any exception a request can end with."""
    headers: dict[str, str] = {}
    param: str | None = None
    if isinstance(exc, errors.InputFileError):
        too_large = any(p.code == "file_too_large" for p in exc.problems)
        status, code, message = (413, "file_too_large", exc.message) if too_large else (400, exc.code, exc.message)
    elif isinstance(exc, errors.ObatchError):
        status, code, message, param = exc.status_code, exc.code, exc.message, exc.param
        if code == errors.ConfigError.code:  # a bad argument, in an HTTP API's words
            code = "invalid_value"
    elif isinstance(exc, ValidationException):
        status, code = 400, "invalid_request"
        message, param = _validation_message(exc)
    elif isinstance(exc, NotAuthorizedException):
        status, code, message = 401, "invalid_api_key", str(exc.detail)
        headers["www-authenticate"] = "Bearer"
    elif isinstance(exc, TooManyRequestsException):
        status, code = 429, "rate_limit_exceeded"
        reset = (exc.headers or {}).get("RateLimit-Reset", "1")
        headers.update(exc.headers or {})
        headers["retry-after"] = str(max(int(reset) if str(reset).isdigit() else 1, 1))
        message = ("Rate limit reached for this API key or client address; retry after the time in the Retry-After "
                   "header.")
    elif isinstance(exc, NotFoundException):
        status, code, message = 404, "unknown_url", f"Invalid URL ({method} {path})."
    elif isinstance(exc, MethodNotAllowedException):
        status, code, message = 405, "method_not_allowed", f"Method {method} is not allowed for {path}."
        headers.update(exc.headers or {})
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        code = {413: "request_too_large", 408: "request_timeout"}.get(
            status, "invalid_request" if status < 500 else "server_error")
        message = str(exc.detail) if status < 500 else "The server failed to process the request."
        if status == 408:
            headers.update(exc.headers or {})  # Connection: close: the rest of the body is not waited for
    else:
        status, code, message = 500, "server_error", "The server failed to process the request."
    if status == 409:
        headers["x-should-retry"] = "false"  # a state conflict does not go away by retrying
    body = ErrorResponse(error=ErrorDetail(message=message, type=_type(status), param=param, code=code))
    return status, body, headers


def _log(exc: BaseException, status: int, request_id: str | None) -> None:
    if status >= 500:
        log.error("request failed", exc_info=exc, extra={"request_id": request_id, "status": status})


def exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The app's one exception handler (registered for ``Exception``)."""
    status, body, headers = describe(exc, request.method, request.url.path)
    _log(exc, status, cast(dict[str, Any], request.scope).get("obatch_request_id"))
    return Response(content=body.model_dump(mode="json"), status_code=status, headers=headers,
                    media_type="application/json")


async def send_error(scope: Scope, send: Send, exc: BaseException, request_id: str | None) -> int:
    """Answer an exception raised by middleware (auth, rate limit) with raw ASGI messages; returns the status."""
    status, body, headers = describe(exc, str(scope.get("method", "")), str(scope.get("path", "")))
    _log(exc, status, request_id)
    payload = orjson.dumps(body.model_dump(mode="json"))
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
    return status
