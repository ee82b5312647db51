"""Prometheus metrics of one app (its own registry, nothing global) and the backend wrapper that times requests.

An admin key sees the whole server; any other key sees ``tenant_metrics``: its own batches, lines and queue, in the
same metric names, and nothing about other keys' traffic.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from obatch import errors
from obatch.backends.base import Backend, BackendWrapper, Result
from obatch.batches import Services
from obatch.protocol import BatchStatus
from obatch.store import repo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STATUSES: tuple[BatchStatus, ...] = ("validating", "failed", "in_progress", "finalizing", "completed", "expired",
                                      "cancelling", "cancelled")
_LINE_STATES = ("pending", "succeeded", "failed")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("obatch_http_requests", "HTTP requests answered.", ["method", "route", "status"],
                                registry=r)
        self.request_seconds = Histogram("obatch_http_request_duration_seconds", "HTTP request duration.",
                                         ["method", "route"], registry=r)
        self.backend_seconds = Histogram("obatch_backend_request_duration_seconds",
                                         "Engine request latency (batch lines and pass-through).",
                                         ["endpoint", "outcome"], buckets=_LATENCY_BUCKETS, registry=None)
        self.remote_backend_samples: list[list[Any]] = []  # the batch process's histogram: [name, labels, value]
        r.register(_Merged(self.backend_seconds, self))
        self.batches = Gauge("obatch_batches", "Batches in the store by status.", ["status"], registry=r)
        self.lines = Gauge("obatch_batch_lines", "Batch lines (requests) in the store by status.", ["status"],
                           registry=r)
        self.queue_depth = Gauge("obatch_queue_depth", "Lines waiting to run in active batches.", registry=r)
        self.running_batches = Gauge("obatch_running_batches", "Batches the worker is driving now.", registry=r)

    async def refresh(self, svc: Services, running: int) -> None:
        """Read the store's counts into the gauges (called on each scrape)."""
        async with svc.sessions() as session:
            by_status = await repo.batch_status_counts(session)
            by_state = await repo.line_state_counts(session)
            queued = await repo.queued_lines(session)
        for status in _STATUSES:
            self.batches.labels(status).set(by_status.get(status, 0))
        for state in _LINE_STATES:
            self.lines.labels(state).set(by_state.get(state, 0))
        self.queue_depth.set(queued)
        self.running_batches.set(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def wrap(self, backend: Backend) -> MeteredBackend:
        return MeteredBackend(backend, self.backend_seconds)


async def tenant_metrics(svc: Services, owner: str) -> bytes:
    """The store's gauges counted over one owner's batches only, rendered in the Prometheus text format."""
    async with svc.sessions() as session:
        by_status = await repo.batch_status_counts(session, owner)
        by_state = await repo.line_state_counts(session, owner)
        queued = await repo.queued_lines(session, owner)
    registry = CollectorRegistry(auto_describe=True)
    batches = Gauge("obatch_batches", "Your batches by status.", ["status"], registry=registry)
    lines = Gauge("obatch_batch_lines", "Your batch lines (requests) by status.", ["status"], registry=registry)
    for status in _STATUSES:
        batches.labels(status).set(by_status.get(status, 0))
    for state in _LINE_STATES:
        lines.labels(state).set(by_state.get(state, 0))
    Gauge("obatch_queue_depth", "Your lines waiting to run in active batches.", registry=registry).set(queued)
    return generate_latest(registry)


class _Merged(Collector):
    """This process's engine-latency histogram plus the last samples the batch process reported (its lines ran
    there): one metric, as if one process had run them all."""

    def __init__(self, local: Histogram, metrics: Metrics) -> None:
        self._local, self._metrics = local, metrics

    def collect(self) -> Iterable[Metric]:
        for family in self._local.collect():
            merged: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {
                (s.name, tuple(sorted(s.labels.items()))): s for s in family.samples}
            for name, labels, value in self._metrics.remote_backend_samples:
                key = (name, tuple(sorted(labels.items())))
                mine = merged.get(key)
                if mine is None:
                    merged[key] = Sample(name, labels, value)
                elif not name.endswith("_created"):
                    merged[key] = mine._replace(value=mine.value + value)
            family.samples = list(merged.values())
            yield family


class MeteredBackend(BackendWrapper):
    """A backend that records every request's latency and outcome; everything else is the inner backend's."""

    def __init__(self, inner: Backend, histogram: Histogram) -> None:
        super().__init__(inner)
        self._histogram = histogram

    def _observe(self, url: str, started: float, outcome: str) -> None:
        self._histogram.labels(url, outcome).observe(time.perf_counter() - started)

    async def complete(self, url: str, body: dict[str, Any], *, num_ctx: int | None = None,
                       stream: bool = False) -> Result:
        started, outcome = time.perf_counter(), "cancelled"
        try:
            result = await self.inner.complete(url, body, num_ctx=num_ctx, stream=stream)
            outcome = "ok"
            return result
        except errors.BackendError as exc:
            outcome = exc.code
            raise
        finally:
            self._observe(url, started, outcome)

    def stream_chat(self, body: dict[str, Any], *, num_ctx: int | None = None) -> AsyncIterator[dict[str, Any]]:
        return self._metered("/v1/chat/completions", self.inner.stream_chat(body, num_ctx=num_ctx))

    def stream_completion(self, body: dict[str, Any], *, num_ctx: int | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        return self._metered("/v1/completions", self.inner.stream_completion(body, num_ctx=num_ctx))

    async def _metered(self, url: str, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        started, outcome = time.perf_counter(), "cancelled"
        try:
            async for chunk in chunks:
                yield chunk
            outcome = "ok"
        except errors.BackendError as exc:
            outcome = exc.code
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            self._observe(url, started, outcome)
