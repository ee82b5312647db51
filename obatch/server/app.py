"""The Litestar app factory. The lifespan owns the store's engine, the backend client and the batch worker;
handlers receive them by dependency injection. Nothing is created at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig, get_remote_address
from litestar.openapi import OpenAPIConfig

from obatch import batches
from obatch._heap import settle
from obatch.backends import Backend, open_backend, pinned_settings
from obatch.backends.base import capabilities_of
from obatch.batches import Services
from obatch.config import Settings
from obatch.server import auth
from obatch.server.audit import AuditLog, audit_middleware
from obatch.server.batchproc import ProcessWorker, batch_services
from obatch.server.controllers import (
    BatchesController,
    BenchmarksController,
    FilesController,
    PassthroughController,
    SystemController,
)
from obatch.server.controllers import batches as batch_routes
from obatch.server.deps import providers
from obatch.server.errors import exception_handler
from obatch.server.guard import body_timeouts, json_guard
from obatch.server.metrics import Metrics
from obatch.server.observe import log_unrouted, request_middleware
from obatch.server.operations import BackendProbe
from obatch.store import db
from obatch.store.db import open_store
from obatch.worker import BatchWorker, ThreadedWorker

MAX_JSON_BODY = 64 << 20  # JSON request bodies (uploads have their own limit: max_file_bytes)
# Response headers a browser page may read across origins (beyond the CORS-safelisted ones): the results page's
# cursor, the request id, and when to retry.
EXPOSED_HEADERS = (batch_routes.NEXT_AFTER, batch_routes.FINISHED, "x-request-id", "x-should-retry", "retry-after")
UNLIMITED_PATHS = ["^/health$"]  # never rate-limited: health checks come often, from one address
log = logging.getLogger("obatch.server")


async def sweep_expired_files(svc: Services) -> None:
    """Delete expired files (rows and bytes) every ``file_sweep_interval`` seconds, for as long as the app runs."""
    while True:
        try:
            deleted = await batches.delete_expired_files(svc)
            if deleted:
                log.info("expired files deleted", extra={"count": deleted})
        except Exception:
            log.exception("deleting expired files failed")
        await asyncio.sleep(svc.settings.file_sweep_interval)


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> Litestar:
    """The obatch server. A ``backend`` passed in is used as it is and left open at shutdown (its owner closes
    it); otherwise one is opened from ``settings`` and closed with the app."""
    settings = settings or Settings()
    keys = auth.load_keys(settings)
    metrics = Metrics()
    audit = AuditLog(settings.audit_log_path or settings.data_dir / "audit.log", settings.audit_log_max_bytes,
                     settings.audit_log_backups) if settings.audit_log else None

    def services(sessions: db.Sessions, client: Backend) -> Services:
        return batch_services(settings, sessions, client, metrics)

    @asynccontextmanager
    async def worker_services(pinned: Settings) -> AsyncIterator[Services]:
        """The worker thread's own store engine and engine clients (``pinned``: of the API's kind), made and closed
        on its loop."""
        engine = db.create_engine(settings.db_url)
        client = await open_backend(pinned)
        try:
            yield services(db.sessions(engine), client)
        finally:
            await client.aclose()
            await engine.dispose()

    @asynccontextmanager
    async def audited(app: Litestar) -> AsyncIterator[None]:
        if audit is None:
            yield
            return
        await asyncio.to_thread(audit.start)
        try:
            yield
        finally:
            await asyncio.to_thread(audit.stop)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine, sessions = await open_store(settings.db_url)
        client = backend or await open_backend(settings)
        try:
            svc = services(sessions, client)
            # Batches run in a process or on a loop of their own (an HTTP engine client is cheap to open twice; the
            # embedded engine is not, and stays on this loop, as does a backend passed in). The worker's pool
            # learns its own levels.
            apart = backend is None and not capabilities_of(client).embedded
            pinned = pinned_settings(settings, client)
            worker: BatchWorker
            if apart and settings.batch_worker == "process":
                worker = ProcessWorker(pinned, owner=svc.owner, metrics=metrics)
            elif apart and settings.batch_worker == "thread":
                worker = ThreadedWorker(lambda: worker_services(pinned), poll_interval=settings.worker_poll_interval)
            else:
                worker = BatchWorker(svc, poll_interval=settings.worker_poll_interval)
            probe = BackendProbe(svc.backend, ", ".join(h["url"] for h in svc.pool.describe()))
            app.state.update(svc=svc, worker=worker, metrics=metrics, probe=probe)
            if settings.batch_worker != "none":  # else an API-only server: another process on the store runs them
                await worker.start()
            settle()  # what start-up built lives as long as the server: out of every later collection
            sweeper = asyncio.create_task(sweep_expired_files(svc), name="obatch-file-sweep")
            try:
                yield
            finally:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
                await worker.stop()
                await probe.aclose()
                await svc.pool.stop()
        finally:
            if backend is None:
                await client.aclose()
            await engine.dispose()

    # Outermost first: request ids and the access log; the audit log; body timeouts; the per-address limit before
    # authentication (wrong keys count too); authentication; the per-key limit.
    middleware: list[Any] = [request_middleware(metrics)]
    if audit is not None:
        middleware.append(audit_middleware(audit))
    middleware.append(body_timeouts(settings.body_idle_timeout, settings.upload_timeout, settings.min_body_rate))
    if settings.address_rate_limit_per_minute:
        middleware.append(DefineMiddleware(auth.AddressRateLimit, config=RateLimitConfig(
            rate_limit=("minute", settings.address_rate_limit_per_minute), identifier_for_request=get_remote_address,
            exclude=UNLIMITED_PATHS)))
    middleware.append(DefineMiddleware(auth.ApiKeyAuth, keys=keys, admins=auth.load_admins(settings),
                                       failures=auth.FailureLimiter(settings.auth_failures_per_minute)))
    if settings.rate_limit_per_minute:
        middleware.append(RateLimitConfig(rate_limit=("minute", settings.rate_limit_per_minute),
                                          identifier_for_request=auth.rate_limit_identity,
                                          exclude=UNLIMITED_PATHS).middleware)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    return Litestar(
        route_handlers=[FilesController, BatchesController, PassthroughController, SystemController,
                        BenchmarksController],
        lifespan=[audited, lifespan],
        dependencies=providers(),
        middleware=middleware,
        before_request=json_guard(settings.max_json_depth),
        before_send=[log_unrouted(metrics)],
        exception_handlers={Exception: exception_handler},
        cors_config=CORSConfig(allow_origins=origins, allow_headers=["*"], allow_methods=["GET", "POST", "DELETE"],
                               expose_headers=list(EXPOSED_HEADERS)) if origins else None,
        openapi_config=OpenAPIConfig(title="obatch", version="0.1.0",
                                     description="OpenAI Files + Batches API on local LLMs."),
        request_max_body_size=MAX_JSON_BODY,
        logging_config=None,
        debug=False,
    )
