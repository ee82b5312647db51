"""Request ids, structured JSON logs and request metrics: the outermost middleware of every route.

Each request gets an id (the caller's ``X-Request-ID`` when it is a sane token, else a new one), echoed in the
``x-request-id`` response header (the OpenAI SDK exposes it as ``_request_id``) and written on every log line
about the request. Logged: method, path (no query string), route, status, duration, owner id. Never logged:
headers, bodies, keys. Responses Litestar gives before any route's middleware runs (404 unknown path, 405 wrong
method) are logged by ``log_unrouted`` so that scans show in the log too.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from obatch.protocol import new_id
from obatch.server.errors import send_error
from obatch.server.metrics import Metrics

access = logging.getLogger("obatch.server.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                                   "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                                "msg": record.getMessage()}
        data.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for obatch, uvicorn and everything else (called by ``obatch serve``, not on import)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("httpx", "httpcore", "aiosqlite", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def request_id_of(scope: Scope) -> str | None:
    return cast(dict[str, Any], scope).get("obatch_request_id")


def log_unrouted(metrics: Metrics) -> Callable[[Message, Scope], Any]:
    """A ``before_send`` hook: a response that started without ``request_middleware`` (no route matched) gets a
    request id, a metrics count and an access-log line like every other."""

    async def hook(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start" or request_id_of(scope) is not None:
            return
        request_id = new_id("req", sep="_", length=32)
        cast(dict[str, Any], scope)["obatch_request_id"] = request_id
        message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
        method, status = str(scope.get("method", "")), int(message["status"])
        metrics.requests.labels(method, "unmatched", str(status)).inc()
        access.info("request", extra={"request_id": request_id, "method": method, "path": scope.get("path"),
                                      "route": "unmatched", "status": status, "duration_ms": None, "owner": None})

    return hook


def request_middleware(metrics: Metrics) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware factory Litestar wraps around every route (listed first: outermost)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
            request_id = given if _SANE_ID.match(given) else new_id("req", sep="_", length=32)
            cast(dict[str, Any], scope)["obatch_request_id"] = request_id
            started = time.perf_counter()
            status = 0

            async def send_with_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            except Exception as exc:
                if status:  # the response had started: nothing more can be said to the client
                    raise
                status = await send_error(scope, send_with_id, exc, request_id)
            finally:
                elapsed = time.perf_counter() - started
                route = str(cast(dict[str, Any], scope).get("path_template") or "unmatched")
                method = str(scope.get("method", ""))
                metrics.requests.labels(method, route, str(status or 499)).inc()
                metrics.request_seconds.labels(method, route).observe(elapsed)
                access.info("request", extra={
                    "request_id": request_id, "method": method, "path": scope.get("path"), "route": route,
                    "status": status or 499, "duration_ms": round(elapsed * 1000, 1),
                    "owner": cast(dict[str, Any], scope).get("user"),
                })

        return handle

    return middleware
