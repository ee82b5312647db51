"""``/health`` (no key needed: DB and backend reachability; details for a key, engine hosts for an admin key) and
``/metrics`` (Prometheus text format: the whole server's for an admin key, the caller's own batches and lines for
any other key)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get

from obatch.protocol import Health
from obatch.server import operations as ops
from obatch.server.auth import is_admin, is_anonymous
from obatch.server.deps import Admin, MetricsDep, Owner, Probe, Svc, Worker
from obatch.server.metrics import CONTENT_TYPE, tenant_metrics


def _shown(report: Health, scope: Any, where: str) -> Health:
    """What the caller may see of the report: all of it with an admin key; with another key, no engine hosts or
    addresses; without a key, whether the store and the engine answer, and the engine's kind."""
    if is_admin(scope):
        return report
    backend = report.backend.model_copy(update={"urls": [], "hosts": []})
    if is_anonymous(scope):
        backend = backend.model_copy(update={"version": None, "error": None})
    elif backend.error and where:
        backend = backend.model_copy(update={"error": backend.error.replace(where, "the engine")})
    return report.model_copy(update={"backend": backend})


class SystemController(Controller):
    path = "/"
    tags = ("system",)

    @get("/health", summary="Store and backend reachability (details for a key, engine hosts for an admin key)")
    async def health(self, request: Request[Any, Any, Any], svc: Svc, worker: Worker, probe: Probe
                     ) -> Response[Health]:
        report = await ops.health(svc, worker, probe)
        return Response(_shown(report, request.scope, probe.where), status_code=200 if report.server_ok else 503)

    @get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(self, svc: Svc, worker: Worker, metrics: MetricsDep, owner: Owner,
                      admin: Admin) -> Response[bytes]:
        if not admin:
            return Response(await tenant_metrics(svc, owner or ""), media_type=CONTENT_TYPE)
        await worker.refresh()  # the engine latencies and running batches of a batch process
        await metrics.refresh(svc, len(worker.running))
        return Response(metrics.render(), media_type=CONTENT_TYPE)
