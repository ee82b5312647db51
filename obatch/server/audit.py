"""The audit log: who changed what. One JSON line per state-changing request (an upload, a batch created or
cancelled, a file deleted, a sweep started or cancelled), to a file of its own, rotated by size:

    {"ts": 1796570000.1, "request_id": "req_…", "key": "key_…", "action": "batch.cancel",
     "object": "batch-…", "status": 200, "address": "10.0.0.7"}

``key`` is the owner id derived from the key's hash (``obatch.server.auth.owner_of``; null for a request without a
valid key), never the key. ``object`` is the id in the path, or for a create the id the answer carries. Lines are
written by a thread of their own (``QueueListener``), never on the event loop."""

from __future__ import annotations

import logging
import queue
import re
import time
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener, RotatingFileHandler
from pathlib import Path
from typing import Any, cast

import orjson
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from obatch.server.errors import describe
from obatch.server.observe import request_id_of

ACTIONS: list[tuple[str, re.Pattern[str], str]] = [  # method, path, action
    ("POST", re.compile(r"^/v1/files/?$"), "file.create"),
    ("DELETE", re.compile(r"^/v1/files/(?P<id>[^/]+)$"), "file.delete"),
    ("POST", re.compile(r"^/v1/batches/?$"), "batch.create"),
    ("POST", re.compile(r"^/v1/batches/(?P<id>[^/]+)/cancel$"), "batch.cancel"),
    ("POST", re.compile(r"^/v1/benchmarks/sweeps/?$"), "sweep.create"),
    ("POST", re.compile(r"^/v1/benchmarks/sweeps/(?P<id>[^/]+)/cancel$"), "sweep.cancel"),
]
_KEPT = 64 << 10  # bytes of a create's answer read for the new object's id
_ID = re.compile(rb'"id"\s*:\s*"([^"]{1,128})"')


class AuditLog:
    """The audit file and the thread that writes it; ``start`` and ``stop`` with the app."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self.logger = logging.Logger("obatch.audit")  # not in the logging registry: the app's own, not global
        self.logger.addHandler(QueueHandler(self.queue))
        self.listener: QueueListener | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(self.path, maxBytes=self.max_bytes, backupCount=self.backups,
                                      encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.listener = QueueListener(self.queue, handler)
        self.listener.start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()  # writes what is queued first
            for handler in self.listener.handlers:
                handler.close()
            self.listener = None

    def write(self, entry: dict[str, Any]) -> None:
        self.logger.info(orjson.dumps(entry).decode())


def _action(method: str, path: str) -> tuple[str, str | None] | None:
    for wanted, pattern, action in ACTIONS:
        if method == wanted and (found := pattern.match(path)):
            return action, found.groupdict().get("id")
    return None


def audit_middleware(log: AuditLog) -> Callable[[ASGIApp], ASGIApp]:
    """Middleware factory: each request of ``ACTIONS`` is written to ``log`` once answered (whatever the answer)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            audited = _action(str(scope.get("method", "")), str(scope.get("path", ""))) \
                if scope["type"] == ScopeType.HTTP else None
            if audited is None:
                await app(scope, receive, send)
                return
            action, object_id = audited
            status, body = 0, bytearray()

            async def watched(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body" and object_id is None and len(body) < _KEPT:
                    body.extend(message.get("body", b"")[:_KEPT - len(body)])
                await send(message)

            try:
                await app(scope, receive, watched)
            except Exception as exc:  # answered by the request middleware further out (auth, rate limits)
                status = status or describe(exc)[0]
                raise
            finally:
                made = _ID.search(body) if object_id is None and status == 200 else None
                client = scope.get("client")
                log.write({"ts": round(time.time(), 3), "request_id": request_id_of(scope),
                           "key": cast(dict[str, Any], scope).get("user"), "action": action,
                           "object": object_id or (made.group(1).decode() if made else None),
                           "status": status or 499, "address": client[0] if client else None})

        return handle

    return middleware
