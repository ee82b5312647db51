"""The engine hosts a server drives, from its ``/health`` report (``protocol.Health``)."""

from __future__ import annotations

import polars as pl

from obatch.protocol import Health

HOST_COLUMNS = {"host": pl.Utf8, "backend": pl.Utf8, "state": pl.Utf8, "concurrency": pl.Utf8, "why": pl.Utf8,
                "in flight": pl.Int64, "served": pl.Int64, "models": pl.Utf8, "error": pl.Utf8}


def hosts_frame(health: Health) -> pl.DataFrame:
    """One row per engine host: its state, its level (``8 (auto)``, ``4 (fixed)``) and why, what it served."""
    return pl.DataFrame([{
        "host": h.url, "backend": h.backend, "state": h.state,
        "concurrency": f"{h.concurrency} ({'auto' if h.auto else 'fixed'})", "why": h.reason,
        "in flight": h.in_flight, "served": h.served,
        "models": ", ".join(h.models) if h.models is not None else "", "error": h.error or "",
    } for h in health.backend.hosts], schema=HOST_COLUMNS)
