"""The Models page: the server's health answer and the backend's models."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from obatch.ui.views._values import flatten, integer


def models_frame(models: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """``/v1/models`` entries → the Models page table."""
    keys = ("id", "loaded", "context_length", "loaded_context_length", "parameter_size", "quantization", "family")
    schema = {"id": pl.Utf8, "loaded": pl.Boolean, "context_length": pl.Int64, "loaded_context_length": pl.Int64,
              "parameter_size": pl.Utf8, "quantization": pl.Utf8, "family": pl.Utf8}
    rows = []
    for entry in models:
        flat = flatten(entry)
        row: dict[str, Any] = {k: flat.get(k) for k in keys}
        row["loaded"] = bool(row["loaded"]) if row["loaded"] is not None else None
        for k in ("context_length", "loaded_context_length"):
            row[k] = integer(row[k])
        for k in ("id", "parameter_size", "quantization", "family"):
            row[k] = None if row[k] is None else str(row[k])
        rows.append(row)
    return pl.DataFrame(rows, schema=schema)


@dataclass
class Health:
    """The server's ``/health`` answer, read generously: server up? backend reachable? which backend?"""

    server_ok: bool
    backend: str | None = None
    backend_ok: bool | None = None
    backend_url: str | None = None
    detail: str | None = None
    version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _truthy_status(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.lower() in ("ok", "up", "healthy", "pass", "ready", "reachable")
    return None


def read_health(body: Mapping[str, Any]) -> Health:
    backend = body.get("backend")
    name = url = detail = version = None
    backend_ok: bool | None = None
    if isinstance(backend, Mapping):
        name = backend.get("name") or backend.get("kind") or backend.get("type")
        hosts = [str(h["url"]) for h in backend.get("hosts") or [] if isinstance(h, Mapping) and h.get("url")]
        url = backend.get("url") or backend.get("base_url") or ", ".join(map(str, backend.get("urls") or hosts))
        backend_ok = _truthy_status(backend.get("ok", backend.get("reachable", backend.get("status"))))
        detail = backend.get("error") or backend.get("detail") or backend.get("message")
        version = backend.get("version")
    elif isinstance(backend, str):
        name = backend
    if backend_ok is None:
        backend_ok = _truthy_status(body.get("backend_ok", body.get("backend_status")))
    http_status = body.get("http_status", 200)
    status = str(body.get("status", "ok")).lower()
    server_ok = isinstance(http_status, int) and http_status < 500 and status not in ("error", "unavailable", "down")
    if status == "degraded" and backend_ok is None:
        backend_ok = False  # obatch's /health: the store answers, the backend does not
    if backend_ok is None and not server_ok:
        backend_ok = False
    detail = detail or body.get("error") or body.get("detail")
    return Health(server_ok=server_ok, backend=str(name) if name else None, backend_ok=backend_ok,
                  backend_url=str(url) if url else None, detail=str(detail) if detail else None,
                  version=str(version) if version else None, raw=dict(body))
