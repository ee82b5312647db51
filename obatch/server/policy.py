"""Who may start what on the shared engine, beyond the engine-option policy every request line meets
(``obatch.jsonl.EnginePolicy``).

Sweeps load the engine like nothing else (every point is a burst of requests at a chosen concurrency), so starting
one is an admin key's right; with ``tenant_sweeps`` other keys may too, each sweep at most ``max_sweep_requests``
requests and each key at most ``sweep_requests_per_day`` over the last 24 hours (sweeps cancelled or failed still
count: their requests reached the engine). Admin keys, and a server without keys, are the operator's and are not
limited."""

from __future__ import annotations

import time

from obatch import errors
from obatch.batches import Services
from obatch.bench.schemas import SweepParams
from obatch.store import quota

DAY = 24 * 3600


class Forbidden(errors.ObatchError):
    status_code = 403
    code = "permission_denied"


class BudgetExceeded(errors.ObatchError):
    status_code = 429
    code = "sweep_budget_exceeded"


def sweep_requests(params: SweepParams) -> int:
    """The engine requests a sweep sends: each point (model × num_ctx × level × repeat) sends ``requests``."""
    return params.points * params.requests


async def admit_sweep(svc: Services, params: SweepParams, owner: str | None, admin: bool) -> None:
    """Raise unless this caller may start this sweep now."""
    if admin:
        return
    settings = svc.settings
    if not settings.tenant_sweeps:
        raise Forbidden("Only admin keys may start sweeps on this server (OBATCH_ADMIN_KEYS; or "
                        "OBATCH_TENANT_SWEEPS=true lets every key start bounded ones).")
    asked = sweep_requests(params)
    if asked > settings.max_sweep_requests:
        raise errors.ConfigError(f"This sweep sends {asked} requests (points × requests); a key may start sweeps "
                                 f"of at most {settings.max_sweep_requests}.", code="sweep_too_large",
                                 param="requests")
    async with svc.sessions() as session:
        earlier = await quota.sweep_params_since(session, owner or "", time.time() - DAY)
    spent = sum(sweep_requests(SweepParams.model_validate_json(p)) for p in earlier)
    if spent + asked > settings.sweep_requests_per_day:
        raise BudgetExceeded(f"This key's sweeps sent {spent} requests in the last 24 hours; with this one's "
                             f"{asked} they would pass the budget of {settings.sweep_requests_per_day}.")
