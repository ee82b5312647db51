"""What handlers receive by dependency injection (named after the app's ``dependencies``), and the providers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias, cast

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from sqlalchemy.ext.asyncio import AsyncSession

from obatch.batches import Services
from obatch.server.auth import is_admin
from obatch.server.metrics import Metrics
from obatch.server.operations import BackendProbe
from obatch.worker import BatchWorker

Svc: TypeAlias = NamedDependency[Services]
Worker: TypeAlias = NamedDependency[BatchWorker]
Owner: TypeAlias = NamedDependency[str | None]  # the caller's owner id; None when authentication is off
MetricsDep: TypeAlias = NamedDependency[Metrics]
Admin: TypeAlias = NamedDependency[bool]  # an admin key (or authentication off): may see what spans tenants
Probe: TypeAlias = NamedDependency[BackendProbe]  # the backend's reachability, probed off the request path
DbSession: TypeAlias = NamedDependency[AsyncSession]  # one store session per request, closed after the response


def _svc(state: State) -> Services:
    return cast(Services, state.svc)


def _worker(state: State) -> BatchWorker:
    return cast(BatchWorker, state.worker)


def _probe(state: State) -> BackendProbe:
    return cast(BackendProbe, state.probe)


def _metrics(state: State) -> Metrics:
    return cast(Metrics, state.metrics)


async def _db_session(state: State) -> AsyncIterator[AsyncSession]:
    async with cast(Services, state.svc).sessions() as session:
        yield session


def _owner(request: Request[Any, Any, Any]) -> str | None:
    return cast(str | None, request.scope.get("user"))


def _admin(request: Request[Any, Any, Any]) -> bool:
    return is_admin(request.scope)


def providers() -> dict[str, Provide]:
    plain = {name: Provide(fn, sync_to_thread=False)
             for name, fn in (("svc", _svc), ("worker", _worker), ("metrics", _metrics), ("probe", _probe),
                              ("owner", _owner), ("admin", _admin))}
    return plain | {"db_session": Provide(_db_session)}  # a generator: closed after the response
