"""What handlers receive by dependency injection (named after the app's ``dependencies``), and the providers."""

from __future__ import annotations

from typing import Any, TypeAlias, cast

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from obatch.batches import Services
from obatch.server.auth import is_admin
from obatch.server.metrics import Metrics
from obatch.worker import BatchWorker

Svc: TypeAlias = NamedDependency[Services]
Worker: TypeAlias = NamedDependency[BatchWorker]
Owner: TypeAlias = NamedDependency[str | None]  # the caller's owner id; None when authentication is off
MetricsDep: TypeAlias = NamedDependency[Metrics]
Admin: TypeAlias = NamedDependency[bool]  # an admin key (or authentication off): may see what spans tenants


def _svc(state: State) -> Services:
    return cast(Services, state.svc)


def _worker(state: State) -> BatchWorker:
    return cast(BatchWorker, state.worker)


def _metrics(state: State) -> Metrics:
    return cast(Metrics, state.metrics)


def _owner(request: Request[Any, Any, Any]) -> str | None:
    return cast(str | None, request.scope.get("user"))


def _admin(request: Request[Any, Any, Any]) -> bool:
    return is_admin(request.scope)


def providers() -> dict[str, Provide]:
    return {name: Provide(fn, sync_to_thread=False)
            for name, fn in (("svc", _svc), ("worker", _worker), ("metrics", _metrics), ("owner", _owner),
                             ("admin", _admin))}
