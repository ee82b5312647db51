"""``/health`` (no key needed: DB and backend reachability) and ``/metrics`` (Prometheus text format: the whole
server's for an admin key, the caller's own batches and lines for any other key)."""

from __future__ import annotations

from litestar import Controller, Response, get

from obatch.protocol import Health
from obatch.server import operations as ops
from obatch.server.deps import Admin, MetricsDep, Owner, Probe, Svc, Worker
from obatch.server.metrics import CONTENT_TYPE, tenant_metrics


class SystemController(Controller):
    path = "/"
    tags = ("system",)

    @get("/health", summary="Store and backend reachability")
    async def health(self, svc: Svc, worker: Worker, probe: Probe) -> Response[Health]:
        report = await ops.health(svc, worker, probe)
        return Response(report, status_code=200 if report.server_ok else 503)

    @get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(self, svc: Svc, worker: Worker, metrics: MetricsDep, owner: Owner,
                      admin: Admin) -> Response[bytes]:
        if not admin:
            return Response(await tenant_metrics(svc, owner or ""), media_type=CONTENT_TYPE)
        await worker.refresh()  # the engine latencies and running batches of a batch process
        await metrics.refresh(svc, len(worker.running))
        return Response(metrics.render(), media_type=CONTENT_TYPE)
