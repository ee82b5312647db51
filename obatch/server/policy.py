"""Who may start what on the shared engine, beyond the engine-option policy every request line meets
(``obatch.jsonl.EnginePolicy``).

Sweeps load the engine like nothing else (every point is a burst of requests at a chosen concurrency), so starting
one is an admin key's right; with ``tenant_sweeps`` other keys may too, each sweep at most ``max_sweep_requests``
requests and each key at most ``sweep_requests_per_day`` over the last 24 hours (sweeps cancelled or failed still
count: their requests reached the engine), checked and recorded atomically in the store. Admin keys, and a server
without keys, are the operator's and are not limited."""

from __future__ import annotations

from obatch import errors
from obatch.batches import Services
from obatch.bench import sweep_jobs
from obatch.bench.schemas import Sweep, SweepParams
from obatch.store import quota

DAY = 24 * 3600


class Forbidden(errors.ObatchError):
    status_code = 403
    code = "permission_denied"


class BudgetExceeded(errors.ObatchError):
    status_code = 429
    code = "sweep_budget_exceeded"


async def start_sweep(svc: Services, params: SweepParams, owner: str | None, admin: bool) -> Sweep:
    """Queue this sweep, or raise unless this caller may start it now. A tenant's sweep is checked against the
    key's daily budget and recorded in one step (``obatch.store.quota``), so sweeps started at once by one key
    never pass the budget together."""
    if admin:
        return await sweep_jobs.create(svc.sessions, params, owner)
    settings = svc.settings
    if not settings.tenant_sweeps:
        raise Forbidden("Only admin keys may start sweeps on this server (OBATCH_ADMIN_KEYS; or "
                        "OBATCH_TENANT_SWEEPS=true lets every key start bounded ones).")
    row = sweep_jobs.new_row(params, owner)
    if row.requests > settings.max_sweep_requests:
        raise errors.ConfigError(f"This sweep sends {row.requests} requests (points × requests); a key may start "
                                 f"sweeps of at most {settings.max_sweep_requests}.", code="sweep_too_large",
                                 param="requests")
    since = row.created_at - DAY
    async with svc.sessions() as session:
        admitted = await quota.add_sweep_within(session, row, settings.sweep_requests_per_day, since)
        await session.commit()
    if not admitted:
        async with svc.sessions() as session:
            spent = await quota.sweep_requests_since(session, owner, since)
        raise BudgetExceeded(f"This key's sweeps sent {spent} requests in the last 24 hours; with this one's "
                             f"{row.requests} they would pass the budget of {settings.sweep_requests_per_day}.")
    return sweep_jobs.to_wire(row)
