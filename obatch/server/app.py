"""The Litestar app factory. The lifespan owns the store's engine, the backend client and the batch worker;
handlers receive them by dependency injection. Nothing is created at import time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig

from obatch.backends import Backend, open_backend
from obatch.batches import Services
from obatch.config import Settings
from obatch.server import auth
from obatch.server.benchmarks import BenchmarksController
from obatch.server.controllers import BatchesController, FilesController, PassthroughController, SystemController
from obatch.server.deps import providers
from obatch.server.errors import exception_handler
from obatch.server.metrics import Metrics
from obatch.server.observe import request_middleware
from obatch.store import db
from obatch.store.db import open_store
from obatch.worker import BatchWorker, ThreadedWorker

MAX_JSON_BODY = 64 << 20  # JSON request bodies (uploads have their own limit: max_file_bytes)


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> Litestar:
    """The obatch server. A ``backend`` passed in is used as it is and left open at shutdown (its owner closes
    it); otherwise one is opened from ``settings`` and closed with the app."""
    settings = settings or Settings()
    keys = auth.load_keys(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def worker_services(backend_name: str) -> AsyncIterator[Services]:
        engine = db.create_engine(settings.db_url)
        client = await open_backend(settings.model_copy(update={"backend": backend_name}))
        try:
            yield Services(settings, db.sessions(engine), metrics.wrap(client))
        finally:
            await client.aclose()
            await engine.dispose()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine, sessions = await open_store(settings.db_url)
        client = backend or await open_backend(settings)
        try:
            svc = Services(settings, sessions, metrics.wrap(client))
            slots = settings.server_concurrency or settings.concurrency
            if backend is None and settings.worker_thread and client.name in ("ollama", "openai"):
                # Batches run on their own loop (an HTTP engine client is cheap to open twice; the embedded
                # engine is not, and stays on this loop).
                worker: BatchWorker = ThreadedWorker(lambda: worker_services(client.name), concurrency=slots,
                                                     poll_interval=settings.worker_poll_interval)
            else:
                worker = BatchWorker(svc, concurrency=slots, poll_interval=settings.worker_poll_interval)
            app.state.update(svc=svc, worker=worker, metrics=metrics)
            if settings.run_batches:  # else an API-only server: another process on the store finds new batches
                await worker.start()
            try:
                yield
            finally:
                await worker.stop()
        finally:
            if backend is None:
                await client.aclose()
            await engine.dispose()

    middleware: list[Any] = [request_middleware(metrics), DefineMiddleware(auth.ApiKeyAuth, keys=keys)]
    if settings.rate_limit_per_minute:
        middleware.append(RateLimitConfig(rate_limit=("minute", settings.rate_limit_per_minute),
                                          identifier_for_request=auth.rate_limit_identity,
                                          exclude=["^/health$"]).middleware)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    return Litestar(
        route_handlers=[FilesController, BatchesController, PassthroughController, SystemController,
                        BenchmarksController],
        lifespan=[lifespan],
        dependencies=providers(),
        middleware=middleware,
        exception_handlers={Exception: exception_handler},
        cors_config=CORSConfig(allow_origins=origins, allow_headers=["*"], allow_methods=["GET", "POST", "DELETE"])
        if origins else None,
        openapi_config=OpenAPIConfig(title="obatch", version="0.1.0",
                                     description="OpenAI Files + Batches API on local LLMs."),
        request_max_body_size=MAX_JSON_BODY,
        logging_config=None,
        debug=False,
    )
