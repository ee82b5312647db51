"""What keeps one slow or hostile client from holding the server: time limits on every phase of a request, a cap
on open connections, and a nesting limit on JSON bodies.

- **Request line and headers** (``header_timeout``): uvicorn's h11 protocol has no such limit (its keep-alive timer
  starts only after a response, and any byte received cancels it), so an idle socket or headers sent a line every
  few seconds would stay open for ever. ``HeaderTimeoutProtocol`` closes the connection when the head of a request
  has not arrived in time (answering 408 if part of it had).
- **Body** (``body_idle_timeout`` between chunks, ``upload_timeout`` for all of it, ``min_body_rate`` on average):
  enforced where the app reads the body, by ``body_timeouts`` wrapping ASGI ``receive``; the answer is 408 with
  ``Connection: close``.
- **Connections**: at most ``max_connections_per_address`` from one client address (counted on the socket, before
  anything is read: more are answered 429 and closed; a trusted proxy is not held to it), so one client cannot take
  the ``max_connections`` of all (uvicorn's ``limit_concurrency``: 503 beyond it); past three quarters of that cap,
  connections idle for a second are closed. Header size is h11's ``max_incomplete_event_size``; idle kept-alive
  connections close after ``keep_alive_timeout``. Forwarded headers count only from ``trusted_proxies``.
- **JSON nesting** (``max_json_depth``): every JSON body is measured on its bytes before Litestar's decoder
  recurses into it (a 100,000-deep body would otherwise end in a RecursionError, a 500).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar, cast

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
IDLE_SHED = 1.0  # near the connection cap, connections idle this long are closed
_BUSY = b"Too many open connections from this address.\n"
_TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
             b"retry-after: 1\r\ncontent-length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)
_TIMED_OUT_HEAD = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                   b"content-length: " + str(len(_HEAD_LATE)).encode() + b"\r\n\r\n" + _HEAD_LATE)


class RequestTimeout(HTTPException):
    """The client stopped sending the request body (or sends it too slowly); the connection is closed after
    the answer, so the rest of the body is not waited for."""

    status_code = 408


def body_timeouts(idle: float, total: float, min_rate: float = 0.0) -> Callable[[ASGIApp], ASGIApp]:
    """Middleware factory: while the request body is incomplete, each ``receive`` must return within ``idle``
    seconds, the whole body within ``total`` seconds of the request's start, and after the first ``idle`` seconds
    the body must have come at ``min_rate`` bytes per second on average at least (a byte every few seconds, each
    within ``idle``, would otherwise hold a connection for ``total``). After the body (and for the ``receive`` a
    streamed response uses to notice a disconnect) nothing is timed."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            started = time.monotonic()
            deadline = started + total
            complete = False
            received = 0

            async def timed_receive() -> ReceiveMessage:
                nonlocal complete, received
                if complete:
                    return await receive()
                now = time.monotonic()
                limits = [(idle, f"sent nothing for {idle:g} s"),
                          (deadline - now, f"did not finish sending the body within {total:g} s")]
                if min_rate:  # the moment the average falls below min_rate (counted after the first idle seconds)
                    limits.append((started + idle + received / min_rate - now,
                                   f"sent the body slower than {min_rate:g} bytes/s"))
                limit, what = min(limits, key=lambda pair: pair[0])
                try:
                    async with asyncio.timeout(max(limit, 0.0)):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeout(detail=f"The client {what}.", headers={"connection": "close"}) from None
                received += len(cast(bytes, message.get("body", b"")))
                complete = message["type"] != "http.request" or not message.get("more_body", False)
                return message

            await app(scope, timed_receive, send)

        return handle

    return middleware


def json_guard(limit: int) -> Callable[[Request[Any, Any, Any]], Any]:
    """A ``before_request`` hook: a JSON body nested deeper than ``limit`` is refused (400) before Litestar's
    decoder recurses into it. orjson (C, no recursion, stops at 1024 levels) parses it first, so a 100,000-deep
    body costs microseconds; within 1024 levels the depth is measured on the bytes, a chunk at a time with the
    event loop free between chunks. The body read here is cached by Litestar for the handler. Every route that
    takes a decoded body is measured whatever ``Content-Type`` the client claims (Litestar decodes a JSON body
    sent as ``multipart/…`` too); a route without one (the upload, which streams its form) is not read."""

    async def guard(request: Request[Any, Any, Any]) -> None:
        if request.method not in ("POST", "PUT", "PATCH"):
            return
        if "data" not in request.route_handler.parsed_fn_signature.parameters:
            return  # the route reads its body itself (the upload streams its multipart form): nothing decoded here
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
    per_address = 0  # open connections one client address may hold (0: no limit); beyond, 429 and closed
    high_water = 0  # open connections past which those idle for IDLE_SHED seconds are closed (0: never)
    by_address: ClassVar[dict[str, int]] = {}  # a dict of its own on each server's subclass (``server_options``)
    proxies: frozenset[str] = frozenset()  # trusted proxies: not held to ``per_address``
    _head_timer: asyncio.TimerHandle | None = None
    _address: str | None = None
    _idle_since: float | None = None

    def _arm_head(self) -> None:
        self._cancel_head()
        self._idle_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def _cancel_head(self) -> None:
        self._idle_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client is not None:
            self._address = self.client[0]
            held = self.by_address[self._address] = self.by_address.get(self._address, 0) + 1
            proxied = "*" in self.proxies or self._address in self.proxies  # a proxy carries many clients
            if self.per_address and held > self.per_address and not proxied:
                transport.write(_TOO_MANY)
                transport.close()
                return
        if self.high_water and len(self.connections) > self.high_water:
            self._shed_idle()
        self._arm_head()

    def _shed_idle(self) -> None:
        """Near the cap: close every connection that has waited IDLE_SHED seconds or more for a request."""
        now = self.loop.time()
        for other in list(self.connections):
            if isinstance(other, HeaderTimeoutProtocol) and other is not self and other._idle_since is not None \
                    and now - other._idle_since >= IDLE_SHED and not other.conn.trailing_data[0]:
                other._cancel_head()
                other.transport.close()

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
        if self._address is not None:
            left = self.by_address.get(self._address, 1) - 1
            if left > 0:
                self.by_address[self._address] = left
            else:
                self.by_address.pop(self._address, None)
            self._address = None
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


def trusted_proxies(settings: Settings) -> list[str]:
    return [p.strip() for p in settings.trusted_proxies.split(",") if p.strip()]


def plain_http_problem(settings: Settings, host: str, loopback: bool) -> str | None:
    """Why serving ``host`` as configured would send keys in clear over a network (None when it would not): a
    non-loopback bind with neither a certificate nor a trusted TLS proxy in front, unless ``allow_plain_http``."""
    if loopback or settings.ssl_certfile is not None or trusted_proxies(settings) or settings.allow_plain_http:
        return None
    return (f"refusing to serve {host} over plain HTTP: bearer keys and every file would cross the network in "
            "clear. Give a certificate (--ssl-certfile/--ssl-keyfile, OBATCH_SSL_CERTFILE/OBATCH_SSL_KEYFILE), or "
            "name the TLS proxy in front (OBATCH_TRUSTED_PROXIES), or pass --allow-plain-http "
            "(OBATCH_ALLOW_PLAIN_HTTP) if the network is private.")


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings that bound connections: pass them to ``uvicorn.Config``. ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` are read only from ``trusted_proxies`` (uvicorn would trust loopback peers by default,
    so anyone on the machine could pick the address its requests count against)."""
    protocol = type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {
        "header_timeout": settings.header_timeout, "per_address": settings.max_connections_per_address,
        "high_water": settings.max_connections * 3 // 4, "by_address": {},
        "proxies": frozenset(trusted_proxies(settings))})
    proxies = trusted_proxies(settings)
    return {"http": protocol, "timeout_keep_alive": settings.keep_alive_timeout,
            "limit_concurrency": settings.max_connections, "h11_max_incomplete_event_size": settings.max_header_bytes,
            "proxy_headers": bool(proxies), "forwarded_allow_ips": proxies or None,
            "ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
