"""What keeps one slow or hostile client from holding the server: time limits on every phase of a request, a cap
on open connections, and a nesting limit on JSON bodies.

- **Request line and headers** (``header_timeout``): uvicorn's h11 protocol has no such limit (its keep-alive timer
  starts only after a response, and any byte received cancels it), so an idle socket or headers sent a line every
  few seconds would stay open for ever. ``HeaderTimeoutProtocol`` closes the connection when the head of a request
  has not arrived in time (answering 408 if part of it had).
- **Body** (``body_idle_timeout`` between chunks, ``upload_timeout`` for all of it): enforced where the app reads
  the body, by ``body_timeouts`` wrapping ASGI ``receive``; the answer is 408 with ``Connection: close``.
- **Connections** (``max_connections``): uvicorn's ``limit_concurrency`` answers 503 beyond it; header size is
  h11's ``max_incomplete_event_size``; idle kept-alive connections close after ``keep_alive_timeout``.
- **JSON nesting** (``max_json_depth``): every JSON body is measured on its bytes before Litestar's decoder
  recurses into it (a 100,000-deep body would otherwise end in a RecursionError, a 500).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import h11
import orjson
from litestar import Request
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from obatch import errors
from obatch.config import Settings
from obatch.jsonl import bracket_steps, max_depth

access = logging.getLogger("obatch.server.access")
DEPTH_CHUNK = 1 << 18  # brackets measured between two turns of the event loop
_HEAD_LATE = b"The request headers did not arrive in time.\n"
_TIMED_OUT_HEAD = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                   b"content-length: " + str(len(_HEAD_LATE)).encode() + b"\r\n\r\n" + _HEAD_LATE)


class RequestTimeout(HTTPException):
    """The client stopped sending the request body (or sends it too slowly); the connection is closed after
    the answer, so the rest of the body is not waited for."""

    status_code = 408


def body_timeouts(idle: float, total: float) -> Callable[[ASGIApp], ASGIApp]:
    """Middleware factory: while the request body is incomplete, each ``receive`` must return within ``idle``
    seconds and the whole body within ``total`` seconds of the request's start. After the body (and for the
    ``receive`` a streamed response uses to notice a disconnect) nothing is timed."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            deadline = time.monotonic() + total
            complete = False

            async def timed_receive() -> ReceiveMessage:
                nonlocal complete
                if complete:
                    return await receive()
                left = deadline - time.monotonic()
                limit, what = (idle, f"sent nothing for {idle:g} s") if idle < left else (
                    max(left, 0.0), f"did not finish sending the body within {total:g} s")
                try:
                    async with asyncio.timeout(limit):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeout(detail=f"The client {what}.", headers={"connection": "close"}) from None
                complete = message["type"] != "http.request" or not message.get("more_body", False)
                return message

            await app(scope, timed_receive, send)

        return handle

    return middleware


def json_guard(limit: int) -> Callable[[Request[Any, Any, Any]], Any]:
    """A ``before_request`` hook: a JSON body nested deeper than ``limit`` is refused (400) before Litestar's
    decoder recurses into it. orjson (C, no recursion, stops at 1024 levels) parses it first, so a 100,000-deep
    body costs microseconds; within 1024 levels the depth is measured on the bytes, a chunk at a time with the
    event loop free between chunks. The body read here is cached by Litestar for the handler; uploads (multipart)
    are not read."""

    async def guard(request: Request[Any, Any, Any]) -> None:
        if request.method not in ("POST", "PUT", "PATCH"):
            return
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            return
        body = await request.body()
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if "depth" in str(exc):
                raise _too_deep(limit) from None
            return  # not JSON: the decoder answers 400 itself
        steps, depth = bracket_steps(body, limit), 0
        for start in range(0, len(steps), DEPTH_CHUNK):
            top, depth = max_depth(steps[start:start + DEPTH_CHUNK], depth)
            if top > limit:
                raise _too_deep(limit)
            await asyncio.sleep(0)

    return guard


def _too_deep(limit: int) -> errors.ConfigError:
    return errors.ConfigError(f"The JSON body nests deeper than {limit} levels.", code="json_too_deep")


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers (``header_timeout``, set on a
    subclass by ``server_options``): armed when the connection opens and again when it waits for the next request;
    bytes arriving do not extend it."""

    header_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head(self) -> None:
        self._cancel_head()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head()
        super().connection_lost(exc)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request head came: say why it is cut off
            self.transport.write(_TIMED_OUT_HEAD)
            access.info("request", extra={"request_id": None, "method": None, "path": None, "route": "unmatched",
                                          "status": 408, "duration_ms": self.header_timeout * 1000, "owner": None})
        self.transport.close()


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings that bound connections: pass them to ``uvicorn.Config``."""
    protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout})
    return {"http": protocol, "timeout_keep_alive": settings.keep_alive_timeout,
            "limit_concurrency": settings.max_connections, "h11_max_incomplete_event_size": settings.max_header_bytes}
